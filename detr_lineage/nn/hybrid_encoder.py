"""RT-DETR's hybrid encoder: AIFI (attention within one scale) + CCFF (CNN fusion across scales).

RT-DETR's finding is that multi-scale *attention* (Deformable DETR's encoder) is where the
cost is, and that running self-attention only on the coarsest map S5 (AIFI, 20x20 = 400
tokens at 640 px) and fusing the scales with a cheap convolutional FPN + PAN (CCFF) is both
faster and more accurate. The CCFF blocks are RepVGG-style: 3x3 and 1x1 branches while
training, folded into one 3x3 conv for deployment (``HybridEncoder.deploy()``).

Module names follow the official ``hybrid_encoder.py`` (input_proj, encoder, lateral_convs,
fpn_blocks, downsample_convs, pan_blocks) so that a checkpoint converter only has to rename
the AIFI layer internals. Differences from the official code, all deliberate:

- Position encoding: the shared ``sine_encoding`` of raw cell coordinates counted from 0,
  as the official ``build_2d_sincos_position_embedding`` (same frequencies, same
  [sin y | cos y | sin x | cos x] layout). For non-square maps the official flattening mixes
  up rows and columns; ours does not (identical for the square maps RT-DETR trains and
  evaluates on). Recomputed every call (400 tokens: cheap), not cached for a fixed eval size.
- Top-down upsampling interpolates to the lower level's exact size (nearest), identical to
  the official ``scale_factor=2`` when the input is a multiple of 32, and it also works for
  other sizes, where ``scale_factor=2`` gives a size mismatch.
- No padding mask: RT-DETR resizes every image to a fixed square (640x640) without padding,
  so every position is valid; batches from ``data/collate.py`` have all-False masks here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .position import sine_encoding
from .transformer import EncoderLayer, make_activation

__all__ = [
    "AIFI",
    "CSPRepLayer",
    "ConvNorm",
    "HybridEncoder",
    "RepVggBlock",
    "aifi_position_encoding",
    "fuse_repvgg",
]


class ConvNorm(nn.Module):
    """Conv (no bias: the BN has one) + BatchNorm + optional activation, 'same' padding."""

    def __init__(
        self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, act: str | None = None
    ) -> None:
        super().__init__()
        pad = (kernel_size - 1) // 2
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding=pad, bias=False)
        self.norm = nn.BatchNorm2d(out_ch)
        self.act = nn.Identity() if act is None else make_activation(act)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(x)))


def _fold_bn(branch: ConvNorm) -> tuple[Tensor, Tensor]:
    """(kernel, bias) of the conv followed by its BN in eval mode: ``w * g/s``, ``b - m * g/s``."""
    norm = branch.norm
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)  # [C_out]
    kernel = branch.conv.weight * scale[:, None, None, None]  # [C_out,C_in,k,k]
    return kernel, norm.bias - norm.running_mean * scale


class RepVggBlock(nn.Module):
    """act(BN(conv3x3(x)) + BN(conv1x1(x))): two branches to train, one 3x3 conv to deploy.

    A 1x1 kernel is a 3x3 kernel that is zero off-centre and BN in eval mode is affine, so the
    sum folds exactly into one 3x3 conv with a bias (``fuse()``). The fused block is only
    equal to the eval-mode block (running statistics), so fuse trained models for inference.
    """

    def __init__(self, in_ch: int, out_ch: int, act: str | None = "silu") -> None:
        super().__init__()
        self.conv1: ConvNorm | None = ConvNorm(in_ch, out_ch, 3)
        self.conv2: ConvNorm | None = ConvNorm(in_ch, out_ch, 1)
        self.conv: nn.Conv2d | None = None  # set by fuse()
        self.act = nn.Identity() if act is None else make_activation(act)

    def forward(self, x: Tensor) -> Tensor:
        if self.conv is not None:
            return self.act(self.conv(x))
        return self.act(self.conv1(x) + self.conv2(x))

    @torch.no_grad()
    def fuse(self) -> None:
        """Fold both branches and their BNs into ``self.conv`` (3x3, bias); drop the branches."""
        if self.conv is not None:
            return
        k3, b3 = _fold_bn(self.conv1)  # [C_out,C_in,3,3], [C_out]
        k1, b1 = _fold_bn(self.conv2)  # [C_out,C_in,1,1], [C_out]
        ref = self.conv1.conv
        fused = nn.Conv2d(ref.in_channels, ref.out_channels, 3, 1, padding=1, bias=True)
        fused = fused.to(device=ref.weight.device, dtype=ref.weight.dtype)
        fused.weight.copy_(k3 + F.pad(k1, [1, 1, 1, 1]))
        fused.bias.copy_(b3 + b1)
        self.conv = fused
        self.conv1 = None
        self.conv2 = None


def fuse_repvgg(module: nn.Module) -> nn.Module:
    """Fuse every ``RepVggBlock`` under ``module`` in place (for inference); returns ``module``."""
    for m in module.modules():
        if isinstance(m, RepVggBlock):
            m.fuse()
    return module


class CSPRepLayer(nn.Module):
    """CSP block of the CCFF: two 1x1 branches, one through ``num_blocks`` RepVGG blocks, summed.

    hidden = ``int(out_ch * expansion)`` (0.5 for S/M, 1.0 for L/X); a last 1x1 ConvNorm
    maps hidden back to ``out_ch`` only if they differ.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        num_blocks: int = 3,
        expansion: float = 1.0,
        act: str = "silu",
    ) -> None:
        super().__init__()
        hidden = int(out_ch * expansion)
        self.conv1 = ConvNorm(in_ch, hidden, 1, act=act)
        self.conv2 = ConvNorm(in_ch, hidden, 1, act=act)
        self.bottlenecks = nn.Sequential(
            *(RepVggBlock(hidden, hidden, act) for _ in range(num_blocks))
        )
        self.conv3 = ConvNorm(hidden, out_ch, 1, act=act) if hidden != out_ch else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.conv3(self.bottlenecks(self.conv1(x)) + self.conv2(x))


def aifi_position_encoding(
    h: int, w: int, dim: int, temperature: float, device: torch.device
) -> Tensor:
    """2D sine encoding of an ``h x w`` map as AIFI adds it: ``[1, h*w, dim]`` (row-major tokens).

    Each axis's coordinates (0, 1, ..., as the official) go through the shared sine encoding,
    whose interleaved (sin, cos) pairs are regrouped into [sin ... | cos ...] per axis.
    """
    if dim % 4:
        raise ValueError(f"AIFI position encoding needs hidden_dim divisible by 4, got {dim}")
    y, x = torch.meshgrid(
        torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij"
    )
    axes = [sine_encoding(c.flatten(), dim // 2, temperature) for c in (y, x)]  # [h*w,dim/2]
    # interleaved [sin, cos, sin, cos, ...] -> [sin ... | cos ...] per axis
    pos = [a.view(h * w, dim // 4, 2).transpose(1, 2).reshape(h * w, dim // 2) for a in axes]
    return torch.cat(pos, -1)[None]  # [1,h*w,dim]


class AIFI(nn.Module):
    """Attention-based intra-scale feature interaction: encoder layers over one flattened map."""

    def __init__(
        self,
        hidden_dim: int,
        nhead: int,
        dim_feedforward: int,
        dropout: float,
        activation: str,
        num_layers: int,
        pe_temperature: float,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            EncoderLayer(hidden_dim, nhead, dim_feedforward, dropout, activation)
            for _ in range(num_layers)
        )
        self.pe_temperature = pe_temperature

    def forward(self, x: Tensor) -> Tensor:
        """``x [B,C,H,W]`` -> ``[B,C,H,W]``."""
        b, c, h, w = x.shape
        pos = aifi_position_encoding(h, w, c, self.pe_temperature, x.device).to(x.dtype)
        tokens = x.flatten(2).transpose(1, 2)  # [B,HW,C]
        for layer in self.layers:
            tokens = layer(tokens, pos)
        return tokens.transpose(1, 2).reshape(b, c, h, w).contiguous()


class HybridEncoder(nn.Module):
    """Backbone maps (strides 8/16/32) -> ``hidden_dim`` maps at the same strides.

    ``in_channels`` are the backbone's ``out_channels``; ``strides`` (default 8/16/32) is only
    reported: the bottom-up path assumes each level is half the previous one, rounded up.
    Defaults are the official R50 (L) config; S/M use ``expansion=0.5``, X ``hidden_dim=384,
    dim_feedforward=2048``.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        hidden_dim: int = 256,
        nhead: int = 8,
        dim_feedforward: int = 1024,
        dropout: float = 0.0,
        enc_act: str = "gelu",
        use_encoder_idx: Sequence[int] = (2,),
        num_encoder_layers: int = 1,
        expansion: float = 1.0,
        depth_mult: float = 1.0,
        act: str = "silu",
        pe_temperature: float = 10000.0,
        strides: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        n = len(in_channels)
        if n < 2:
            raise ValueError(f"HybridEncoder fuses several levels; got in_channels={in_channels}")
        bad = [i for i in use_encoder_idx if not -n <= i < n]
        if bad:
            raise ValueError(f"use_encoder_idx {bad} out of range for {n} levels")
        self.in_channels = list(in_channels)
        self.hidden_dim = hidden_dim
        self.use_encoder_idx = [i % n for i in use_encoder_idx]
        self.out_channels: list[int] = [hidden_dim] * n
        self.strides: list[int] = (
            list(strides) if strides is not None else [8 * 2**i for i in range(n)]
        )

        # 1x1 conv + BN, no activation: only matches the widths.
        self.input_proj = nn.ModuleList(ConvNorm(c, hidden_dim, 1) for c in in_channels)
        self.encoder = nn.ModuleList(
            AIFI(
                hidden_dim,
                nhead,
                dim_feedforward,
                dropout,
                enc_act,
                num_encoder_layers,
                pe_temperature,
            )
            for _ in self.use_encoder_idx
        )
        num_blocks = round(3 * depth_mult)
        # Top-down (FPN): index 0 fuses the top level into the one below, and so on.
        self.lateral_convs = nn.ModuleList(
            ConvNorm(hidden_dim, hidden_dim, 1, act=act) for _ in range(n - 1)
        )
        self.fpn_blocks = nn.ModuleList(
            CSPRepLayer(2 * hidden_dim, hidden_dim, num_blocks, expansion, act)
            for _ in range(n - 1)
        )
        # Bottom-up (PAN): index 0 fuses level 0 into level 1, and so on.
        self.downsample_convs = nn.ModuleList(
            ConvNorm(hidden_dim, hidden_dim, 3, stride=2, act=act) for _ in range(n - 1)
        )
        self.pan_blocks = nn.ModuleList(
            CSPRepLayer(2 * hidden_dim, hidden_dim, num_blocks, expansion, act)
            for _ in range(n - 1)
        )

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        """``feats``: ``[B,C_i,H_i,W_i]`` fine to coarse -> ``[B,hidden_dim,H_i,W_i]`` each."""
        if len(feats) != len(self.in_channels):
            raise ValueError(f"expected {len(self.in_channels)} feature maps, got {len(feats)}")
        proj = [p(f) for p, f in zip(self.input_proj, feats)]  # [B,d,H_i,W_i]
        for aifi, i in zip(self.encoder, self.use_encoder_idx):
            proj[i] = aifi(proj[i])

        # Top-down: start from the coarsest map, each step produces the next finer one.
        n = len(proj)
        inner = [proj[-1]]  # inner[0] is always the finest map so far
        for step, low in enumerate(reversed(proj[:-1])):
            high = self.lateral_convs[step](inner[0])
            inner[0] = high  # the PAN reuses the lateral output, not the pre-lateral map
            up = F.interpolate(high, size=low.shape[-2:], mode="nearest")  # [B,d,H_low,W_low]
            inner.insert(0, self.fpn_blocks[step](torch.cat([up, low], dim=1)))

        # Bottom-up: from the finest fused map back to the coarsest.
        outs = [inner[0]]
        for step in range(n - 1):
            down = self.downsample_convs[step](outs[-1])  # [B,d,H_{i+1},W_{i+1}]
            outs.append(self.pan_blocks[step](torch.cat([down, inner[step + 1]], dim=1)))
        return outs

    def deploy(self) -> HybridEncoder:
        """Fuse every RepVGG block for inference (outputs equal the eval-mode ones)."""
        fuse_repvgg(self)
        return self
