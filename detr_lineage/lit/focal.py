"""Sigmoid-classification detectors (DN-DETR, Conditional DETR, Deformable DETR, DINO with focal
loss; RT-DETRv2 with varifocal loss): one module, the network named by the subclass."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from ..criterion import SetCriterion
from ..matcher import HungarianMatcher
from ..postprocess import PostProcess
from .base import DetectionModule


class FocalDetector(DetectionModule):
    """Focal classification (``focal_alpha``, ``focal_gamma``) with focal-style matching costs
    ``cost_*`` and loss weights ``weight_*`` for the matching, encoder and denoising queries
    alike; top-``num_select`` (query x class) detections at evaluation.

    A subclass names its network (``net_class``) and config (``net_config``), declares
    ``net: <its config>`` and only the defaults its paper changes; one with another
    classification loss overrides ``classification_loss``.
    """

    net_class: ClassVar[type[nn.Module]]

    def __init__(
        self,
        net: Any,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        weight_class: float = 1.0,
        weight_bbox: float = 5.0,
        weight_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        num_select: int = 300,
        **kwargs,
    ) -> None:
        super().__init__(net, **kwargs)
        self.net = self.net_class(net)
        matcher = HungarianMatcher(
            cost_class, cost_bbox, cost_giou, "focal", focal_alpha, focal_gamma
        )
        loss, alpha, gamma = self.classification_loss()
        self.criterion = SetCriterion(
            net.num_classes,
            matcher,
            loss,
            weight_class,
            weight_bbox,
            weight_giou,
            alpha=alpha,
            gamma=gamma,
        )
        self.postprocess = PostProcess("sigmoid", num_select)

    def classification_loss(self) -> tuple[str, float, float]:
        """(loss, alpha, gamma) of the classification loss: focal, as the matching cost."""
        return "focal", self.hparams.focal_alpha, self.hparams.focal_gamma
