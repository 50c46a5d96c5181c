"""RT-DETRv2 as a LightningModule; ``denoising: null`` in YAML turns contrastive denoising off."""

from __future__ import annotations

from ..criterion import SetCriterion
from ..matcher import HungarianMatcher
from ..models.rtdetr_v2 import RTDETRv2Config, RTDETRv2Net
from ..postprocess import PostProcess
from .base import DetectionModule


class RTDETRv2(DetectionModule):
    """RT-DETRv2 (Lv et al. 2024); ``net``: the network's hyper-parameters (``RTDETRv2Config``,
    defaults: the L model, R50-vd).

    Varifocal classification (alpha 0.75, gamma 2) with loss weights 1/5/2 for the decoder
    layers, the encoder's top-k proposals and the denoising queries; focal-style matching costs
    2/5/2 (alpha 0.25, gamma 2); top-``num_select`` (query x class) detections at evaluation.
    Official optimisation: AdamW lr 1e-4, ``lr_backbone`` per size, weight decay 1e-4 except on
    encoder/decoder norms, 2000 warm-up steps, gradient clip 0.1, EMA of weights (a callback).
    """

    net_config = RTDETRv2Config

    def __init__(
        self,
        net: RTDETRv2Config,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        weight_class: float = 1.0,
        weight_bbox: float = 5.0,
        weight_giou: float = 2.0,
        vfl_alpha: float = 0.75,
        vfl_gamma: float = 2.0,
        num_select: int = 300,
        **kwargs,
    ) -> None:
        kwargs.setdefault("no_decay_on_norm", True)
        kwargs.setdefault("warmup_steps", 2000)
        super().__init__(net, **kwargs)
        num_classes = net.num_classes
        self.net = RTDETRv2Net(net)
        matcher = HungarianMatcher(cost_class, cost_bbox, cost_giou, "focal", 0.25, 2.0)
        self.criterion = SetCriterion(
            num_classes,
            matcher,
            "vfl",
            weight_class,
            weight_bbox,
            weight_giou,
            alpha=vfl_alpha,
            gamma=vfl_gamma,
        )
        self.postprocess = PostProcess("sigmoid", num_select)
