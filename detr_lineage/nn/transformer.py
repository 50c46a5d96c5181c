"""Transformer layers shared by every variant.

One encoder layer (DETR's encoder, RT-DETR's AIFI), one decoder layer whose cross-attention
is pluggable (dense for DETR, conditional for DAB/DN-DETR, multi-scale deformable for
RT-DETRv2), and one decoder loop that optionally refines reference boxes layer by layer.
All layers are post-norm, as in the three papers; ``normalize_before`` gives DETR's pre-norm.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..boxes import inverse_sigmoid
from .deformable import MSDeformableAttention


def make_activation(name: str) -> nn.Module:
    """Activation module by name: relu, gelu, silu or prelu (learnable, DN-DETR's choice)."""
    acts = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "prelu": nn.PReLU}
    if name not in acts:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(acts)}")
    return acts[name]()


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (DETR's box head, query-pos heads)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


class FeedForward(nn.Module):
    """Position-wise FFN with its residual and norm (post-norm unless ``normalize_before``)."""

    def __init__(
        self, d_model: int, dim_ff: int, dropout: float, activation: str, normalize_before: bool
    ) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_ff)
        self.activation = make_activation(activation)
        self.linear2 = nn.Linear(dim_ff, d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)
        self.normalize_before = normalize_before

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm(x) if self.normalize_before else x
        y = self.linear2(self.dropout1(self.activation(self.linear1(y))))
        x = x + self.dropout2(y)
        return x if self.normalize_before else self.norm(x)


def _with_pos(x: Tensor, pos: Tensor | None) -> Tensor:
    return x if pos is None else x + pos


def sdpa(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None, dropout: float) -> Tensor:
    """``F.scaled_dot_product_attention``, in fp32 on the CPU when given bf16/fp16 (autocast).

    The CPU's reduced-precision attention kernels are slow (measured: the bf16 backward ~20x
    the fp32 one), and these attention maps are small, so the cast costs less than it saves.
    """
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), allowed, dropout)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, allowed, dropout)


def attention(
    attn: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
) -> Tensor:
    """``attn(query, key, value)[0]`` of a batch-first ``nn.MultiheadAttention``, computed directly.

    Same parameters and result as the module, without its per-call overhead in training (mask
    conversion and merging, three separate input GEMMs): when ``query is key`` (self-attention
    with positions added to both) their projections are one GEMM, and the attention itself is
    ``F.scaled_dot_product_attention``. Masks are bool with True = blocked: ``key_padding_mask
    [B,S]``, ``attn_mask [Q,S]``.
    """
    b, q_len, d = query.shape
    h = attn.num_heads
    w, bias = attn.in_proj_weight, attn.in_proj_bias
    if query is key and key is value:
        q, k, v = F.linear(query, w, bias).chunk(3, dim=-1)
    elif query is key:
        q, k = F.linear(query, w[: 2 * d], bias[: 2 * d]).chunk(2, dim=-1)
        v = F.linear(value, w[2 * d :], bias[2 * d :])
    else:
        q = F.linear(query, w[:d], bias[:d])
        k = F.linear(key, w[d : 2 * d], bias[d : 2 * d])
        v = F.linear(value, w[2 * d :], bias[2 * d :])

    def heads(x: Tensor) -> Tensor:  # [B,N,d] -> [B,h,N,d/h]
        return x.unflatten(-1, (h, -1)).transpose(1, 2)

    if key_padding_mask is not None and key_padding_mask.device.type == "cpu":
        # no padding in the batch (toy data, RT-DETR's fixed size): drop the mask, which
        # would otherwise keep SDPA on its slower masked path (a free check on the CPU)
        key_padding_mask = key_padding_mask if bool(key_padding_mask.any()) else None
    allowed = None  # SDPA's bool mask: True = may attend
    if key_padding_mask is not None:
        allowed = ~key_padding_mask[:, None, None, :]
    if attn_mask is not None:
        allowed = ~attn_mask if allowed is None else allowed & ~attn_mask
    out = sdpa(heads(q), heads(k), heads(v), allowed, attn.dropout if attn.training else 0.0)
    return attn.out_proj(out.transpose(1, 2).reshape(b, q_len, d))


class EncoderLayer(nn.Module):
    """Self-attention + FFN over ``[B,S,d]`` tokens; ``pos`` is added to queries and keys only."""

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str = "relu",
        normalize_before: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, dim_feedforward, dropout, activation, normalize_before)
        self.normalize_before = normalize_before

    def forward(
        self, src: Tensor, pos: Tensor | None = None, key_padding_mask: Tensor | None = None
    ) -> Tensor:
        y = self.norm(src) if self.normalize_before else src
        q = k = _with_pos(y, pos)
        y = attention(self.self_attn, q, k, y, key_padding_mask=key_padding_mask)
        src = src + self.dropout(y)
        if not self.normalize_before:
            src = self.norm(src)
        return self.ffn(src)


@dataclass
class Memory:
    """What the decoder attends to: flattened encoder output and its layout.

    ``value [B,S,d]``; ``pos [B,S,d]`` (dense/conditional attention only); ``padding_mask [B,S]``
    True = padding; ``spatial_shapes`` the (h, w) of each level, levels concatenated in order;
    ``valid_ratios [B,L,2]`` the unpadded (w, h) fraction of each level (Deformable DETR):
    deformable cross-attention then maps image-normalised references onto each padded level.
    """

    value: Tensor
    pos: Tensor | None = None
    padding_mask: Tensor | None = None
    spatial_shapes: Sequence[tuple[int, int]] | None = None
    valid_ratios: Tensor | None = None


def refine_boxes(delta: Tensor, ref: Tensor, eps: float = 1e-5) -> Tensor:
    """``sigmoid(delta + logit(ref))``: box-head output ``[...,4]`` on a reference box
    ``[...,4]`` or point ``[...,2]`` (then only the centre has a reference, as in Conditional
    and Deformable DETR). ``eps``: the logit's clamp (``inverse_sigmoid``)."""
    logit = inverse_sigmoid(ref, eps)
    if ref.shape[-1] == 2:
        logit = F.pad(logit, (0, 2))
    return torch.sigmoid(delta + logit)


class DenseCrossAttention(nn.Module):
    """DETR's cross-attention: every query attends to every memory token."""

    def __init__(self, d_model: int, nhead: int, dropout: float) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)

    def forward(
        self,
        query: Tensor,
        query_pos: Tensor | None,
        memory: Memory,
        ref_boxes: Tensor | None = None,
        cross_pos: Tensor | None = None,
    ) -> Tensor:
        return attention(
            self.attn,
            _with_pos(query, query_pos),
            _with_pos(memory.value, memory.pos),
            memory.value,
            key_padding_mask=memory.padding_mask,
        )


class ConditionalCrossAttention(nn.Module):
    """Conditional-DETR / DAB-DETR cross-attention: content and position kept apart per head.

    Each head's query is [content query | projected ``cross_pos``] and its key is
    [content key | projected memory position], so the dot product is the sum of a content and
    a spatial term (scale 1/sqrt(2 d_head)). ``cross_pos`` is the anchor's sine encoding,
    modulated by the predicted width/height (DAB-DETR). Only the first layer also adds the
    query position to the content query and the memory position to the content key.
    """

    def __init__(self, d_model: int, nhead: int, dropout: float, first_layer: bool) -> None:
        super().__init__()
        self.nhead, self.dropout = nhead, dropout
        self.q_content = nn.Linear(d_model, d_model)
        self.q_pos = nn.Linear(d_model, d_model) if first_layer else None
        self.k_content = nn.Linear(d_model, d_model)
        self.k_pos = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.q_sine = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(
        self,
        query: Tensor,
        query_pos: Tensor | None,
        memory: Memory,
        ref_boxes: Tensor | None = None,
        cross_pos: Tensor | None = None,
    ) -> Tensor:
        if memory.pos is None or cross_pos is None:
            raise ValueError("conditional cross-attention needs memory.pos and cross_pos")
        b, q_len, d = query.shape
        h = self.nhead
        q = self.q_content(query)
        k = self.k_content(memory.value)
        k_pos = self.k_pos(memory.pos)
        if self.q_pos is not None:
            q = q + self.q_pos(query_pos)
            k = k + k_pos

        def heads(x: Tensor) -> Tensor:  # [B,N,d] -> [B,h,N,d/h]
            return x.view(x.shape[0], x.shape[1], h, -1).transpose(1, 2)

        q = torch.cat([heads(q), heads(self.q_sine(cross_pos))], -1)  # [B,h,Q,2d/h]
        k = torch.cat([heads(k), heads(k_pos)], -1)  # [B,h,S,2d/h]
        mask = None
        if memory.padding_mask is not None:
            mask = ~memory.padding_mask[:, None, None, :]  # True = may attend
        out = sdpa(q, k, heads(self.v(memory.value)), mask, self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(b, q_len, d))


class DeformableCrossAttention(nn.Module):
    """RT-DETRv2's cross-attention: each query samples a few points per level around its box."""

    def __init__(
        self,
        d_model: int,
        nhead: int,
        num_levels: int,
        num_points: int | Sequence[int] = 4,
        method: str = "default",
    ) -> None:
        super().__init__()
        self.attn = MSDeformableAttention(d_model, nhead, num_levels, num_points, 0.5, method)

    def forward(
        self,
        query: Tensor,
        query_pos: Tensor | None,
        memory: Memory,
        ref_boxes: Tensor | None = None,
        cross_pos: Tensor | None = None,
    ) -> Tensor:
        if ref_boxes is None or memory.spatial_shapes is None:
            raise ValueError("deformable cross-attention needs ref_boxes and memory.spatial_shapes")
        if memory.valid_ratios is not None:  # [B,Q,C] -> [B,Q,L,C] on each level's valid part
            ratios = memory.valid_ratios.repeat(1, 1, ref_boxes.shape[-1] // 2)
            ref_boxes = ref_boxes[:, :, None] * ratios[:, None]
        return self.attn(
            _with_pos(query, query_pos),
            ref_boxes,
            memory.value,
            memory.spatial_shapes,
            memory.padding_mask,
        )


class ContentPositionProjection(nn.Module):
    """Conditional DETR's self-attention inputs: content and position projected apart, then
    summed (``q = W_qc x + W_qp pos``, ``k = W_kc x + W_kp pos``, ``v = W_v x``), before the
    attention's own projections (as the official layer)."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        names = ("q_content", "q_pos", "k_content", "k_pos", "v")
        self.proj = nn.ModuleDict({n: nn.Linear(d_model, d_model) for n in names})

    def forward(self, x: Tensor, pos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        p = self.proj
        q = p["q_content"](x) + p["q_pos"](pos)
        return q, p["k_content"](x) + p["k_pos"](pos), p["v"](x)


class ContentPositionSelfAttention(ContentPositionProjection):
    """DAB-DETR's decoder self-attention: the content/position projections give q, k, v, which
    go straight into multi-head attention (no further input projection), then ``out_proj``.
    Called as ``(x [B,Q,d], pos [B,Q,d], attn_mask [Q,Q] bool True = blocked)``."""

    def __init__(self, d_model: int, nhead: int, dropout: float) -> None:
        super().__init__(d_model)
        # the attributes nn.MultiheadAttention has (read by tests and explain)
        self.embed_dim, self.num_heads, self.dropout = d_model, nhead, dropout
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor, pos: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        b, q_len, d = x.shape

        def heads(t: Tensor) -> Tensor:  # [B,N,d] -> [B,h,N,d/h]
            return t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

        q, k, v = super().forward(x, pos)
        allowed = None if attn_mask is None else ~attn_mask
        out = sdpa(heads(q), heads(k), heads(v), allowed, self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(b, q_len, d))


class DecoderLayer(nn.Module):
    """Self-attention among queries, cross-attention to the memory, FFN.

    ``cross_attn`` is any module called as ``cross_attn(query, query_pos, memory, ref_boxes,
    cross_pos)``; it is what distinguishes DETR, DAB/DN-DETR and RT-DETRv2 decoders.
    ``self_attn_mask`` (bool, True = blocked, ``[Q,Q]``) keeps denoising groups apart.
    ``split_self_attn_proj``: project content and position apart before self-attention
    (``ContentPositionProjection``, Conditional DETR). ``self_attn``: a module replacing the
    standard multi-head self-attention, called as ``self_attn(x, query_pos, attn_mask)``
    (``ContentPositionSelfAttention``, DAB/DN-DETR).
    """

    def __init__(
        self,
        cross_attn: nn.Module,
        d_model: int = 256,
        nhead: int = 8,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str = "relu",
        normalize_before: bool = False,
        split_self_attn_proj: bool = False,
        self_attn: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if self_attn is None:
            self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.self_attn = self_attn
        self.sa_proj = ContentPositionProjection(d_model) if split_self_attn_proj else None
        self.cross_attn = cross_attn
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, dim_feedforward, dropout, activation, normalize_before)
        self.normalize_before = normalize_before

    def forward(
        self,
        tgt: Tensor,
        query_pos: Tensor | None,
        memory: Memory,
        ref_boxes: Tensor | None = None,
        cross_pos: Tensor | None = None,
        self_attn_mask: Tensor | None = None,
    ) -> Tensor:
        pre = self.normalize_before
        y = self.norm1(tgt) if pre else tgt
        if isinstance(self.self_attn, nn.MultiheadAttention):
            q = k = _with_pos(y, query_pos)
            if self.sa_proj is not None and query_pos is not None:
                q, k, y = self.sa_proj(y, query_pos)
            y = attention(self.self_attn, q, k, y, attn_mask=self_attn_mask)
        else:
            y = self.self_attn(y, query_pos, self_attn_mask)
        tgt = tgt + self.dropout1(y)
        if not pre:
            tgt = self.norm1(tgt)
        y = self.norm2(tgt) if pre else tgt
        tgt = tgt + self.dropout2(self.cross_attn(y, query_pos, memory, ref_boxes, cross_pos))
        if not pre:
            tgt = self.norm2(tgt)
        return self.ffn(tgt)


class Decoder(nn.Module):
    """The decoder loop every variant runs.

    Without ``box_heads`` (DETR) the queries carry a fixed ``query_pos`` and boxes are predicted
    afterwards from the returned states. With ``box_heads`` (one per layer; the same module may
    repeat to share it) each layer refines reference boxes: ``box_l = sigmoid(head_l(h_l) +
    logit(ref_l))``, and ``ref_{l+1} = box_l.detach()``. ``query_pos_head(ref, tgt, layer)``
    returns the (self-attention pos or None = keep the given ``query_pos``, cross-attention pos
    or None) of the current references; references may be points ``[B,Q,2]`` (``refine_boxes``).
    ``look_forward_twice`` (DAB/DN-DETR, DINO, RT-DETR) computes box_l in training on the
    undetached ``ref_l`` (the previous layer's refinement), so a layer's loss also trains the
    previous layer's refinement. ``refine_unnormed`` (DAB/DN-DETR, DINO): the next reference is
    refined from the un-normed layer output, the box output from the normed one (``norm``).
    ``eps``: the logit's clamp (DAB/DN-DETR and DINO 1e-3, the others 1e-5).
    """

    def __init__(
        self,
        layers: Sequence[DecoderLayer],
        norm: nn.Module | None = None,
        query_pos_head: nn.Module | None = None,
        box_heads: Sequence[nn.Module] | None = None,
        look_forward_twice: bool = False,
        refine_unnormed: bool = False,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.query_pos_head = query_pos_head
        self.box_heads = None if box_heads is None else nn.ModuleList(box_heads)
        self.look_forward_twice = look_forward_twice
        self.refine_unnormed = refine_unnormed
        self.eps = eps

    def forward(
        self,
        tgt: Tensor,
        memory: Memory,
        query_pos: Tensor | None = None,
        ref_boxes: Tensor | None = None,
        self_attn_mask: Tensor | None = None,
        num_layers: int | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """``tgt [B,Q,d]`` -> (states ``[L,B,Q,d]``, boxes ``[L,B,Q,4]`` or None).

        ``num_layers`` runs only the first layers (RT-DETR's ``eval_idx``: depth cut at inference).
        """
        states, boxes = [], []
        undetached = None  # ref_l before its detach (None for the first layer's given ref)
        for i, layer in enumerate(self.layers[:num_layers]):
            cross_pos = None
            if self.query_pos_head is not None:
                pos, cross_pos = self.query_pos_head(ref_boxes, tgt, i)
                query_pos = query_pos if pos is None else pos
            tgt = layer(tgt, query_pos, memory, ref_boxes, cross_pos, self_attn_mask)
            state = tgt if self.norm is None else self.norm(tgt)
            states.append(state)
            if self.box_heads is not None:
                head = self.box_heads[i]
                delta = head(state)
                box = refine_boxes(delta, ref_boxes, self.eps)  # on this layer's reference
                if self.look_forward_twice and self.training and undetached is not None:
                    boxes.append(refine_boxes(delta, undetached, self.eps))
                else:
                    boxes.append(box)
                if self.refine_unnormed and state is not tgt:
                    box = refine_boxes(head(tgt), ref_boxes, self.eps)
                undetached, ref_boxes = box, box.detach()
        return torch.stack(states), (torch.stack(boxes) if boxes else None)
