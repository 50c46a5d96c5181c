"""Deformable DETR (Zhu et al. 2020): multi-scale deformable attention in encoder and decoder.

Read file by file: backbone (strides 8/16/32) -> ``nn/multiscale.py`` (4 levels, the 4th by a
stride-2 conv; deformable encoder; ``Memory`` with valid ratios) -> decoder (``nn/transformer.py``:
self-attention, ``DeformableCrossAttention`` around each query's reference point) -> heads.
Queries: a learned (position, content) pair each; the reference point is a linear map of the
position. Switches: ``box_refine`` (each layer refines the previous layer's box with its own
heads) and ``two_stage`` (queries from the encoder's top-scoring tokens, ``QuerySelection``).

Documented simplification: the two-stage encoder head is trained class-aware on the real
labels and tokens are ranked by their best class (as DINO / RT-DETR), where the official
trains it class-agnostic (all labels 0) and ranks by that one logit.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..nn.multiscale import QuerySelection
from ..nn.outputs import split_layers
from ..nn.position import sine_encoding_of_boxes
from ..nn.transformer import Decoder, refine_boxes
from .common import DeformableConfig, deformable_body, deformable_decoder_layers, focal_heads


@dataclass
class DeformableDETRConfig(DeformableConfig):
    """Deformable DETR's network hyper-parameters (defaults: the paper's R50 model): the body's
    (``DeformableConfig``) and the two switches."""

    box_refine: bool = False
    two_stage: bool = False


class DeformableDETRNet(nn.Module):
    """Deformable DETR; ``box_refine`` / ``two_stage`` as in the paper's Table 1 rows."""

    def __init__(self, cfg: DeformableDETRConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.num_classes, self.num_queries, self.aux_loss = (
            cfg.num_classes,
            cfg.num_queries,
            cfg.aux_loss,
        )
        self.backbone, self.encoder = deformable_body(cfg)
        class_head, box_head = focal_heads(d, cfg.num_classes)
        n = cfg.num_decoder_layers
        # box refinement: one (class, box) head pair per layer; else one pair shared by all
        copies = (lambda m: [copy.deepcopy(m) for _ in range(n)]) if cfg.box_refine else None
        self.class_heads = nn.ModuleList(copies(class_head) if copies else [class_head] * n)
        self.box_heads = nn.ModuleList(copies(box_head) if copies else [box_head] * n)
        self.decoder = Decoder(
            deformable_decoder_layers(cfg), box_heads=self.box_heads if cfg.box_refine else None
        )
        if cfg.two_stage:
            self.selection = QuerySelection(d, cfg.num_classes)
            self.pos_trans = nn.Sequential(nn.Linear(2 * d, 2 * d), nn.LayerNorm(2 * d))
        else:
            self.query_embed = nn.Embedding(cfg.num_queries, 2 * d)  # (position, content)
            self.reference_points = nn.Linear(d, 2)
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1)
            nn.init.zeros_(self.reference_points.bias)

    def queries(self, memory, batch: int) -> tuple[Tensor, Tensor, Tensor, dict | None]:
        """-> (content ``[B,Q,d]``, position ``[B,Q,d]``, reference ``[B,Q,2|4]``, enc preds)."""
        d = self.cfg.d_model
        if not self.cfg.two_stage:
            pos, content = self.query_embed.weight[None].expand(batch, -1, -1).split(d, -1)
            return content, pos, self.reference_points(pos).sigmoid(), None
        _, box_logits, enc = self.selection(memory, self.num_queries)
        boxes = box_logits.sigmoid()
        pos, content = self.pos_trans(sine_encoding_of_boxes(boxes, d // 2)).split(d, -1)
        return content, pos, boxes, enc

    def forward(self, images: Tensor, masks: Tensor, targets: list[dict] | None = None) -> dict:
        """-> ``pred_logits [B,Q,C]``, ``pred_boxes``, aux; two-stage adds ``enc_outputs``."""
        memory = self.encoder(self.backbone(images, masks), masks)
        content, pos, ref, enc = self.queries(memory, images.shape[0])
        hs, boxes = self.decoder(content, memory, query_pos=pos, ref_boxes=ref)
        if boxes is None:  # no refinement: every layer's box on the initial reference
            boxes = torch.stack([refine_boxes(head(h), ref) for head, h in zip(self.box_heads, hs)])
        logits = torch.stack([head(h) for head, h in zip(self.class_heads, hs)])
        out = split_layers(logits, boxes, self.aux_loss)
        if enc is not None and self.training:
            out["enc_outputs"] = enc
        return out
