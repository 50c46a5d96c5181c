"""Multi-scale deformable attention (Deformable DETR, RT-DETRv2's decoder), pure PyTorch.

Each query looks at a few learned sampling points per head on every feature level instead of at
every token, which is what makes the RT-DETRv2 decoder cheap. No compiled extension: sampling is
``F.grid_sample`` ("default") or an integer gather ("discrete", which RT-DETRv2 offers for
deployment targets without a grid-sample op), so the same code runs on CPU and GPU.

Layout note (the main cost on CPU): ``grid_sample`` wants per-level images ``[B*H, Dh, h, w]``,
while values usually arrive as ``[B, S, H, Dh]`` tokens. Transposing the whole value map to that
layout (and its gradient back) costs more than the sampling itself. ``ms_deform_attn`` therefore
accepts any memory layout and takes the images as free views when the value is stored heads-major
(``[B, H, Dh, S]`` memory); ``MSDeformableAttention`` writes its value projection straight into
that layout with one GEMM.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SpatialShapes = Sequence[tuple[int, int]] | Tensor
"""(h, w) of each level, as a list of int pairs or a long tensor ``[L, 2]``."""

METHODS = ("default", "discrete")


def as_shape_list(spatial_shapes: SpatialShapes) -> list[tuple[int, int]]:
    """(h, w) per level as Python ints, since reshapes and splits need them on the host."""
    if isinstance(spatial_shapes, Tensor):
        spatial_shapes = spatial_shapes.tolist()
    return [(int(h), int(w)) for h, w in spatial_shapes]


def _heads_channels_first(value: Tensor) -> Tensor:
    """``[B,S,H,Dh]`` (any strides) -> ``[B*H, Dh, S]``, a free view for heads-major memory.

    Other layouts are copied to ``[B,H,S,Dh]`` memory (channels stay innermost, a cheap copy);
    ``grid_sample`` reads such channels-last images as fast as NCHW ones, whereas a full NCHW
    transposition of the value map (what the official pure-PyTorch code does) is ~4x slower.
    """
    b, s, h, c = value.shape
    heads_major = value.permute(0, 2, 3, 1)  # [B,H,Dh,S]
    if heads_major.is_contiguous():
        return heads_major.view(b * h, c, s)
    return value.transpose(1, 2).reshape(b * h, s, c).transpose(1, 2)


def _per_point_levels(
    shapes: list[tuple[int, int]], num_points: list[int], device: torch.device
) -> tuple[Tensor, Tensor]:
    """Per sampling point: ``(w, h)`` of its level ``[P,2]`` and its level's first token ``[P]``."""
    sizes, starts, start = [], [], 0
    for (h, w), n in zip(shapes, num_points):
        sizes += [(w, h)] * n
        starts += [start] * n
        start += h * w
    return (
        torch.tensor(sizes, dtype=torch.long, device=device),
        torch.tensor(starts, dtype=torch.long, device=device),
    )


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    num_points: Sequence[int],
    method: str = "default",
) -> Tensor:
    """Attention-weighted sum of values sampled at normalised locations on several levels.

    Args:
        value: ``[B, S, H, Dh]``, levels flattened row-major and concatenated in order
            (S = sum of h*w). Any strides; heads-major memory (``[B,H,Dh,S]``) is fastest.
        spatial_shapes: (h, w) of each level.
        sampling_locations: ``[B, Q, H, P, 2]`` normalised (x, y), (0, 0) = top-left corner of
            the map, (1, 1) = bottom-right corner; P = sum(num_points), level 0's points first.
        attention_weights: ``[B, Q, H, P]``, already normalised over all points of all levels.
        num_points: points per level (may differ between levels).
        method: "default" = bilinear ``grid_sample`` (zeros outside the map,
            ``align_corners=False``); "discrete" = nearest-index gather with the official
            rounding ``int(loc * size + 0.5)`` clamped to the map, not differentiable w.r.t.
            the locations.

    Returns:
        ``[B, Q, H*Dh]``, heads concatenated.
    """
    shapes = as_shape_list(spatial_shapes)
    num_points = [int(n) for n in num_points]
    b, s, n_heads, c = value.shape
    q, p = sampling_locations.shape[1], sampling_locations.shape[3]
    if len(shapes) != len(num_points):
        raise ValueError(f"{len(shapes)} levels but num_points has {len(num_points)} entries")
    if sum(h * w for h, w in shapes) != s:
        raise ValueError(f"spatial_shapes {shapes} do not add up to {s} value tokens")
    if sum(num_points) != p:
        raise ValueError(f"num_points {num_points} do not add up to {p} sampling points")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")

    n = b * n_heads
    value_nc = _heads_channels_first(value)  # [N, Dh, S], N = B*H
    # points-major [N, 1, P, Q]: the weighted sum over points then runs along a middle axis,
    # vectorised over Q, rather than along a short innermost axis (several times slower)
    weights = attention_weights.permute(0, 2, 3, 1).reshape(n, 1, p, q)

    if method == "default":
        out = _sample_bilinear(value_nc, shapes, sampling_locations, weights, num_points)
    else:
        out = _sample_discrete(value_nc, shapes, sampling_locations, weights, num_points)
    # [N, Dh, Q] = [B, H*Dh, Q] -> [B, Q, H*Dh]
    return out.view(b, n_heads * c, q).transpose(1, 2).contiguous()


def _sample_bilinear(
    value_nc: Tensor,
    shapes: list[tuple[int, int]],
    locations: Tensor,
    weights: Tensor,
    num_points: list[int],
) -> Tensor:
    """One ``grid_sample`` per level; returns ``[N, Dh, Q]``.

    ``split`` rather than slicing: its backward is one concatenation, whereas each slice's
    backward would allocate a zero tensor the size of the whole value map.
    """
    n = value_nc.shape[0]
    b, q, n_heads, p, _ = locations.shape
    images = value_nc.split([h * w for h, w in shapes], dim=2)  # [N, Dh, h*w] each
    # [B,Q,H,P,2] -> [N, P, Q, 2] in grid_sample's [-1, 1] coordinates (one small copy)
    grids = (2 * locations - 1).permute(0, 2, 3, 1, 4).reshape(n, p, q, 2)
    out = None
    for (h, w), image, grid, weight in zip(
        shapes, images, grids.split(num_points, dim=1), weights.split(num_points, dim=2)
    ):
        sampled = F.grid_sample(
            image.unflatten(2, (h, w)),
            grid,
            mode="bilinear",
            padding_mode="zeros",
            align_corners=False,
        )  # [N, Dh, P_l, Q]
        level_out = (sampled * weight).sum(2)  # [N, Dh, Q]
        out = level_out if out is None else out + level_out
    assert out is not None
    return out


def _sample_discrete(
    value_nc: Tensor,
    shapes: list[tuple[int, int]],
    locations: Tensor,
    weights: Tensor,
    num_points: list[int],
) -> Tensor:
    """Nearest-index gather over all levels at once; returns ``[N, Dh, Q]``.

    Rounding follows the official ``deformable_attention_core_func_v2``: ``int(loc*size + 0.5)``,
    the integer nearest to ``loc*size``. Pixel centres sit at ``i + 0.5`` (align_corners=False),
    so this is the nearest pixel centre of the location shifted by half a pixel towards +x/+y.
    The clamp is per axis (x to w-1, y to h-1); the official clamps both to h-1, which differs
    only on non-square maps (where it picks wrong pixels).
    """
    n, c, _ = value_nc.shape
    b, q, n_heads, p, _ = locations.shape
    sizes, starts = _per_point_levels(shapes, num_points, locations.device)  # [P,2] (w,h), [P]
    # floor == the official int64 cast (truncation) once negatives are clamped to 0
    xy = torch.floor(locations.detach() * sizes + 0.5).long()  # [B,Q,H,P,2]
    xy = torch.minimum(xy.clamp_min(0), sizes - 1)
    index = starts + xy[..., 1] * sizes[:, 0] + xy[..., 0]  # [B,Q,H,P] token index into S
    index = index.permute(0, 2, 3, 1).reshape(n, 1, p * q).expand(n, c, p * q)
    sampled = value_nc.gather(2, index).view(n, c, p, q)  # [N, Dh, P, Q]
    return (sampled * weights).sum(2)  # [N, Dh, Q]


class MSDeformableAttention(nn.Module):
    """RT-DETRv2's multi-scale deformable cross-attention (also Deformable DETR's with 2-d refs).

    Parameter names and initialisation follow the official ``MSDeformableAttention``
    (rtdetrv2_decoder.py), so official state dicts load. Differences of interface: the padding
    mask is True = padding (the official ``value_mask`` is True = valid), and reference boxes
    may be given as ``[B,Q,4]`` (the official passes ``[B,Q,1,4]``; both work here).
    """

    def __init__(
        self,
        d_model: int = 256,
        n_heads: int = 8,
        n_levels: int = 3,
        n_points: int | Sequence[int] = 4,
        offset_scale: float = 0.5,
        method: str = "default",
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
        num_points = [n_points] * n_levels if isinstance(n_points, int) else list(n_points)
        if len(num_points) != n_levels:
            raise ValueError(f"n_points {num_points} must have one entry per level ({n_levels})")
        self.d_model, self.n_heads, self.n_levels = d_model, n_heads, n_levels
        self.head_dim = d_model // n_heads
        self.num_points = num_points
        self.offset_scale = offset_scale
        self.method = method
        total = sum(num_points)

        self.sampling_offsets = nn.Linear(d_model, n_heads * total * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * total)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        # 1 / points of the point's level: a box's offsets shrink when a level has more points.
        # Persistent and named as in the official module so its checkpoints load unchanged.
        scale = [1.0 / k for k in num_points for _ in range(k)]
        self.register_buffer("num_points_scale", torch.tensor(scale, dtype=torch.float32))
        level = [lvl for lvl, k in enumerate(num_points) for _ in range(k)]
        self.register_buffer("point_level", torch.tensor(level), persistent=False)  # [P]
        # identity taps: forward hooks on them see the normalised weights and the locations
        # (``detr-lineage explain``); they cost one no-op call each
        self.weights_tap = nn.Identity()  # [B,Q,H,P] after the softmax
        self.locations_tap = nn.Identity()  # [B,Q,H,P,2] in [0,1] of the maps
        self.reset_parameters()

        if method == "discrete":
            # Rounding to an index has no gradient w.r.t. the locations, so the offsets would
            # only see weight decay; the official v2 freezes them (discrete sampling fine-tunes
            # a model whose offsets were learnt with bilinear sampling).
            for param in self.sampling_offsets.parameters():
                param.requires_grad_(False)

    def reset_parameters(self) -> None:
        """Official init: points on a ring of head directions, uniform attention, xavier proj."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        ring = torch.stack([thetas.cos(), thetas.sin()], -1)  # [H, 2]
        ring = ring / ring.abs().max(-1, keepdim=True).values  # onto the unit square's border
        # the k-th point of each level sits k steps out along its head's direction
        step = torch.cat([torch.arange(1, k + 1) for k in self.num_points]).float()  # [P]
        bias = ring[:, None, :] * step[None, :, None]  # [H, P, 2]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: Tensor,
        reference: Tensor,
        value: Tensor,
        spatial_shapes: SpatialShapes,
        value_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Cross-attend ``query [B,Q,d]`` to ``value [B,S,d]``; returns ``[B,Q,d]``.

        ``reference``: boxes ``[B,Q,4]`` (cxcywh in [0,1]; RT-DETRv2: location =
        ``xy + offset / n_points_of_level * wh * offset_scale``) or points ``[B,Q,2]``
        (Deformable DETR: location = ``xy + offset / (w_l, h_l)``); a level axis
        ``[B,Q,L,2|4]`` (or ``[B,Q,1,2|4]``) gives each level its own reference.
        ``value_padding_mask``: bool ``[B,S]``, True = padding; those tokens contribute zero.
        """
        b, q, _ = query.shape
        s = value.shape[1]
        shapes = as_shape_list(spatial_shapes)
        n_heads, total = self.n_heads, sum(self.num_points)

        # value projection written heads-major, [B, d, S] = [B, H, Dh, S] memory: one GEMM with a
        # transposed operand, so ms_deform_attn gets its per-level images as free views
        weight, bias = self.value_proj.weight, self.value_proj.bias
        value_t = torch.baddbmm(
            bias[None, :, None], weight.expand(b, -1, -1), value.transpose(1, 2)
        )  # [B, d, S]
        if value_padding_mask is not None:
            value_t = value_t.masked_fill(value_padding_mask[:, None, :], 0.0)
        value_heads = value_t.view(b, n_heads, self.head_dim, s).permute(0, 3, 1, 2)  # [B,S,H,Dh]

        offsets = self.sampling_offsets(query).view(b, q, n_heads, total, 2)
        attn = self.weights_tap(
            self.attention_weights(query).view(b, q, n_heads, total).softmax(-1)
        )
        locations = self.locations_tap(self._sampling_locations(reference, offsets, shapes))

        out = ms_deform_attn(value_heads, shapes, locations, attn, self.num_points, self.method)
        return self.output_proj(out)

    def _sampling_locations(
        self, reference: Tensor, offsets: Tensor, shapes: list[tuple[int, int]]
    ) -> Tensor:
        """Reference ``[B,Q,(L,)2|4]`` + offsets ``[B,Q,H,P,2]`` -> locations ``[B,Q,H,P,2]``."""
        if len(shapes) != self.n_levels:
            raise ValueError(f"got {len(shapes)} levels, the module was built for {self.n_levels}")
        ref = reference if reference.dim() == 4 else reference[:, :, None]  # [B,Q,L|1,C]
        if ref.shape[2] == self.n_levels and self.n_levels > 1:
            ref = ref.index_select(2, self.point_level)  # [B,Q,P,C]
        ref = ref[:, :, None]  # [B,Q,1,P|1,C], broadcast over heads
        if ref.shape[-1] == 4:
            scale = self.num_points_scale.to(offsets.dtype)[:, None]  # [P,1]
            return ref[..., :2] + offsets * scale * ref[..., 2:] * self.offset_scale
        if ref.shape[-1] == 2:
            sizes, _ = _per_point_levels(shapes, self.num_points, offsets.device)
            return ref + offsets / sizes.to(offsets.dtype)  # [P,2] (w,h) of each point's level
        raise ValueError(f"reference must end in 2 (points) or 4 (boxes), got {ref.shape[-1]}")
