"""Deformable DETR as a LightningModule."""

from __future__ import annotations

from ..models.deformable_detr import DeformableDETRConfig, DeformableDETRNet
from .focal import FocalDetector


class DeformableDETR(FocalDetector):
    """Deformable DETR (Zhu et al. 2020). Defaults are the official R50 settings
    (fundamentalvision/Deformable-DETR): focal loss, matching costs 2/5/2, loss weights 2/5/2
    (the two-stage encoder proposals too), top-100 detections; AdamW lr 2e-4, backbone 2e-5,
    the sampling offsets and the reference-point projection at 0.1x lr (``lr_linear_proj_mult``,
    main.py), 50 epochs with the drop at 40 (config).
    """

    net_config = DeformableDETRConfig
    net_class = DeformableDETRNet

    def __init__(
        self,
        net: DeformableDETRConfig,
        weight_class: float = 2.0,
        num_select: int = 100,
        lr_linear_proj_mult: float = 0.1,
        **kwargs,
    ) -> None:
        super().__init__(
            net,
            weight_class=weight_class,
            num_select=num_select,
            lr_linear_proj_mult=lr_linear_proj_mult,
            **kwargs,
        )
