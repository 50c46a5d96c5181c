"""Vanilla DETR (Carion et al. 2020): CNN -> 1x1 projection -> transformer -> set predictions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.backbone import BackboneConfig, build_backbone
from ..nn.position import sine_position_encoding_2d
from ..nn.transformer import (
    MLP,
    Decoder,
    DecoderLayer,
    DenseCrossAttention,
    EncoderLayer,
    Memory,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DetectionNet(nn.Module):
    """What every variant's network shares: input normalisation and the single-scale input path.

    Images arrive in [0, 1] (data contract); each network normalises with its own statistics.
    """

    def __init__(
        self, backbone: BackboneConfig, pixel_mean: tuple | None, pixel_std: tuple | None
    ) -> None:
        super().__init__()
        self.backbone = build_backbone(backbone)
        mean = torch.tensor(pixel_mean or (0.0, 0.0, 0.0)).view(1, 3, 1, 1)
        std = torch.tensor(pixel_std or (1.0, 1.0, 1.0)).view(1, 3, 1, 1)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)

    def features(self, images: Tensor) -> list[Tensor]:
        return self.backbone((images - self.pixel_mean) / self.pixel_std)


def downsample_mask(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """Padding mask ``[B,H,W]`` -> ``[B,h,w]`` at a feature map's size (nearest)."""
    return F.interpolate(masks[:, None].float(), size=size).to(torch.bool)[:, 0]


def split_layers(logits: Tensor, boxes: Tensor, aux: bool = True) -> dict:
    """Per-layer ``[L,B,Q,*]`` outputs -> last layer's dict, earlier ones in ``aux_outputs``."""
    out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
    if aux:
        out["aux_outputs"] = [
            {"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])
        ]
    return out


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
        self.stem = DetectionNet(backbone or BackboneConfig(), IMAGENET_MEAN, IMAGENET_STD)
        self.input_proj = nn.Conv2d(self.stem.backbone.out_channels[-1], d_model, 1)
        layer_args = (d_model, nhead, dim_feedforward, dropout, "relu", pre_norm)
        self.encoder = nn.ModuleList(EncoderLayer(*layer_args) for _ in range(num_encoder_layers))
        self.encoder_norm = nn.LayerNorm(d_model) if pre_norm else None
        self.decoder = Decoder(
            [
                DecoderLayer(DenseCrossAttention(d_model, nhead, dropout), *layer_args)
                for _ in range(num_decoder_layers)
            ],
            norm=nn.LayerNorm(d_model),
        )
        self.query_embed = nn.Embedding(num_queries, d_model)
        self.class_head = nn.Linear(d_model, num_classes + 1)
        self.box_head = MLP(d_model, d_model, 4, 3)
        self.num_queries = num_queries
        self.aux_loss = aux_loss
        self._reset_transformer_parameters()

    def _reset_transformer_parameters(self) -> None:
        for part in (self.encoder, self.decoder.layers):
            for p in part.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)

    def encode(self, images: Tensor, masks: Tensor) -> Memory:
        """Backbone + encoder -> the flattened memory ``[B,HW,d]`` with its positions and mask."""
        feat = self.stem.features(images)[-1]  # [B,C,h,w]
        mask = downsample_mask(masks, feat.shape[-2:])  # [B,h,w]
        pos = sine_position_encoding_2d(mask, self.query_embed.embedding_dim // 2)
        src = self.input_proj(feat).flatten(2).transpose(1, 2)  # [B,hw,d]
        pos = pos.flatten(2).transpose(1, 2).to(src.dtype)
        key_mask = mask.flatten(1)
        for layer in self.encoder:
            src = layer(src, pos, key_mask)
        if self.encoder_norm is not None:
            src = self.encoder_norm(src)
        return Memory(src, pos, key_mask, [tuple(feat.shape[-2:])])

    def forward(self, images: Tensor, masks: Tensor, targets: list[dict] | None = None) -> dict:
        """``images [B,3,H,W]``, ``masks [B,H,W]`` -> ``pred_logits [B,Q,C+1]``, ``pred_boxes``."""
        memory = self.encode(images, masks)
        b = images.shape[0]
        query_pos = self.query_embed.weight[None].expand(b, -1, -1)
        hs, _ = self.decoder(torch.zeros_like(query_pos), memory, query_pos)  # [L,B,Q,d]
        return split_layers(self.class_head(hs), self.box_head(hs).sigmoid(), self.aux_loss)
