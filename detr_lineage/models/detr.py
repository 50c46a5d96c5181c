"""Vanilla DETR (Carion et al. 2020): CNN -> 1x1 projection -> transformer -> set predictions."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..nn.backbone import BackboneConfig
from ..nn.transformer import MLP, Decoder, DecoderLayer, DenseCrossAttention
from .common import SingleScaleEncoder, split_layers


class DETRNet(nn.Module):
    """DETR as published: post-norm encoder/decoder, learned query positions, shared heads.

    The decoder input starts at zero; the ``num_queries`` learned embeddings are the query
    positions added at every layer. The class head has ``num_classes + 1`` outputs (the last is
    no-object); the 3-layer box MLP predicts sigmoid cxcywh. A final LayerNorm is applied to every
    decoder layer's output before the shared heads, which give the auxiliary outputs.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: BackboneConfig | None = None,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        num_queries: int = 100,
        pre_norm: bool = False,
        aux_loss: bool = True,
    ) -> None:
        super().__init__()
        self.encoder = SingleScaleEncoder(
            backbone or BackboneConfig(),
            d_model,
            nhead,
            num_encoder_layers,
            dim_feedforward,
            dropout,
            pre_norm=pre_norm,
        )
        self.decoder = Decoder(
            [
                DecoderLayer(
                    DenseCrossAttention(d_model, nhead, dropout),
                    d_model,
                    nhead,
                    dim_feedforward,
                    dropout,
                    "relu",
                    pre_norm,
                )
                for _ in range(num_decoder_layers)
            ],
            norm=nn.LayerNorm(d_model),
        )
        for p in self.decoder.layers.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        self.query_embed = nn.Embedding(num_queries, d_model)
        self.class_head = nn.Linear(d_model, num_classes + 1)
        self.box_head = MLP(d_model, d_model, 4, 3)
        self.num_queries = num_queries
        self.aux_loss = aux_loss

    def forward(self, images: Tensor, masks: Tensor, targets: list[dict] | None = None) -> dict:
        """``images [B,3,H,W]``, ``masks [B,H,W]`` -> ``pred_logits [B,Q,C+1]``, ``pred_boxes``."""
        memory = self.encoder(images, masks)
        query_pos = self.query_embed.weight[None].expand(images.shape[0], -1, -1)
        hs, _ = self.decoder(torch.zeros_like(query_pos), memory, query_pos)  # [L,B,Q,d]
        return split_layers(self.class_head(hs), self.box_head(hs).sigmoid(), self.aux_loss)
