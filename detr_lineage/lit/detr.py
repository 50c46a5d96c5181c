"""Vanilla DETR as a LightningModule: hyper-parameters in, network, matcher and loss out."""

from __future__ import annotations

from ..criterion import SetCriterion
from ..matcher import HungarianMatcher
from ..models.detr import DETRConfig, DETRNet
from ..postprocess import PostProcess
from .base import DetectionModule


class DETR(DetectionModule):
    """DETR (Carion et al. 2020). Defaults are the paper's COCO settings.

    ``net``: the network's hyper-parameters (``DETRConfig``). ``net.denoising`` (default None:
    the paper has none) adds DN-DETR's denoising queries to vanilla DETR (``models/detr.py``);
    their loss is the same CE (toward the clean class) + L1 + GIoU with the same weights, on
    every decoder layer.

    Optimiser, schedule and learning rates are ``DetectionModule``'s arguments (``lr``,
    ``lr_backbone``, ``weight_decay``, ``lr_drop_epochs``, ...); gradient clipping (0.1) is the
    trainer's ``gradient_clip_val``.
    """

    net_config = DETRConfig

    def __init__(
        self,
        net: DETRConfig,
        cost_class: float = 1.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        weight_class: float = 1.0,
        weight_bbox: float = 5.0,
        weight_giou: float = 2.0,
        eos_coef: float = 0.1,
        **kwargs,
    ) -> None:
        super().__init__(net, **kwargs)
        num_classes = net.num_classes
        self.net = DETRNet(net)
        matcher = HungarianMatcher(cost_class, cost_bbox, cost_giou, "softmax")
        self.criterion = SetCriterion(
            num_classes, matcher, "ce", weight_class, weight_bbox, weight_giou, eos_coef
        )
        self.postprocess = PostProcess("softmax")
