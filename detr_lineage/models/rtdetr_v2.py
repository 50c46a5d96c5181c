"""RT-DETRv2 (Lv et al. 2024), read file by file:

backbone (``nn/resnet_vd.py``, strides 8/16/32) -> hybrid encoder (``nn/hybrid_encoder.py``:
AIFI on stride 32, CCFF fusion) -> flattened multi-scale memory -> query selection (here:
per-token class/box heads over anchors, top-k tokens become the initial content and boxes)
-> decoder (``nn/transformer.py``: self-attention, deformable cross-attention from
``nn/deformable.py``, box refinement per layer) -> per-layer class/box heads.
In training, contrastive denoising queries (``denoising.py``) join the decoder input.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..denoising import DenoisingConfig, detector_outputs, make_denoising_queries
from ..nn.backbone import BackboneConfig
from ..nn.hybrid_encoder import HybridEncoder
from ..nn.transformer import MLP, Decoder, DecoderLayer, DeformableCrossAttention, Memory
from .common import NormalizedBackbone


def default_backbone() -> BackboneConfig:
    """RT-DETRv2-L's trunk: ResNet-50-vd, strides 8/16/32, stem frozen, frozen BN."""
    return BackboneConfig(name="resnet50vd", return_strides=[8, 16, 32], freeze_at=0)


def make_anchors(
    shapes: Sequence[tuple[int, int]], device: torch.device, size: float = 0.05, eps: float = 0.01
) -> tuple[Tensor, Tensor]:
    """One anchor per memory token: (logit of cxcywh ``[1,S,4]``, valid ``[1,S,1]``).

    Centres are the cell centres; sides are ``size * 2**level``. Anchors reaching within
    ``eps`` of the border are invalid (logit = inf, their tokens are zeroed), as officially.
    """
    anchors = []
    for level, (h, w) in enumerate(shapes):
        gy, gx = torch.meshgrid(
            torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij"
        )
        xy = (torch.stack([gx, gy], -1).float() + 0.5) / torch.tensor([w, h], device=device)
        wh = torch.full_like(xy, size * 2.0**level)
        anchors.append(torch.cat([xy, wh], -1).reshape(-1, 4))
    anchors = torch.cat(anchors)[None]  # [1,S,4]
    valid = ((anchors > eps) & (anchors < 1 - eps)).all(-1, keepdim=True)
    logits = torch.log(anchors / (1 - anchors))
    return torch.where(valid, logits, torch.inf), valid


class BoxQueryPosition(nn.Module):
    """RT-DETR: query position = MLP of the current reference box (no cross position)."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.mlp = MLP(4, 2 * d_model, d_model, 2)

    def forward(self, ref: Tensor, tgt: Tensor, layer: int) -> tuple[Tensor, None]:
        return self.mlp(ref), None


@dataclass
class RTDETRv2Config:
    """RT-DETRv2's network hyper-parameters. Defaults are the L model (R50-vd); see the COCO
    configs for S/M*/X.

    ``encoder_dim`` is the hybrid encoder's width (X: 384); the decoder works at ``hidden_dim``
    (256 in every official size). ``num_points``: sampling points per level in the decoder's
    deformable cross-attention; ``cross_attn_method``: ``default`` (bilinear) | ``discrete``.
    ``eval_idx``: the decoder layer whose output is the prediction at inference (-1: last).
    ``denoising=None`` turns contrastive denoising off.
    """

    num_classes: int
    backbone: BackboneConfig = field(default_factory=default_backbone)
    hidden_dim: int = 256
    nhead: int = 8
    encoder_dim: int = 256
    encoder_dim_feedforward: int = 1024
    num_encoder_layers: int = 1
    expansion: float = 1.0
    depth_mult: float = 1.0
    num_queries: int = 300
    num_decoder_layers: int = 6
    dim_feedforward: int = 1024
    dropout: float = 0.0
    num_points: list[int] = field(default_factory=lambda: [4, 4, 4])
    cross_attn_method: str = "default"
    eval_idx: int = -1
    denoising: DenoisingConfig | None = None
    aux_loss: bool = True


class RTDETRv2Net(nn.Module):
    """RT-DETRv2: the decoder is reached through a 1x1 conv + BN per level."""

    def __init__(self, cfg: RTDETRv2Config) -> None:
        super().__init__()
        self.cfg = cfg
        num_classes, hidden_dim, nhead = cfg.num_classes, cfg.hidden_dim, cfg.nhead
        encoder_dim, num_decoder_layers = cfg.encoder_dim, cfg.num_decoder_layers
        self.num_classes, self.num_queries = num_classes, cfg.num_queries
        self.denoising, self.aux_loss = cfg.denoising, cfg.aux_loss
        self.backbone = NormalizedBackbone(cfg.backbone, None, None)
        self.encoder = HybridEncoder(
            self.backbone.out_channels,
            encoder_dim,
            nhead,
            cfg.encoder_dim_feedforward,
            cfg.dropout,
            num_encoder_layers=cfg.num_encoder_layers,
            expansion=cfg.expansion,
            depth_mult=cfg.depth_mult,
            strides=self.backbone.strides,
        )
        num_levels = len(self.backbone.out_channels)
        self.input_proj = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(encoder_dim, hidden_dim, 1, bias=False), nn.BatchNorm2d(hidden_dim)
            )
            for _ in range(num_levels)
        )
        # query selection heads over the encoder tokens
        self.enc_output = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.LayerNorm(hidden_dim))
        self.enc_score_head = nn.Linear(hidden_dim, num_classes)
        self.enc_bbox_head = MLP(hidden_dim, hidden_dim, 4, 3)
        # decoder with one class / box head per layer
        self.dec_score_heads = nn.ModuleList(
            nn.Linear(hidden_dim, num_classes) for _ in range(num_decoder_layers)
        )
        self.dec_bbox_heads = nn.ModuleList(
            MLP(hidden_dim, hidden_dim, 4, 3) for _ in range(num_decoder_layers)
        )
        layers = [
            DecoderLayer(
                DeformableCrossAttention(
                    hidden_dim, nhead, num_levels, list(cfg.num_points), cfg.cross_attn_method
                ),
                hidden_dim,
                nhead,
                cfg.dim_feedforward,
                cfg.dropout,
                "relu",
            )
            for _ in range(num_decoder_layers)
        ]
        self.decoder = Decoder(
            layers,
            query_pos_head=BoxQueryPosition(hidden_dim),
            box_heads=self.dec_bbox_heads,
            look_forward_twice=True,
        )
        self.eval_layers = num_decoder_layers if cfg.eval_idx < 0 else cfg.eval_idx + 1
        self.denoising_class_embed = nn.Embedding(
            num_classes + 1, hidden_dim, padding_idx=num_classes
        )
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        prior = -math.log((1 - 0.01) / 0.01)
        for head in [self.enc_score_head, *self.dec_score_heads]:
            nn.init.constant_(head.bias, prior)
        for head in [self.enc_bbox_head, *self.dec_bbox_heads]:
            nn.init.zeros_(head.layers[-1].weight)
            nn.init.zeros_(head.layers[-1].bias)
        nn.init.xavier_uniform_(self.enc_output[0].weight)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight)
        for linear in self.decoder.query_pos_head.mlp.layers:
            nn.init.xavier_uniform_(linear.weight)
        for layer in self.decoder.layers:  # the official decoder layer's FFN init
            nn.init.xavier_uniform_(layer.ffn.linear1.weight)
            nn.init.xavier_uniform_(layer.ffn.linear2.weight)

    def memory(self, images: Tensor) -> Memory:
        """Backbone + hybrid encoder -> flattened multi-scale memory ``[B,S,d]``."""
        feats = self.encoder(self.backbone(images))
        maps = [proj(f) for proj, f in zip(self.input_proj, feats)]
        shapes = [tuple(m.shape[-2:]) for m in maps]
        value = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1)
        return Memory(value, spatial_shapes=shapes)

    def select_queries(self, memory: Memory) -> tuple[Tensor, Tensor, dict]:
        """Top-k encoder tokens -> (content ``[B,K,d]``, boxes ``[B,K,4]``, their predictions).

        Content and boxes are detached: the decoder refines them, the encoder heads are trained
        by their own loss (``enc_outputs``).
        """
        anchors, valid = make_anchors(memory.spatial_shapes, memory.value.device)
        tokens = self.enc_output(memory.value * valid)  # [B,S,d]
        logits = self.enc_score_head(tokens)  # [B,S,C]
        box_logits = self.enc_bbox_head(tokens) + anchors  # [B,S,4]
        k = min(self.num_queries, tokens.shape[1])
        idx = logits.max(-1).values.topk(k, dim=1).indices  # [B,K]

        def take(x: Tensor) -> Tensor:
            return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))

        boxes = take(box_logits).sigmoid()
        enc = {"pred_logits": take(logits), "pred_boxes": boxes}
        return take(tokens).detach(), boxes.detach(), enc

    def forward(self, images: Tensor, masks: Tensor, targets: list[dict] | None = None) -> dict:
        """-> ``pred_logits [B,K,C]``, ``pred_boxes``, aux, ``enc_outputs``; with DN, ``dn_*``."""
        memory = self.memory(images)
        tgt, ref, enc = self.select_queries(memory)
        dn = None
        if self.training and targets is not None and self.denoising is not None:
            dn = make_denoising_queries(targets, self.denoising, self.num_classes, tgt.shape[1])
            tgt = torch.cat([self.denoising_class_embed(dn.labels), tgt], 1)
            ref = torch.cat([dn.boxes, ref], 1)
        hs, boxes = self.decoder(
            tgt,
            memory,
            ref_boxes=ref,
            self_attn_mask=None if dn is None else dn.attn_mask,
            num_layers=None if self.training else self.eval_layers,
        )
        logits = torch.stack([head(h) for head, h in zip(self.dec_score_heads, hs)])
        return detector_outputs(logits, boxes, self.aux_loss, dn, enc if self.training else None)

    def deploy(self) -> RTDETRv2Net:
        """Inference-only network: RepVGG blocks fused, denoising parts dropped, eval mode."""
        self.eval()
        self.encoder.deploy()
        self.denoising = None
        self.denoising_class_embed = None
        del self.dec_score_heads[self.eval_layers :], self.decoder.layers[self.eval_layers :]
        return self
