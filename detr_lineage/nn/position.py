"""Sine position encodings of feature-map pixels (DETR, RT-DETR AIFI) and of boxes (DAB-DETR)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def sine_encoding(x: Tensor, num_feats: int, temperature: float) -> Tensor:
    """Each scalar of ``x [...]`` -> ``num_feats`` interleaved sin/cos values ``[..., F]``
    (float32, float64 for float64 ``x``; the frequencies in float32 as the official code)."""
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=x.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    pos = (x if x.dtype == torch.float64 else x.float())[..., None] / dim_t  # [..., F]
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)


def sine_position_encoding_2d(
    mask: Tensor,
    num_feats: int = 128,
    temperature: float = 10000.0,
    normalize: bool = True,
    scale: float = 2 * math.pi,
) -> Tensor:
    """DETR's 2D sine encoding of a map: ``mask [B,H,W]`` (True = padding) -> ``[B,2F,H,W]``.

    Coordinates count only valid pixels, so with ``normalize`` they span [0, scale] over the
    unpadded image whatever its padding. Channels are (y features, x features).
    """
    not_mask = ~mask
    y = not_mask.cumsum(1, dtype=torch.float32)
    x = not_mask.cumsum(2, dtype=torch.float32)
    if normalize:
        eps = 1e-6
        y = y / (y[:, -1:, :] + eps) * scale
        x = x / (x[:, :, -1:] + eps) * scale
    pos = torch.cat(
        (sine_encoding(y, num_feats, temperature), sine_encoding(x, num_feats, temperature)), -1
    )
    return pos.permute(0, 3, 1, 2)


def sine_encoding_of_boxes(
    boxes: Tensor, num_feats: int = 128, temperature: float = 10000.0, scale: float = 2 * math.pi
) -> Tensor:
    """DAB-DETR's encoding of boxes ``[..., 4]`` (cx, cy, w, h in [0,1]) -> ``[..., 4F]``, or of
    points ``[..., 2]`` (cx, cy; Conditional DETR) -> ``[..., 2F]``.

    The order follows DAB-DETR, (cy, cx, w, h): the first 2F channels encode the centre alone.
    """
    parts = [boxes[..., i] * scale for i in range(boxes.shape[-1])]  # cx, cy(, w, h)
    parts[0], parts[1] = parts[1], parts[0]
    return torch.cat([sine_encoding(p, num_feats, temperature) for p in parts], -1)
