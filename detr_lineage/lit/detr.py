"""Vanilla DETR as a LightningModule: hyper-parameters in, network, matcher and loss out."""

from __future__ import annotations

from ..criterion import SetCriterion
from ..denoising import DenoisingConfig
from ..matcher import HungarianMatcher
from ..models.detr import DETRNet
from ..nn.backbone import BackboneConfig
from ..postprocess import PostProcess
from .base import DetectionModule


class DETR(DetectionModule):
    """DETR (Carion et al. 2020). Defaults are the paper's COCO settings.

    ``denoising`` (default None: the paper has none) adds DN-DETR's denoising queries to vanilla
    DETR (``models/detr.py``); their loss is the same CE (toward the clean class) + L1 + GIoU
    with the same weights, on every decoder layer. ``dn_combine``: ``sum`` | ``concat`` of the
    label embedding and the projected box encoding in a denoising query's position.

    Optimiser, schedule and learning rates are ``DetectionModule``'s arguments (``lr``,
    ``lr_backbone``, ``weight_decay``, ``lr_drop_epochs``, ...); gradient clipping (0.1) is the
    trainer's ``gradient_clip_val``.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: BackboneConfig | None = None,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        num_queries: int = 100,
        pre_norm: bool = False,
        aux_loss: bool = True,
        denoising: DenoisingConfig | None = None,
        dn_combine: str = "sum",
        cost_class: float = 1.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        weight_class: float = 1.0,
        weight_bbox: float = 5.0,
        weight_giou: float = 2.0,
        eos_coef: float = 0.1,
        **kwargs,
    ) -> None:
        super().__init__(num_classes=num_classes, **kwargs)
        self.net = DETRNet(
            num_classes,
            backbone,
            d_model,
            nhead,
            num_encoder_layers,
            num_decoder_layers,
            dim_feedforward,
            dropout,
            num_queries,
            pre_norm,
            aux_loss,
            denoising,
            dn_combine,
        )
        matcher = HungarianMatcher(cost_class, cost_bbox, cost_giou, "softmax")
        self.criterion = SetCriterion(
            num_classes, matcher, "ce", weight_class, weight_bbox, weight_giou, eos_coef
        )
        self.postprocess = PostProcess("softmax")
