"""DN-DETR as a LightningModule; ``denoising: null`` in YAML trains DAB-DETR instead."""

from __future__ import annotations

from ..criterion import SetCriterion
from ..matcher import HungarianMatcher
from ..models.dn_detr import DNDETRConfig, DNDETRNet
from ..postprocess import PostProcess
from .base import DetectionModule


class DNDETR(DetectionModule):
    """DN-DETR (Li et al. 2022). Defaults are the official R50 COCO settings; ``net``: the
    network's hyper-parameters (``DNDETRConfig``).

    Focal classification (alpha 0.25, gamma 2) with focal-style matching costs 2/5/2, loss
    weights 1/5/2 for the matching and the denoising queries alike; top-``num_select``
    (query x class) detections at evaluation.
    """

    net_config = DNDETRConfig

    def __init__(
        self,
        net: DNDETRConfig,
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
        num_classes = net.num_classes
        self.net = DNDETRNet(net)
        matcher = HungarianMatcher(
            cost_class, cost_bbox, cost_giou, "focal", focal_alpha, focal_gamma
        )
        self.criterion = SetCriterion(
            num_classes,
            matcher,
            "focal",
            weight_class,
            weight_bbox,
            weight_giou,
            alpha=focal_alpha,
            gamma=focal_gamma,
        )
        self.postprocess = PostProcess("sigmoid", num_select)
