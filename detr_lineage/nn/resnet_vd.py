"""RT-DETR's ResNet-vd backbone (the official ``PResNet``), built on timm's ``resnet*d``.

ResNet-vd = ResNet-D of "Bag of Tricks" (He et al. 2019): a deep stem of three 3x3 convs
(32-32-64 channels, the first with stride 2) instead of one 7x7 conv, and projection
shortcuts that downsample with a 2x2 average pool before a stride-1 1x1 conv, so that no
activation is dropped by a strided 1x1 conv. timm's ``resnet18d/34d/50d/101d`` have exactly
this structure, with one exception that we patch: the official PResNet gives the *first*
block of the first stage a 1x1 conv + BN projection shortcut even when the channels match
(64 -> 64, stride 1), which only happens for the BasicBlock nets (R18/R34). timm uses an
identity there. Adding that projection makes the parameter count equal the official one
(+4,224 for R18/R34) and lets the official Paddle-converted weights load.

Input: ``[B,3,H,W]`` float in [0,1], no mean/std normalisation (as the official RT-DETRv2).
Initialisation is timm's (Kaiming, last BN of each block zeroed), which only matters for runs
that do not load pretrained weights; the official configs always load them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import timm
import torch
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

__all__ = ["ResNetVd", "freeze_batch_norm", "official_to_timm_key"]

DEPTHS = (18, 34, 50, 101)
STAGE_STRIDES = (4, 8, 16, 32)  # res2..res5, return_idx 0..3


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm2d`` under ``module`` by a ``FrozenBatchNorm2d`` with its values.

    Frozen statistics are what the official L/X configs train with (``freeze_norm: True``):
    with batch 4 per GPU the batch statistics are too noisy to update ImageNet's. Returns
    ``module`` (or its replacement if ``module`` is itself a BatchNorm2d).
    """
    if isinstance(module, nn.BatchNorm2d):
        tensors = [*module.parameters(), *module.buffers()]
        device = tensors[0].device if tensors else None
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps).to(device)
        with torch.no_grad():
            if module.affine:
                frozen.weight.copy_(module.weight)
                frozen.bias.copy_(module.bias)
            if module.running_mean is not None and module.running_var is not None:
                frozen.running_mean.copy_(module.running_mean)
                frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        new = freeze_batch_norm(child)
        if new is not child:
            setattr(module, name, new)
    return module


# Official PResNet key fragments -> timm ResNet key fragments, applied in order.
# Stem: conv1.conv1_{1,2,3}.{conv,norm} are timm's conv1.{0,1}, conv1.{3,4}, conv1.6 + bn1.
# Blocks: res_layers.i.blocks.j.branch2{a,b,c}.{conv,norm} -> layer{i+1}.j.{conv,bn}{1,2,3};
# the shortcut is Sequential(pool, ConvNorm) when it downsamples, a bare ConvNorm otherwise;
# timm's is always Sequential(pool | Identity, conv, bn).
_OFFICIAL_KEY_RULES: tuple[tuple[str, str], ...] = (
    (r"^conv1\.conv1_1\.conv\.", "conv1.0."),
    (r"^conv1\.conv1_1\.norm\.", "conv1.1."),
    (r"^conv1\.conv1_2\.conv\.", "conv1.3."),
    (r"^conv1\.conv1_2\.norm\.", "conv1.4."),
    (r"^conv1\.conv1_3\.conv\.", "conv1.6."),
    (r"^conv1\.conv1_3\.norm\.", "bn1."),
    (r"\.short\.conv\.conv\.", ".downsample.1."),
    (r"\.short\.conv\.norm\.", ".downsample.2."),
    (r"\.short\.conv\.", ".downsample.1."),
    (r"\.short\.norm\.", ".downsample.2."),
    (r"\.branch2a\.conv\.", ".conv1."),
    (r"\.branch2a\.norm\.", ".bn1."),
    (r"\.branch2b\.conv\.", ".conv2."),
    (r"\.branch2b\.norm\.", ".bn2."),
    (r"\.branch2c\.conv\.", ".conv3."),
    (r"\.branch2c\.norm\.", ".bn3."),
)


def official_to_timm_key(key: str) -> str:
    """Rename one official PResNet state-dict key to our (timm) name; others pass unchanged."""
    stage = re.match(r"^res_layers\.(\d+)\.blocks\.", key)
    if stage:
        key = f"layer{int(stage.group(1)) + 1}." + key[stage.end() :]
    for pattern, repl in _OFFICIAL_KEY_RULES:
        key = re.sub(pattern, repl, key)
    return key


def _is_official_layout(state: Mapping[str, Tensor]) -> bool:
    return any(k.startswith(("res_layers.", "conv1.conv1_")) for k in state)


class ResNetVd(nn.Module):
    """ResNet-vd 18/34/50/101 returning the stages ``return_idx`` (0..3 = strides 4..32).

    ``freeze_at`` (official semantics): -1 trains everything; k >= 0 freezes the stem and
    the first k stages (L/X configs: 0 = stem only). ``freeze_norm`` replaces BatchNorm2d
    with FrozenBatchNorm2d (L/X: True; S/M*: False). ``pretrained`` is a local state-dict
    file, never a download; it may use our keys (``ResNetVd.state_dict()``, with or without
    ``body.``), timm's ``resnet*d`` keys (the ``fc.`` classifier is ignored) or the official
    PResNet keys (e.g. ``ResNet50_vd_ssld_v2_pretrained_from_paddle.pth``).
    """

    def __init__(
        self,
        depth: int = 50,
        return_idx: Sequence[int] = (1, 2, 3),
        freeze_at: int = -1,
        freeze_norm: bool = False,
        pretrained: str | None = None,
    ) -> None:
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"ResNet-vd depth must be one of {DEPTHS}, got {depth}")
        return_idx = [int(i) for i in return_idx]
        if (
            not return_idx
            or sorted(set(return_idx)) != return_idx
            or not all(0 <= i < len(STAGE_STRIDES) for i in return_idx)
        ):
            raise ValueError(f"return_idx must be increasing indices in 0..3, got {return_idx}")
        if freeze_at < -1:
            raise ValueError(f"freeze_at must be >= -1, got {freeze_at}")
        if pretrained is not None and not Path(pretrained).is_file():  # fail before building
            raise FileNotFoundError(f"ResNet-vd pretrained weights file not found: {pretrained}")
        self.depth = depth
        self.return_idx = return_idx
        # timm feature index 0 is the stem (stride 2), 1..4 are res2..res5.
        self.body = timm.create_model(
            f"resnet{depth}d",
            pretrained=False,
            features_only=True,
            out_indices=tuple(i + 1 for i in return_idx),
        )
        if depth < 50:
            self._add_first_stage_projection()
        self.out_channels: list[int] = list(self.body.feature_info.channels())
        self.strides: list[int] = [STAGE_STRIDES[i] for i in return_idx]

        if pretrained is not None:
            self.load_pretrained(pretrained)
        if freeze_norm:
            freeze_batch_norm(self.body)
        if freeze_at >= 0:
            stages = [getattr(self.body, f"layer{i + 1}", None) for i in range(freeze_at)]
            for part in [self.body.conv1, self.body.bn1, *stages]:
                if part is not None:  # stages past the last returned one are not built
                    part.requires_grad_(False)

    def _add_first_stage_projection(self) -> None:
        """Give layer1's first BasicBlock the official 64 -> 64 1x1 conv + BN shortcut."""
        block = self.body.layer1[0]
        width = block.conv1.in_channels
        conv = nn.Conv2d(width, width, 1, bias=False)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        # Identity at index 0 keeps timm's (pool, conv, bn) indices for checkpoint keys.
        block.downsample = nn.Sequential(nn.Identity(), conv, nn.BatchNorm2d(width))

    def load_pretrained(self, path: str) -> None:
        """Load a local state-dict file; raise naming the file and the keys that do not fit."""
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"ResNet-vd pretrained weights file not found: {file}")
        state = torch.load(file, map_location="cpu", weights_only=True)
        for wrapper in ("state_dict", "model"):
            if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
                state = state[wrapper]
        if not isinstance(state, Mapping):
            raise ValueError(f"{file}: expected a state dict, got {type(state).__name__}")
        state = {k.removeprefix("body."): v for k, v in state.items()}
        if _is_official_layout(state):
            state = {official_to_timm_key(k): v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        # Stages after the last returned one are not built: their weights are not needed.
        own = self.body.state_dict()
        built = {k.split(".")[0] for k in own}
        state = {
            k: v
            for k, v in state.items()
            if not (k.startswith("layer") and k.split(".")[0] not in built)
        }
        shape_errors = [
            f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
            for k, v in state.items()
            if k in own and own[k].shape != v.shape
        ]
        if shape_errors:
            raise ValueError(
                f"{file}: shapes do not match ResNet-vd{self.depth}: {shape_errors[:5]}"
            )
        missing, unexpected = self.body.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise ValueError(
                f"{file} does not fit ResNet-vd{self.depth}: "
                f"{len(missing)} missing keys (e.g. {missing[:5]}), "
                f"{len(unexpected)} unexpected keys (e.g. {unexpected[:5]})"
            )

    def forward(self, x: Tensor) -> list[Tensor]:
        """``x [B,3,H,W]`` in [0,1] -> one ``[B,C_i,H/s_i,W/s_i]`` map per ``return_idx``."""
        return self.body(x)
