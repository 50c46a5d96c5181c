"""DINO as a LightningModule; ``net.denoising: null`` in YAML turns contrastive denoising off."""

from __future__ import annotations

from ..models.dino import DINOConfig, DINONet
from .focal import FocalDetector


class DINO(FocalDetector):
    """DINO (Zhang et al. 2022). Defaults are the official DINO-4scale R50 settings
    (IDEA-Research/DINO): focal loss, matching costs 2/5/2, loss weights 1/5/2 for the decoder
    layers, the encoder's top-k proposals and the denoising queries; top-300 detections;
    AdamW lr 1e-4, backbone 1e-5, 12 epochs with the drop at 11 (config). The sampling offsets
    train at the full lr: DINO_4scale.py lists Deformable DETR's ``lr_linear_proj_names`` /
    ``mult`` 0.1, but its ``param_dict_type = 'default'`` builds only the backbone and the rest
    group (util/get_param_dicts.py), so ``lr_linear_proj_mult`` stays 1.
    """

    net_config = DINOConfig
    net_class = DINONet

    def __init__(self, net: DINOConfig, **kwargs) -> None:
        super().__init__(net, **kwargs)
