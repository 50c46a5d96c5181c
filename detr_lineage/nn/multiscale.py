"""Deformable DETR's multi-scale front end, shared by Deformable DETR and DINO.

Backbone maps (strides 8/16/32) -> one ``d_model`` map per level (1x1 conv + GroupNorm; the
extra levels by a 3x3 stride-2 conv + GroupNorm on the last backbone map, then on the previous
extra level) -> per-level padding masks, sine positions + a learned level embedding -> a
deformable encoder (each token samples a few points per level around its own centre) ->
``Memory`` with ``valid_ratios``. ``encoder_proposals`` turns every memory token into an anchor
box for two-stage query selection (Deformable DETR two-stage, DINO).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .deformable import MSDeformableAttention
from .position import sine_position_encoding_2d
from .transformer import MLP, FeedForward, Memory, _with_pos


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with Deformable DETR's 32 groups (fewer when ``channels`` is not divisible)."""
    return nn.GroupNorm(math.gcd(32, channels), channels)


def valid_ratios(masks: Sequence[Tensor]) -> Tensor:
    """Per level ``[B,h,w]`` padding masks -> ``[B,L,2]`` unpadded fraction (w, h) of each."""
    ratios = []
    for mask in masks:
        h, w = mask.shape[-2:]
        valid_h = (~mask[:, :, 0]).sum(1).float() / h
        valid_w = (~mask[:, 0, :]).sum(1).float() / w
        ratios.append(torch.stack([valid_w, valid_h], -1))
    return torch.stack(ratios, 1)


def encoder_reference_points(shapes: Sequence[tuple[int, int]], ratios: Tensor) -> Tensor:
    """Each token's centre as a reference on every level ``[B,S,L,2]`` (x, y in [0, 1] of the
    padded maps): the centre is normalised by its own level's valid size, then mapped onto each
    level's valid part."""
    refs = []
    for level, (h, w) in enumerate(shapes):
        y, x = torch.meshgrid(
            torch.arange(h, device=ratios.device, dtype=torch.float32) + 0.5,
            torch.arange(w, device=ratios.device, dtype=torch.float32) + 0.5,
            indexing="ij",
        )
        x = x.reshape(1, -1) / (ratios[:, level, 0:1] * w)
        y = y.reshape(1, -1) / (ratios[:, level, 1:2] * h)
        refs.append(torch.stack([x, y], -1))  # [B,hw,2]
    return torch.cat(refs, 1)[:, :, None] * ratios[:, None]


class DeformableEncoderLayer(nn.Module):
    """Multi-scale deformable self-attention + FFN (post-norm), Deformable DETR's encoder layer."""

    def __init__(
        self,
        d_model: int,
        nhead: int,
        num_levels: int,
        num_points: int,
        dim_feedforward: int,
        dropout: float,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.self_attn = MSDeformableAttention(d_model, nhead, num_levels, num_points)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, dim_feedforward, dropout, activation, False)

    def forward(self, src: Tensor, pos: Tensor, ref: Tensor, memory: Memory) -> Tensor:
        y = self.self_attn(
            _with_pos(src, pos), ref, src, memory.spatial_shapes, memory.padding_mask
        )
        return self.ffn(self.norm(src + self.dropout(y)))


class MultiScaleDeformableEncoder(nn.Module):
    """Backbone maps -> ``num_levels`` projected maps -> deformable encoder -> ``Memory``.

    ``in_channels``: the backbone maps' channels (finest first); levels beyond them are made
    by stride-2 convs. ``pe_temperature``: the sine positions' temperature (Deformable DETR
    10000, DINO 20).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        d_model: int,
        nhead: int,
        num_levels: int,
        num_points: int,
        num_layers: int,
        dim_feedforward: int,
        dropout: float,
        activation: str = "relu",
        pe_temperature: float = 10000.0,
    ) -> None:
        super().__init__()
        if num_levels < len(in_channels):
            raise ValueError(f"num_levels {num_levels} < the {len(in_channels)} backbone maps")
        extra = num_levels - len(in_channels)
        self.input_proj = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(c, d_model, 1), group_norm(d_model)) for c in in_channels]
            + [
                nn.Sequential(
                    nn.Conv2d(in_channels[-1] if i == 0 else d_model, d_model, 3, 2, 1),
                    group_norm(d_model),
                )
                for i in range(extra)
            ]
        )
        self.level_embed = nn.Parameter(torch.empty(num_levels, d_model))
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(
                d_model, nhead, num_levels, num_points, dim_feedforward, dropout, activation
            )
            for _ in range(num_layers)
        )
        self.d_model, self.pe_temperature = d_model, pe_temperature
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
        for layer in self.layers:  # xavier on the FFN; deformable attention keeps its own init
            for p in layer.ffn.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        nn.init.normal_(self.level_embed)

    def forward(self, feats: Sequence[Tensor], masks: Tensor) -> Memory:
        """Backbone maps ``[B,C_l,h_l,w_l]`` and the image padding mask ``[B,H,W]`` (True =
        padding) -> memory ``[B,S,d]`` with positions, padding mask, shapes, valid ratios."""
        maps = [proj(f) for proj, f in zip(self.input_proj, feats)]
        for proj in self.input_proj[len(feats) :]:
            maps.append(proj(feats[-1] if len(maps) == len(feats) else maps[-1]))
        level_masks = [
            F.interpolate(masks[:, None].float(), size=m.shape[-2:]).to(torch.bool)[:, 0]
            for m in maps
        ]
        shapes = [tuple(m.shape[-2:]) for m in maps]
        src = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1)  # [B,S,d]
        pos = torch.cat(
            [
                sine_position_encoding_2d(mask, self.d_model // 2, self.pe_temperature)
                .flatten(2)
                .transpose(1, 2)
                + self.level_embed[level]
                for level, mask in enumerate(level_masks)
            ],
            1,
        ).to(src.dtype)
        ratios = valid_ratios(level_masks)
        memory = Memory(src, pos, torch.cat([m.flatten(1) for m in level_masks], 1), shapes, ratios)
        ref = encoder_reference_points(shapes, ratios).to(src.dtype)
        for layer in self.layers:
            src = layer(src, pos, ref, memory)
        memory.value = src
        return memory


def encoder_proposals(memory: Memory, size: float = 0.05) -> tuple[Tensor, Tensor]:
    """One anchor per memory token for two-stage query selection (Deformable DETR, DINO).

    -> (anchor logits ``[B,S,4]``: centre = the token's cell centre in the image's valid part,
    sides ``size * 2**level``; tokens on padding or with an anchor within 0.01 of the border
    get +inf; ``keep [B,S,1]``: the other tokens, whose memory the heads read).
    """
    if memory.spatial_shapes is None or memory.valid_ratios is None:
        raise ValueError("encoder_proposals needs memory.spatial_shapes and valid_ratios")
    proposals = []
    for level, (h, w) in enumerate(memory.spatial_shapes):
        y, x = torch.meshgrid(
            torch.arange(h, device=memory.value.device, dtype=torch.float32),
            torch.arange(w, device=memory.value.device, dtype=torch.float32),
            indexing="ij",
        )
        valid_wh = memory.valid_ratios[:, level] * memory.valid_ratios.new_tensor([w, h])
        xy = (torch.stack([x, y], -1).reshape(1, -1, 2) + 0.5) / valid_wh[:, None]
        wh = torch.full_like(xy, size * 2.0**level)
        proposals.append(torch.cat([xy, wh], -1))
    anchors = torch.cat(proposals, 1)  # [B,S,4]
    keep = ((anchors > 0.01) & (anchors < 0.99)).all(-1, keepdim=True)
    if memory.padding_mask is not None:
        keep = keep & ~memory.padding_mask[..., None]
    logits = torch.log(anchors / (1 - anchors))
    return logits.masked_fill(~keep, float("inf")), keep


class QuerySelection(nn.Module):
    """Two-stage query selection: every memory token predicts a class and a box on its anchor
    (``encoder_proposals``), and the top ``k`` tokens by their best class logit become queries.

    ``forward(memory, k)`` -> (selected tokens ``[B,k,d]``, their box logits ``[B,k,4]``,
    detached, and the encoder predictions ``{"pred_logits", "pred_boxes"}`` of the selected
    tokens, which the criterion trains as ``enc_outputs``).
    """

    def __init__(self, d_model: int, num_classes: int) -> None:
        super().__init__()
        self.enc_output = nn.Sequential(nn.Linear(d_model, d_model), nn.LayerNorm(d_model))
        self.enc_score_head = nn.Linear(d_model, num_classes)
        self.enc_bbox_head = MLP(d_model, d_model, 4, 3)
        nn.init.constant_(self.enc_score_head.bias, -math.log((1 - 0.01) / 0.01))
        nn.init.zeros_(self.enc_bbox_head.layers[-1].weight)
        nn.init.zeros_(self.enc_bbox_head.layers[-1].bias)

    def forward(self, memory: Memory, k: int) -> tuple[Tensor, Tensor, dict]:
        anchors, keep = encoder_proposals(memory)
        tokens = self.enc_output(memory.value * keep)  # [B,S,d]
        logits = self.enc_score_head(tokens)
        box_logits = self.enc_bbox_head(tokens) + anchors
        idx = logits.max(-1).values.topk(min(k, tokens.shape[1]), dim=1).indices  # [B,k]

        def take(x: Tensor) -> Tensor:
            return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))

        top_boxes = take(box_logits)
        enc = {"pred_logits": take(logits), "pred_boxes": top_boxes.sigmoid()}
        return take(tokens), top_boxes.detach(), enc
