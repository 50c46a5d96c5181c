"""Conditional DETR (Meng et al. 2021): DETR whose cross-attention finds its region faster.

What differs from ``models/detr.py``, all from the paper / official code:
- each learned query position gives a reference point ``s = sigmoid(MLP(query_pos))``
  (``ref_point_head``), fixed across layers; every layer's box is predicted around it
  (the box head's centre offset is added to ``logit(s)``);
- the conditional spatial query: the sine encoding of ``s``, scaled element-wise by
  ``query_scale(decoder content)`` (identity at the first layer), forms the spatial half of the
  cross-attention query (``ConditionalCrossAttention``: content and spatial parts are kept
  apart per head); only the first layer adds the query position to the content query;
- sigmoid classification with focal loss, 300 queries.
Self-attention projects content and position apart (``split_self_attn_proj``) as the
official layer does. Documented simplification: the official layer also holds a query-position
projection for cross-attention in layers 2-6, unused there; ours has it in layer 1 only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..nn.outputs import split_layers
from ..nn.position import sine_encoding_of_boxes
from ..nn.transformer import MLP, ConditionalCrossAttention, Decoder, refine_boxes
from .common import (
    SingleScaleEncoder,
    TransformerConfig,
    decoder_layers,
    focal_heads,
    xavier_init_,
)


@dataclass
class ConditionalDETRConfig(TransformerConfig):
    """Conditional DETR's network hyper-parameters (defaults: the paper's R50 model; DETR's
    but for the query count)."""

    num_queries: int = 300


class ConditionalSpatialQuery(nn.Module):
    """The cross-attention's spatial query: ``sine(s) * query_scale(content)`` (layer 0: x1).

    Returns None as the self-attention position: the learned query position stays.
    """

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.d_model = d_model
        self.query_scale = MLP(d_model, d_model, d_model, 2)

    def forward(self, ref: Tensor, tgt: Tensor, layer: int) -> tuple[None, Tensor]:
        sine = sine_encoding_of_boxes(ref, self.d_model // 2).to(tgt.dtype)  # (y, x) parts
        return None, sine if layer == 0 else sine * self.query_scale(tgt)


class ConditionalDETRNet(nn.Module):
    """Conditional DETR: DETR's encoder, conditional cross-attention, focal classification."""

    def __init__(self, cfg: ConditionalDETRConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, h, ff, dropout = cfg.d_model, cfg.nhead, cfg.dim_feedforward, cfg.dropout
        self.num_classes, self.num_queries, self.aux_loss = (
            cfg.num_classes,
            cfg.num_queries,
            cfg.aux_loss,
        )
        self.encoder = SingleScaleEncoder(cfg.backbone, d, h, cfg.num_encoder_layers, ff, dropout)
        self.decoder = Decoder(
            decoder_layers(
                cfg,
                lambda i: ConditionalCrossAttention(d, h, dropout, i == 0),
                split_self_attn_proj=True,
            ),
            norm=nn.LayerNorm(d),
            query_pos_head=ConditionalSpatialQuery(d),
        )
        xavier_init_(self.decoder.layers)
        self.query_embed = nn.Embedding(cfg.num_queries, d)
        self.ref_point_head = MLP(d, d, 2, 2)
        self.class_head, self.box_head = focal_heads(d, cfg.num_classes)

    def forward(self, images: Tensor, masks: Tensor, targets: list[dict] | None = None) -> dict:
        """-> ``pred_logits [B,Q,C]`` (sigmoid), ``pred_boxes [B,Q,4]``, aux."""
        memory = self.encoder(images, masks)
        query_pos = self.query_embed.weight[None].expand(images.shape[0], -1, -1)
        ref = self.ref_point_head(query_pos).sigmoid()  # [B,Q,2] (x, y)
        hs, _ = self.decoder(torch.zeros_like(query_pos), memory, query_pos, ref_boxes=ref)
        boxes = refine_boxes(self.box_head(hs), ref)  # [L,B,Q,4]
        return split_layers(self.class_head(hs), boxes, self.aux_loss)
