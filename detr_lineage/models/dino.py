"""DINO (Zhang et al. 2022): the Deformable DETR body with three additions.

- contrastive denoising (``denoising.py``, ``contrastive``): positive and negative noised
  ground-truth queries, content = label embedding, reference = the noised box;
- mixed query selection (``nn/multiscale.py: QuerySelection``): the top-k encoder tokens give
  the queries' reference boxes (detached), their content is learned (``tgt_embed``);
- look-forward-twice (``Decoder(look_forward_twice=True)``): a layer's box is computed on the
  previous layer's undetached box, so its loss also trains that box.
Query positions are an MLP of the reference box's sine encoding (DAB-DETR), recomputed per
layer; one class head and one box head serve every decoder layer (the encoder has its own).
As the official (IDEA-Research/DINO): the next reference is refined from the un-normed layer
output, the box output from the normed one (``refine_unnormed``); box logits clamp at 1e-3
(its ``inverse_sigmoid``), the noised boxes included; padding slots of the denoising groups
have zero content.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..boxes import inverse_sigmoid
from ..denoising import DenoisingConfig, detector_outputs, make_denoising_queries
from ..nn.multiscale import QuerySelection
from ..nn.position import sine_encoding_of_boxes
from ..nn.transformer import MLP, Decoder
from .common import DeformableConfig, deformable_body, deformable_decoder_layers, focal_heads

LOGIT_EPS = 1e-3  # the official DINO's inverse_sigmoid clamp


def dino_denoising() -> DenoisingConfig:
    """DINO's contrastive denoising: dn_number 100, label_noise_ratio 0.5 (a label flips with
    probability 0.25), box_noise_scale 0.4 (DINO_4scale.py)."""
    return DenoisingConfig(query_budget=100, label_noise=0.25, box_noise=0.4, contrastive=True)


@dataclass
class DINOConfig(DeformableConfig):
    """DINO-4scale's network hyper-parameters (defaults: the official R50 model): the
    Deformable DETR body's (``DeformableConfig``) with DINO's FFN, dropout and query count.

    ``denoising=None`` turns contrastive denoising off. ``pe_temperature``: the encoder's sine
    positions (DINO: 20).
    """

    dim_feedforward: int = 2048
    dropout: float = 0.0
    num_queries: int = 900
    pe_temperature: float = 20.0
    denoising: DenoisingConfig | None = field(default_factory=dino_denoising)


class SineBoxQueryPosition(nn.Module):
    """DINO (DAB-Deformable-DETR): query position = MLP of the box's sine encoding."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.d_model = d_model
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)

    def forward(self, ref: Tensor, tgt: Tensor, layer: int) -> tuple[Tensor, None]:
        return self.ref_point_head(sine_encoding_of_boxes(ref, self.d_model // 2)), None


class DINONet(nn.Module):
    """DINO-4scale."""

    def __init__(self, cfg: DINOConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.num_classes, self.num_queries = cfg.num_classes, cfg.num_queries
        self.denoising, self.aux_loss = cfg.denoising, cfg.aux_loss
        self.backbone, self.encoder = deformable_body(cfg, cfg.pe_temperature)
        self.selection = QuerySelection(d, cfg.num_classes)
        self.tgt_embed = nn.Embedding(cfg.num_queries, d)
        nn.init.normal_(self.tgt_embed.weight)
        self.class_head, self.box_head = focal_heads(d, cfg.num_classes)
        n = cfg.num_decoder_layers
        self.decoder = Decoder(
            deformable_decoder_layers(cfg),
            norm=nn.LayerNorm(d),
            query_pos_head=SineBoxQueryPosition(d),
            box_heads=[self.box_head] * n,
            look_forward_twice=True,
            refine_unnormed=True,
            eps=LOGIT_EPS,
        )
        # last row: padding slots of the denoising groups (zeros, never trained)
        self.label_embed = nn.Embedding(cfg.num_classes + 1, d, padding_idx=cfg.num_classes)

    def forward(self, images: Tensor, masks: Tensor, targets: list[dict] | None = None) -> dict:
        """-> ``pred_logits [B,K,C]``, ``pred_boxes``, aux, ``enc_outputs``; with DN, ``dn_*``."""
        memory = self.encoder(self.backbone(images, masks), masks)
        _, box_logits, enc = self.selection(memory, self.num_queries)
        ref = box_logits.sigmoid()
        tgt = self.tgt_embed.weight[None, : ref.shape[1]].expand(ref.shape[0], -1, -1)
        dn = None
        if self.training and targets is not None and self.denoising is not None:
            dn = make_denoising_queries(targets, self.denoising, self.num_classes, ref.shape[1])
            tgt = torch.cat([self.label_embed(dn.labels), tgt], 1)
            dn_ref = inverse_sigmoid(dn.boxes.to(ref.dtype), LOGIT_EPS).sigmoid()
            ref = torch.cat([dn_ref, ref], 1)
        hs, boxes = self.decoder(
            tgt, memory, ref_boxes=ref, self_attn_mask=None if dn is None else dn.attn_mask
        )
        logits = self.class_head(hs)
        return detector_outputs(logits, boxes, self.aux_loss, dn, enc if self.training else None)
