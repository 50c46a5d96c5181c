"""Denoising queries, shared by DN-DETR (positive groups) and RT-DETRv2 (contrastive groups).

During training, noised copies of the ground truth are fed to the decoder next to the
matching queries; each denoising query must reconstruct the clean box (and class) of the
object it was made from, so its loss needs no matching. The attention mask keeps the
matching queries blind to them (else they could copy the answer), and the groups blind to
each other. Layout of the decoder input: ``[denoising (G groups x S slots) | matching (Q)]``.

A group has one slot per ground-truth object of the image with the most objects (``M``);
contrastive groups add ``M`` negative slots after the positives (``S = 2M``). Slots of images
with fewer objects are padding: unsupervised, and fed a neutral box (logit 0) and label
``num_classes``. Everything is built with batched tensor operations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from .boxes import cxcywh_to_xyxy, xyxy_to_cxcywh
from .nn.outputs import split_layers


@dataclass
class DenoisingConfig:
    """How the denoising queries are made (YAML: ``denoising: null`` turns denoising off).

    groups: number of groups (DN-DETR: 5). Ignored when ``query_budget`` is set.
    query_budget: RT-DETR/DINO style: ``groups = max(1, query_budget // M)`` (official: 100).
    label_noise: probability that a query's label is replaced by a uniformly drawn class
        (DN-DETR 0.2; RT-DETR flips with probability label_noise_ratio / 2 = 0.25).
    box_noise: the box noise scale (DN-DETR lambda1 = lambda2 = 0.4; RT-DETR 1.0).
    contrastive: add a negative query per positive, farther from its object and trained
        toward no-object (DINO / RT-DETR contrastive denoising).
    """

    groups: int = 5
    query_budget: int | None = None
    label_noise: float = 0.2
    box_noise: float = 0.4
    contrastive: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.label_noise <= 1.0:
            raise ValueError(f"denoising.label_noise must be in [0, 1], got {self.label_noise}")
        if self.box_noise < 0:
            raise ValueError(f"denoising.box_noise must be >= 0, got {self.box_noise}")
        if self.groups < 1:
            raise ValueError(f"denoising.groups must be >= 1, got {self.groups}")


@dataclass
class DenoisingMeta:
    """What the criterion needs to score the denoising queries without matching.

    indices: per image, (query index within the denoising block, target index) of positives.
    class_mask: ``[B, num_queries]`` queries whose class loss counts, or None for all of them
        (contrastive: negatives and padding are trained toward no-object).
    """

    num_groups: int
    slots_per_group: int
    num_queries: int
    indices: list[tuple[Tensor, Tensor]]
    class_mask: Tensor | None


@dataclass
class DenoisingQueries:
    labels: Tensor  # [B, N] long, noised; padding = num_classes
    boxes: Tensor  # [B, N, 4] noised cxcywh in (0, 1), padding = 0.5
    attn_mask: Tensor  # [N + Q, N + Q] bool, True = may not attend
    meta: DenoisingMeta


def attention_mask(num_groups: int, slots: int, num_matching: int, device=None) -> Tensor:
    """``[N+Q, N+Q]`` (True = blocked): groups see only themselves, matching sees no group."""
    n = num_groups * slots
    group = torch.arange(n, device=device) // slots
    mask = torch.zeros(n + num_matching, n + num_matching, dtype=torch.bool, device=device)
    mask[:n, :n] = group[:, None] != group[None, :]
    mask[n:, :n] = True
    return mask


def make_denoising_queries(
    targets: list[dict],
    cfg: DenoisingConfig,
    num_classes: int,
    num_matching: int,
    generator: torch.Generator | None = None,
) -> DenoisingQueries:
    """Noised copies of the targets, their attention mask and the loss bookkeeping.

    A batch without any object gets one padding group of unsupervised slots, so every process
    runs the same graph (an empty rank must not leave the others waiting in all-reduce).
    """
    device = targets[0]["boxes"].device
    counts = torch.tensor([len(t["labels"]) for t in targets], device=device)
    m = max(int(counts.max()), 1) if len(targets) else 1
    groups = cfg.groups if cfg.query_budget is None else max(1, cfg.query_budget // m)
    b = len(targets)
    labels = pad_sequence([t["labels"] for t in targets], batch_first=True, padding_value=0)
    boxes = pad_sequence([t["boxes"].float() for t in targets], batch_first=True)
    labels, boxes = labels[:, :m], boxes[:, :m]
    if labels.shape[1] < m:  # all images empty
        labels = labels.new_zeros(b, m)
        boxes = boxes.new_zeros(b, m, 4)
    valid = torch.arange(m, device=device)[None, :] < counts[:, None]  # [B,M]

    parts = 2 if cfg.contrastive else 1
    # [B, G, parts, M] layout, flattened to slots: group-major, positives then negatives
    labels = labels[:, None, None, :].expand(b, groups, parts, m)
    boxes = boxes[:, None, None, :, :].expand(b, groups, parts, m, 4)
    valid = valid[:, None, None, :].expand(b, groups, parts, m)
    negative = torch.zeros(parts, dtype=torch.bool, device=device)
    negative[1:] = True
    negative = negative[None, None, :, None].expand(b, groups, parts, m)

    flip = torch.rand(labels.shape, device=device, generator=generator) < cfg.label_noise
    random_labels = torch.randint(0, num_classes, labels.shape, device=device, generator=generator)
    noisy_labels = torch.where(flip, random_labels, labels)
    noisy_boxes = noise_boxes(boxes, cfg, negative, generator)

    noisy_labels = torch.where(valid, noisy_labels, num_classes).reshape(b, -1)
    noisy_boxes = torch.where(valid[..., None], noisy_boxes, 0.5).reshape(b, -1, 4)
    slots = parts * m

    # positives of image i: slot g*S + k <-> target k, for every group g
    positive_slots = torch.arange(groups, device=device)[:, None] * slots
    indices = []
    for n in counts.tolist():
        k = torch.arange(n, device=device)
        indices.append(((positive_slots + k[None, :]).flatten(), k.repeat(groups)))
    class_mask = None if cfg.contrastive else (valid & ~negative).reshape(b, -1)
    meta = DenoisingMeta(groups, slots, groups * slots, indices, class_mask)
    mask = attention_mask(groups, slots, num_matching, device)
    return DenoisingQueries(noisy_labels, noisy_boxes, mask, meta)


def noise_boxes(
    boxes: Tensor, cfg: DenoisingConfig, negative: Tensor, generator: torch.Generator | None
) -> Tensor:
    """Noised cxcywh boxes in [0, 1].

    DN-DETR: the centre moves by up to ``box_noise * (w/2, h/2)`` and each side is scaled by a
    factor in ``[1 - box_noise, 1 + box_noise]``. Contrastive (DINO/RT-DETR): each corner
    moves by ``r * box_noise * (w/2, h/2)`` with ``|r| < 1`` for positives and ``1 <= |r| < 2``
    for negatives, so negatives land farther from the object.
    """
    if cfg.box_noise == 0:
        return boxes.clone()
    wh = boxes[..., 2:]
    u = torch.rand(boxes.shape, device=boxes.device, generator=generator)
    if not cfg.contrastive:
        diff = torch.cat([wh / 2, wh], -1)
        noisy = boxes + (2 * u - 1) * diff * cfg.box_noise
        return noisy.clamp(0.0, 1.0)
    sign = torch.randint(0, 2, boxes.shape, device=boxes.device, generator=generator) * 2 - 1
    magnitude = u + negative[..., None].to(u.dtype)
    diff = torch.cat([wh / 2, wh / 2], -1)
    xyxy = cxcywh_to_xyxy(boxes) + sign * magnitude * diff * cfg.box_noise
    return xyxy_to_cxcywh(xyxy.clamp(0.0, 1.0)).clamp(0.0, 1.0)  # crossed corners: w = 0


def split_denoising_outputs(
    logits: Tensor, boxes: Tensor, num_dn: int, aux: bool = True
) -> tuple[tuple[Tensor, Tensor], dict]:
    """Per-layer ``[L,B,N+Q,*]`` -> (matching part ``[L,B,Q,*]`` x2, denoising outputs dict).

    ``aux=False`` (the network's ``aux_loss`` off): the earlier layers' denoising outputs are
    left out too, as DN-DETR computes its denoising loss on auxiliary layers only with aux loss.
    """
    dn = split_layers(logits[:, :, :num_dn], boxes[:, :, :num_dn], aux)
    return (logits[:, :, num_dn:], boxes[:, :, num_dn:]), dn


def detector_outputs(
    logits: Tensor,
    boxes: Tensor,
    aux: bool,
    dn: DenoisingQueries | None = None,
    enc_outputs: dict | None = None,
) -> dict:
    """Per-layer decoder outputs ``[L,B,N+Q,*]`` (``N`` = 0 without ``dn``) -> what the criterion
    reads: the matching queries' last layer (``pred_logits``, ``pred_boxes``) and earlier layers
    (``aux_outputs`` when ``aux``), ``enc_outputs`` when given (the encoder's proposals), and
    with ``dn`` the denoising queries' outputs (``dn_outputs``) and ``dn_meta``."""
    if dn is not None:
        (logits, boxes), dn_outputs = split_denoising_outputs(
            logits, boxes, dn.meta.num_queries, aux
        )
    out = split_layers(logits, boxes, aux)
    if enc_outputs is not None:
        out["enc_outputs"] = enc_outputs
    if dn is not None:
        out["dn_outputs"], out["dn_meta"] = dn_outputs, dn.meta
    return out


__all__ = [
    "DenoisingConfig",
    "DenoisingMeta",
    "DenoisingQueries",
    "attention_mask",
    "detector_outputs",
    "make_denoising_queries",
    "noise_boxes",
    "split_denoising_outputs",
]
