"""DN-DETR as a LightningModule; ``denoising: null`` in YAML trains DAB-DETR instead."""

from __future__ import annotations

from ..criterion import SetCriterion
from ..denoising import DenoisingConfig
from ..matcher import HungarianMatcher
from ..models.dn_detr import DNDETRNet
from ..nn.backbone import BackboneConfig
from ..postprocess import PostProcess
from .base import DetectionModule


class DNDETR(DetectionModule):
    """DN-DETR (Li et al. 2022). Defaults are the official R50 COCO settings.

    Focal classification (alpha 0.25, gamma 2) with focal-style matching costs 2/5/2, loss
    weights 1/5/2 for the matching and the denoising queries alike; top-``num_select``
    (query x class) detections at evaluation.
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
        dropout: float = 0.0,
        activation: str = "prelu",
        num_queries: int = 300,
        pe_temperature: float = 20.0,
        denoising: DenoisingConfig | None = None,
        aux_loss: bool = True,
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
        super().__init__(num_classes=num_classes, **kwargs)
        self.net = DNDETRNet(
            num_classes,
            backbone,
            d_model,
            nhead,
            num_encoder_layers,
            num_decoder_layers,
            dim_feedforward,
            dropout,
            activation,
            num_queries,
            pe_temperature,
            denoising,
            aux_loss,
        )
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
