"""Parts the variants share: the transformer hyper-parameters every variant has (one dataclass,
each variant's config subclasses it and redeclares only what its paper changes), input
normalisation, the single-scale encoder, decoder layers, and the pieces Deformable DETR and DINO
share (multi-scale config, trunk and encoder; focal heads)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.backbone import BackboneConfig, build_backbone
from ..nn.multiscale import MultiScaleDeformableEncoder
from ..nn.position import sine_position_encoding_2d
from ..nn.transformer import MLP, DecoderLayer, DeformableCrossAttention, EncoderLayer, Memory

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class TransformerConfig:
    """What every encoder-decoder variant declares (defaults: DETR's R50 model). A variant's
    config subclasses it, redeclares the defaults its paper changes and adds its own fields."""

    num_classes: int
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    d_model: int = 256
    nhead: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    num_queries: int = 100
    aux_loss: bool = True


class NormalizedBackbone(nn.Module):
    """A trunk that normalises its input with its own statistics.

    Images arrive in [0, 1] (data contract): DETR and DN-DETR use ImageNet mean/std, RT-DETR
    none (``pixel_mean=None``), as their official code does. With ``masks`` (True = padding)
    the padded pixels are 0 after normalisation, as in the official DETR, which pads the
    normalised images (the collate pads in [0, 1], where 0 would become -mean/std).
    """

    def __init__(
        self, cfg: BackboneConfig, pixel_mean: tuple | None, pixel_std: tuple | None
    ) -> None:
        super().__init__()
        self.body = build_backbone(cfg)
        self.out_channels: list[int] = self.body.out_channels
        self.strides: list[int] = self.body.strides
        mean = torch.tensor(pixel_mean or (0.0, 0.0, 0.0)).view(1, 3, 1, 1)
        std = torch.tensor(pixel_std or (1.0, 1.0, 1.0)).view(1, 3, 1, 1)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)

    def forward(self, images: Tensor, masks: Tensor | None = None) -> list[Tensor]:
        x = (images - self.pixel_mean) / self.pixel_std
        if masks is not None:
            x = x.masked_fill(masks[:, None], 0.0)
        return self.body(x)


def downsample_mask(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """Padding mask ``[B,H,W]`` -> ``[B,h,w]`` at a feature map's size (nearest)."""
    return F.interpolate(masks[:, None].float(), size=size).to(torch.bool)[:, 0]


class SingleScaleEncoder(nn.Module):
    """DETR / DAB-DETR front end: last backbone map -> 1x1 conv -> transformer encoder -> Memory.

    ``scale_pos`` is DAB-DETR's encoder detail: each layer's position embedding is scaled
    element-wise by an MLP of the current tokens. ``pe_temperature`` is 10000 in DETR, 20 in DAB.
    """

    def __init__(
        self,
        backbone: BackboneConfig,
        d_model: int,
        nhead: int,
        num_layers: int,
        dim_feedforward: int,
        dropout: float,
        activation: str = "relu",
        pre_norm: bool = False,
        pe_temperature: float = 10000.0,
        scale_pos: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = NormalizedBackbone(backbone, IMAGENET_MEAN, IMAGENET_STD)
        self.input_proj = nn.Conv2d(self.backbone.out_channels[-1], d_model, 1)
        self.layers = nn.ModuleList(
            EncoderLayer(d_model, nhead, dim_feedforward, dropout, activation, pre_norm)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model) if pre_norm else None
        self.pos_scale = MLP(d_model, d_model, d_model, 2) if scale_pos else None
        self.d_model, self.pe_temperature = d_model, pe_temperature
        for p in self.layers.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, images: Tensor, masks: Tensor) -> Memory:
        """``images [B,3,H,W]``, ``masks [B,H,W]`` -> memory ``[B,hw,d]`` with positions, mask."""
        feat = self.backbone(images, masks)[-1]  # [B,C,h,w]
        mask = downsample_mask(masks, feat.shape[-2:])  # [B,h,w]
        pos = sine_position_encoding_2d(mask, self.d_model // 2, self.pe_temperature)
        src = self.input_proj(feat).flatten(2).transpose(1, 2)  # [B,hw,d]
        pos = pos.flatten(2).transpose(1, 2).to(src.dtype)
        key_mask = mask.flatten(1)
        for layer in self.layers:
            layer_pos = pos if self.pos_scale is None else pos * self.pos_scale(src)
            src = layer(src, layer_pos, key_mask)
        if self.norm is not None:
            src = self.norm(src)
        return Memory(src, pos, key_mask, [tuple(feat.shape[-2:])])


def decoder_layers(
    cfg: TransformerConfig, cross_attention: Callable[[int], nn.Module], **layer_kwargs
) -> list[DecoderLayer]:
    """``cfg.num_decoder_layers`` decoder layers at ``cfg``'s width, heads, FFN and dropout,
    layer ``i`` with ``cross_attention(i)``; ``layer_kwargs``: the rest of ``DecoderLayer``'s
    arguments. Initialise them with ``xavier_init_`` (after building what the official code
    builds before that, so that a seed draws the same weights)."""
    return [
        DecoderLayer(
            cross_attention(i),
            cfg.d_model,
            cfg.nhead,
            cfg.dim_feedforward,
            cfg.dropout,
            **layer_kwargs,
        )
        for i in range(cfg.num_decoder_layers)
    ]


def xavier_init_(layers: Iterable[nn.Module], cross_attention: bool = True) -> None:
    """Every weight matrix of ``layers`` xavier-uniform, in parameter order; the
    cross-attention's (``layer.cross_attn``) only with ``cross_attention`` (deformable
    attention keeps its own init)."""
    for layer in layers:
        skip = set() if cross_attention else set(layer.cross_attn.parameters())
        for p in layer.parameters():
            if p.dim() > 1 and p not in skip:
                nn.init.xavier_uniform_(p)


def multiscale_backbone() -> BackboneConfig:
    """ResNet-50, strides 8/16/32 (C3-C5), layer2-4 trained, frozen BN (Deformable DETR, DINO)."""
    return BackboneConfig(name="resnet50", return_strides=[8, 16, 32])


@dataclass
class DeformableConfig(TransformerConfig):
    """The Deformable DETR body's hyper-parameters, shared with DINO (defaults: Deformable
    DETR's R50 model): ``num_levels`` feature levels (the trunk's, then stride-2 convs),
    ``num_points`` sampling points per level and head in encoder and decoder."""

    backbone: BackboneConfig = field(default_factory=multiscale_backbone)
    dim_feedforward: int = 1024
    num_queries: int = 300
    num_levels: int = 4
    num_points: int = 4


def deformable_body(
    cfg: DeformableConfig, pe_temperature: float = 10000.0
) -> tuple[nn.Module, nn.Module]:
    """Deformable DETR / DINO's trunk (ImageNet-normalised) and multi-scale deformable encoder."""
    backbone = NormalizedBackbone(cfg.backbone, IMAGENET_MEAN, IMAGENET_STD)
    encoder = MultiScaleDeformableEncoder(
        backbone.out_channels,
        cfg.d_model,
        cfg.nhead,
        cfg.num_levels,
        cfg.num_points,
        cfg.num_encoder_layers,
        cfg.dim_feedforward,
        cfg.dropout,
        pe_temperature=pe_temperature,
    )
    return backbone, encoder


def deformable_decoder_layers(cfg: DeformableConfig) -> list[DecoderLayer]:
    """Deformable DETR / DINO decoder layers: self-attention, deformable cross-attention, FFN
    (xavier init but for the deformable attention's own)."""

    def cross_attention(_: int) -> nn.Module:
        return DeformableCrossAttention(cfg.d_model, cfg.nhead, cfg.num_levels, cfg.num_points)

    layers = decoder_layers(cfg, cross_attention)
    xavier_init_(layers, cross_attention=False)
    return layers


def focal_heads(d_model: int, num_classes: int) -> tuple[nn.Linear, MLP]:
    """Class head with the focal prior bias (0.01) and box MLP with a zero last layer."""
    class_head = nn.Linear(d_model, num_classes)
    nn.init.constant_(class_head.bias, -math.log((1 - 0.01) / 0.01))
    box_head = MLP(d_model, d_model, 4, 3)
    nn.init.zeros_(box_head.layers[-1].weight)
    nn.init.zeros_(box_head.layers[-1].bias)
    return class_head, box_head
