"""DN-DETR (Li et al. 2022) on DAB-DETR (Liu et al. 2022): anchor-box queries + denoising.

Differences from DETR, all from the papers / official code:
- queries are learnable 4-D anchors (cx, cy, w, h; stored as logits), refined by every decoder
  layer through a shared box head (offsets in logit space, detached between layers);
- each layer's query position is an MLP of the anchor's sine encoding; cross-attention is
  conditional (content and position apart) and its positional part is modulated by the
  anchor's width and height;
- sigmoid classification (no no-object class) trained with focal loss; the matching queries'
  content is the embedding of an extra "unknown" class plus a 0 indicator bit;
- with ``denoising`` set, noised ground-truth queries (label embedding + 1 indicator bit) run
  through the same decoder under the group attention mask (``denoising.py``).
Documented simplifications (docs/architecture.md): self-attention projects (content + position)
with one matrix per q/k (standard multi-head attention), where DAB-DETR has separate
content/position projections; references are refined from the normed state and detached
before the box output (official: un-normed state, undetached reference in the box output).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..denoising import DenoisingConfig, make_denoising_queries, split_denoising_outputs
from ..nn.backbone import BackboneConfig
from ..nn.outputs import split_layers
from ..nn.position import sine_encoding_of_boxes
from ..nn.transformer import MLP, ConditionalCrossAttention, Decoder, DecoderLayer
from .common import SingleScaleEncoder


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
class DNDETRConfig:
    """DN-DETR's network hyper-parameters (defaults: the official R50 COCO model).

    ``denoising=None`` makes it DAB-DETR. ``pe_temperature``: the sine encodings' temperature
    (DAB-DETR: 20).
    """

    num_classes: int
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    d_model: int = 256
    nhead: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.0
    activation: str = "prelu"
    num_queries: int = 300
    pe_temperature: float = 20.0
    denoising: DenoisingConfig | None = None
    aux_loss: bool = True


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
            )
            for i in range(num_decoder_layers)
        ]
        self.decoder = Decoder(
            layers,
            norm=nn.LayerNorm(d_model),
            query_pos_head=AnchorQueryPosition(d_model),
            box_heads=[self.box_head] * num_decoder_layers,
        )
        # the official Transformer's init: xavier on every matrix of the encoder and decoder
        # (layers, query-scale and anchor heads); the box head, outside it, keeps its zeros
        for part in (self.decoder.layers, self.decoder.query_pos_head, self.encoder.pos_scale):
            for p in part.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        self.anchors = nn.Embedding(cfg.num_queries, 4)  # logits of (cx, cy, w, h)
        # label embedding + 1 indicator bit; index num_classes = "unknown" (matching queries)
        self.label_embed = nn.Embedding(num_classes + 1, d_model - 1)
        self.class_head = nn.Linear(d_model, num_classes)
        nn.init.constant_(self.class_head.bias, -math.log((1 - 0.01) / 0.01))

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
            tgt = torch.cat([self.content(dn.labels, 1.0), tgt], 1)
            ref = torch.cat([dn.boxes, ref], 1)
        hs, boxes = self.decoder(
            tgt, memory, ref_boxes=ref, self_attn_mask=None if dn is None else dn.attn_mask
        )
        logits = self.class_head(hs)  # [L,B,N+Q,C]
        if dn is None:
            return split_layers(logits, boxes, self.aux_loss)
        (logits, boxes), dn_outputs = split_denoising_outputs(
            logits, boxes, dn.meta.num_queries, self.aux_loss
        )
        out = split_layers(logits, boxes, self.aux_loss)
        out["dn_outputs"], out["dn_meta"] = dn_outputs, dn.meta
        return out
