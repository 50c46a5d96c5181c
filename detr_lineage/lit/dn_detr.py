"""DN-DETR as a LightningModule; ``net.denoising: null`` in YAML trains DAB-DETR instead."""

from __future__ import annotations

from ..models.dn_detr import DNDETRConfig, DNDETRNet
from .focal import FocalDetector


class DNDETR(FocalDetector):
    """DN-DETR (Li et al. 2022). Defaults are the official R50 COCO settings; ``net``: the
    network's hyper-parameters (``DNDETRConfig``).

    Focal classification (alpha 0.25, gamma 2) with focal-style matching costs 2/5/2, loss
    weights 1/5/2 for the matching and the denoising queries alike; top-``num_select``
    (query x class) detections at evaluation (``FocalDetector``).
    """

    net_config = DNDETRConfig
    net_class = DNDETRNet

    def __init__(self, net: DNDETRConfig, **kwargs) -> None:
        super().__init__(net, **kwargs)
