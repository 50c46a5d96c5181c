"""RT-DETRv2 as a LightningModule; ``denoising: null`` in YAML turns contrastive denoising off."""

from __future__ import annotations

from ..models.rtdetr_v2 import RTDETRv2Config, RTDETRv2Net
from .focal import FocalDetector


class RTDETRv2(FocalDetector):
    """RT-DETRv2 (Lv et al. 2024); ``net``: the network's hyper-parameters (``RTDETRv2Config``,
    defaults: the L model, R50-vd).

    Varifocal classification (``vfl_alpha`` 0.75, ``vfl_gamma`` 2) with loss weights 1/5/2 for
    the decoder layers, the encoder's top-k proposals and the denoising queries; focal-style
    matching costs 2/5/2 (``focal_alpha`` 0.25, ``focal_gamma`` 2); top-``num_select``
    (query x class) detections at evaluation (``FocalDetector``). Official optimisation: AdamW
    lr 1e-4, ``lr_backbone`` per size, weight decay 1e-4 except on encoder/decoder norms, 2000
    warm-up steps, gradient clip 0.1, EMA of weights (a callback); no reduced learning rate for
    the sampling offsets (``lr_linear_proj_mult`` 1, rtdetrv2 ``optimizer.yml``).
    """

    net_config = RTDETRv2Config
    net_class = RTDETRv2Net

    def __init__(
        self,
        net: RTDETRv2Config,
        vfl_alpha: float = 0.75,
        vfl_gamma: float = 2.0,
        **kwargs,
    ) -> None:
        kwargs.setdefault("no_decay_on_norm", True)
        kwargs.setdefault("warmup_steps", 2000)
        super().__init__(net, **kwargs)

    def classification_loss(self) -> tuple[str, float, float]:
        """Varifocal loss (IoU-aware targets) with its own alpha and gamma."""
        return "vfl", self.hparams.vfl_alpha, self.hparams.vfl_gamma
