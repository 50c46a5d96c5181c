"""Vanilla DETR (Carion et al. 2020): CNN -> 1x1 projection -> transformer -> set predictions.

Optionally with denoising queries (the DN-DETR idea on vanilla DETR, as in the course's
exercise; not in the DETR paper): ``denoising=None`` (the default) is DETR as published.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..denoising import DenoisingConfig, detector_outputs, make_denoising_queries
from ..nn.position import sine_encoding_of_boxes
from ..nn.transformer import MLP, Decoder, DenseCrossAttention
from .common import SingleScaleEncoder, TransformerConfig, decoder_layers, xavier_init_

DN_COMBINE = ("sum", "concat")


class DenoisingQueryPosition(nn.Module):
    """Positional part of a denoising query: its (noisy) label and its noisy box.

    ``label [B,N]`` -> a label embedding (``num_classes + 1`` rows; the last is the padding
    slot's label), ``box [B,N,4]`` cxcywh -> the sine encoding of each coordinate (DETR's
    feature-map encoding: temperature 10000, scale 2 pi, ``d_model / 2`` features per
    coordinate) projected linearly to ``d_model``. ``combine``: ``sum`` adds the two;
    ``concat`` projects [label embedding, box encoding] together. The default ``sum`` is the
    form DETR already uses (positions added to the queries and keys), costs no extra width, and
    gives the label and the box their own learned directions in the same space.
    """

    def __init__(self, num_classes: int, d_model: int, combine: str = "sum") -> None:
        super().__init__()
        if combine not in DN_COMBINE:
            raise ValueError(f"dn_combine must be one of {DN_COMBINE}, got {combine!r}")
        self.combine, self.d_model = combine, d_model
        self.label_embed = nn.Embedding(num_classes + 1, d_model)
        box_dim = 2 * d_model  # 4 coordinates x d_model / 2 features
        in_dim = box_dim if combine == "sum" else box_dim + d_model
        self.proj = nn.Linear(in_dim, d_model)

    def forward(self, labels: Tensor, boxes: Tensor) -> Tensor:
        sine = sine_encoding_of_boxes(boxes, self.d_model // 2).to(self.proj.weight.dtype)
        label = self.label_embed(labels)
        if self.combine == "sum":
            return label + self.proj(sine)
        return self.proj(torch.cat([label, sine], -1))


@dataclass
class DETRConfig(TransformerConfig):
    """DETR's network hyper-parameters (defaults: the paper's COCO R50 model).

    ``pre_norm``: pre-LayerNorm layers (the paper: post-norm). ``denoising`` (None: the paper)
    adds DN-DETR's denoising queries; ``dn_combine`` (``sum`` | ``concat``) combines a denoising
    query's label embedding and projected box encoding.
    """

    pre_norm: bool = False
    denoising: DenoisingConfig | None = None
    dn_combine: str = "sum"


class DETRNet(nn.Module):
    """DETR as published: post-norm encoder/decoder, learned query positions, shared heads.

    The decoder input starts at zero; the ``num_queries`` learned embeddings are the query
    positions added at every layer. The class head has ``num_classes + 1`` outputs (the last is
    no-object); the 3-layer box MLP predicts sigmoid cxcywh. A final LayerNorm is applied to every
    decoder layer's output before the shared heads, which give the auxiliary outputs.

    With ``denoising`` set, training adds noised ground-truth queries (``denoising.py``): content
    zero like the matching queries, position ``DenoisingQueryPosition`` (``dn_combine``), under
    the group attention mask in self-attention; inference is unchanged.
    """

    def __init__(self, cfg: DETRConfig) -> None:
        super().__init__()
        self.cfg = cfg
        num_classes, d_model, nhead, dropout = cfg.num_classes, cfg.d_model, cfg.nhead, cfg.dropout
        dim_feedforward, pre_norm, denoising = cfg.dim_feedforward, cfg.pre_norm, cfg.denoising
        self.encoder = SingleScaleEncoder(
            cfg.backbone,
            d_model,
            nhead,
            cfg.num_encoder_layers,
            dim_feedforward,
            dropout,
            pre_norm=pre_norm,
        )
        self.decoder = Decoder(
            decoder_layers(
                cfg,
                lambda _: DenseCrossAttention(d_model, nhead, dropout),
                normalize_before=pre_norm,
            ),
            norm=nn.LayerNorm(d_model),
        )
        xavier_init_(self.decoder.layers)
        self.query_embed = nn.Embedding(cfg.num_queries, d_model)
        self.class_head = nn.Linear(d_model, num_classes + 1)
        self.box_head = MLP(d_model, d_model, 4, 3)
        self.num_classes, self.num_queries = num_classes, cfg.num_queries
        self.aux_loss, self.denoising = cfg.aux_loss, denoising
        self.dn_query_pos = (
            None
            if denoising is None
            else DenoisingQueryPosition(num_classes, d_model, cfg.dn_combine)
        )

    def forward(self, images: Tensor, masks: Tensor, targets: list[dict] | None = None) -> dict:
        """``images [B,3,H,W]``, ``masks [B,H,W]`` -> ``pred_logits [B,Q,C+1]``, ``pred_boxes``,
        aux; in training with denoising also ``dn_outputs``, ``dn_meta``."""
        memory = self.encoder(images, masks)
        query_pos = self.query_embed.weight[None].expand(images.shape[0], -1, -1)
        dn = None
        if self.training and targets is not None and self.dn_query_pos is not None:
            dn = make_denoising_queries(targets, self.denoising, self.num_classes, self.num_queries)
            dn_pos = self.dn_query_pos(dn.labels, dn.boxes).to(query_pos.dtype)
            query_pos = torch.cat([dn_pos, query_pos], 1)
        hs, _ = self.decoder(
            torch.zeros_like(query_pos),
            memory,
            query_pos,
            self_attn_mask=None if dn is None else dn.attn_mask,
        )  # [L,B,N+Q,d]
        # boxes in fp32 under bf16 autocast too
        logits, boxes = self.class_head(hs), self.box_head(hs).float().sigmoid()
        return detector_outputs(logits, boxes, self.aux_loss, dn)
