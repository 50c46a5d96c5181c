"""Conditional DETR as a LightningModule."""

from __future__ import annotations

from ..models.conditional_detr import ConditionalDETRConfig, ConditionalDETRNet
from .focal import FocalDetector


class ConditionalDETR(FocalDetector):
    """Conditional DETR (Meng et al. 2021). Defaults are the official R50 settings
    (Atten4Vis/ConditionalDETR): focal loss, matching costs 2/5/2, loss weights 2/5/2,
    top-100 detections; AdamW lr 1e-4, backbone 1e-5, 50 epochs with the drop at 40 (config).
    """

    net_config = ConditionalDETRConfig
    net_class = ConditionalDETRNet

    def __init__(
        self,
        net: ConditionalDETRConfig,
        weight_class: float = 2.0,
        num_select: int = 100,
        **kwargs,
    ) -> None:
        super().__init__(net, weight_class=weight_class, num_select=num_select, **kwargs)
