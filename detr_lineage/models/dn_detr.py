"""DN-DETR (Li et al. 2022) on DAB-DETR (Liu et al. 2022): anchor-box queries + denoising.

Differences from DETR, all from the papers / official code (IDEA-Research/DN-DETR, whose
checkpoints convert tensor for tensor: ``convert.py``):
- queries are learnable 4-D anchors (cx, cy, w, h; stored as logits), refined by every decoder
  layer through a shared box head: the next reference is refined from the un-normed layer
  output and detached; a layer's box output is refined from the normed output on its
  *undetached* reference, so its loss also trains the previous refinement (``Decoder``'s
  ``look_forward_twice`` + ``refine_unnormed``); logits clamp at 1e-3;
- each layer's query position is an MLP of the anchor's sine encoding; self-attention projects
  content and position apart (``ContentPositionSelfAttention``); cross-attention is conditional
  (content and position apart) and its positional part is modulated by the anchor's width and
  height;
- sigmoid classification (no no-object class) trained with focal loss; the matching queries'
  content is the embedding of an extra "unknown" class plus a 0 indicator bit;
- with ``denoising`` set, noised ground-truth queries (label embedding + 1 indicator bit; padding
  slots all zeros) run through the same decoder under the group attention mask
  (``denoising.py``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..boxes import inverse_sigmoid
from ..denoising import DenoisingConfig, detector_outputs, make_denoising_queries
from ..nn.position import sine_encoding_of_boxes
from ..nn.transformer import (
    MLP,
    ConditionalCrossAttention,
    ContentPositionSelfAttention,
    Decoder,
    DecoderLayer,
)
from .common import SingleScaleEncoder, TransformerConfig, xavier_init_

LOGIT_EPS = 1e-3  # the official DN-DETR / DAB-DETR inverse_sigmoid clamp


def _refuse_old_decoder(module: nn.Module, state: Mapping, prefix: str, *args) -> None:
    """Load pre-hook: a checkpoint of the earlier decoder (one q/k/v in-projection) is refused."""
    key = f"{prefix}decoder.layers.0.self_attn.in_proj_weight"
    if key in state:
        raise ValueError(
            f"{key}: this DN-DETR checkpoint was written before the decoder followed the "
            "official DN-DETR (separate content/position self-attention projections, boxes on "
            "undetached references); its weights do not fit this version. Retrain it, or use "
            "an older detr_lineage to read it."
        )


class AnchorQueryPosition(nn.Module):
    """DAB-DETR: anchor boxes -> (self-attention query position, modulated cross position)."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.d_model = d_model
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.query_scale = MLP(d_model, d_model, d_model, 2)
        self.ref_anchor_head = MLP(d_model, d_model, 2, 2)

    def forward(self, ref: Tensor, tgt: Tensor, layer: int) -> tuple[Tensor, Tensor]:
        """``ref [B,Q,4]`` (sigmoid cxcywh), ``tgt [B,Q,d]`` -> two ``[B,Q,d]`` positions."""
        d = self.d_model
        sine = sine_encoding_of_boxes(ref, d // 2)  # [B,Q,2d]: (cy, cx, w, h) parts
        query_pos = self.ref_point_head(sine)
        cross = sine[..., :d]
        if layer > 0:
            cross = cross * self.query_scale(tgt)
        hw = self.ref_anchor_head(tgt).sigmoid()  # [B,Q,2] reference (w, h)
        y_part = cross[..., : d // 2] * (hw[..., 1] / ref[..., 3])[..., None]
        x_part = cross[..., d // 2 :] * (hw[..., 0] / ref[..., 2])[..., None]
        return query_pos, torch.cat([y_part, x_part], -1)


@dataclass
class DNDETRConfig(TransformerConfig):
    """DN-DETR's network hyper-parameters (defaults: the official R50 COCO model).

    ``denoising=None`` makes it DAB-DETR. ``pe_temperature``: the sine encodings' temperature
    (DAB-DETR: 20).
    """

    dropout: float = 0.0
    num_queries: int = 300
    activation: str = "prelu"
    pe_temperature: float = 20.0
    denoising: DenoisingConfig | None = None


class DNDETRNet(nn.Module):
    """DN-DETR network; ``denoising=None`` makes it DAB-DETR."""

    def __init__(self, cfg: DNDETRConfig) -> None:
        super().__init__()
        self.cfg = cfg
        num_classes, d_model, nhead, dropout = cfg.num_classes, cfg.d_model, cfg.nhead, cfg.dropout
        dim_feedforward, activation = cfg.dim_feedforward, cfg.activation
        num_decoder_layers = cfg.num_decoder_layers
        self.num_classes, self.num_queries = num_classes, cfg.num_queries
        self.denoising, self.aux_loss = cfg.denoising, cfg.aux_loss
        self.encoder = SingleScaleEncoder(
            cfg.backbone,
            d_model,
            nhead,
            cfg.num_encoder_layers,
            dim_feedforward,
            dropout,
            activation,
            pe_temperature=cfg.pe_temperature,
            scale_pos=True,
        )
        self.box_head = MLP(d_model, d_model, 4, 3)  # shared by all layers
        nn.init.zeros_(self.box_head.layers[-1].weight)
        nn.init.zeros_(self.box_head.layers[-1].bias)
        layers = [
            DecoderLayer(
                ConditionalCrossAttention(d_model, nhead, dropout, first_layer=i == 0),
                d_model,
                nhead,
                dim_feedforward,
                dropout,
                activation,
                self_attn=ContentPositionSelfAttention(d_model, nhead, dropout),
            )
            for i in range(num_decoder_layers)
        ]
        self.decoder = Decoder(
            layers,
            norm=nn.LayerNorm(d_model),
            query_pos_head=AnchorQueryPosition(d_model),
            box_heads=[self.box_head] * num_decoder_layers,
            look_forward_twice=True,
            refine_unnormed=True,
            eps=LOGIT_EPS,
        )
        # the official Transformer's init: xavier on every matrix of the encoder and decoder
        # (layers, query-scale and anchor heads), zero attention output biases; the box head,
        # outside it, keeps its zeros
        xavier_init_([*layers, self.decoder.query_pos_head, self.encoder.pos_scale])
        for layer in layers:
            nn.init.zeros_(layer.self_attn.out_proj.bias)
            nn.init.zeros_(layer.cross_attn.out_proj.bias)
        self.anchors = nn.Embedding(cfg.num_queries, 4)  # logits of (cx, cy, w, h)
        # label embedding + 1 indicator bit; index num_classes = "unknown" (matching queries)
        self.label_embed = nn.Embedding(num_classes + 1, d_model - 1)
        self.class_head = nn.Linear(d_model, num_classes)
        nn.init.constant_(self.class_head.bias, -math.log((1 - 0.01) / 0.01))
        self.register_load_state_dict_pre_hook(_refuse_old_decoder)

    def content(self, labels: Tensor, indicator: float) -> Tensor:
        """Label embedding ``[..., d-1]`` + indicator bit (1 = denoising, 0 = matching)."""
        emb = self.label_embed(labels)
        return torch.cat([emb, emb.new_full((*emb.shape[:-1], 1), indicator)], -1)

    def forward(self, images: Tensor, masks: Tensor, targets: list[dict] | None = None) -> dict:
        """-> ``pred_logits [B,Q,C]``, ``pred_boxes [B,Q,4]``, aux; in training + DN, dn_*."""
        memory = self.encoder(images, masks)
        b = images.shape[0]
        unknown = torch.full((b, self.num_queries), self.num_classes, device=images.device)
        tgt = self.content(unknown, 0.0)  # [B,Q,d]
        ref = self.anchors.weight.sigmoid()[None].expand(b, -1, -1)  # [B,Q,4]
        dn = None
        if self.training and targets is not None and self.denoising is not None:
            dn = make_denoising_queries(targets, self.denoising, self.num_classes, self.num_queries)
            padding = (dn.labels == self.num_classes)[..., None]  # slots of no object: zeros
            tgt = torch.cat([self.content(dn.labels, 1.0).masked_fill(padding, 0.0), tgt], 1)
            # the official feeds the noised boxes in as logits: clamped by inverse_sigmoid
            dn_ref = inverse_sigmoid(dn.boxes.to(ref.dtype), LOGIT_EPS).sigmoid()
            ref = torch.cat([dn_ref, ref], 1)
        hs, boxes = self.decoder(
            tgt, memory, ref_boxes=ref, self_attn_mask=None if dn is None else dn.attn_mask
        )
        return detector_outputs(self.class_head(hs), boxes, self.aux_loss, dn)
