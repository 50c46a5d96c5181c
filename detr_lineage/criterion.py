"""The one set loss: Hungarian-matched class + L1 + GIoU terms for every output of every variant.

``SetCriterion`` applies the same three terms to the last decoder layer, to each earlier layer
(``aux_outputs``), to RT-DETR's encoder proposals (``enc_outputs``) and to the denoising queries
(``dn_outputs``, with the assignment known in advance instead of matched). Terms come back
already weighted under names every variant shares, e.g. ``loss_giou``, ``loss_class_aux0``,
``loss_enc_bbox``, ``loss_dn_giou``; their sum is ``loss``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from .boxes import cxcywh_to_xyxy, paired_giou, paired_iou
from .matcher import HungarianMatcher, Indices

CLASS_LOSSES = ("ce", "focal", "vfl")


def num_boxes_across_processes(targets: list[dict], device: torch.device) -> float:
    """Number of target boxes per process, averaged over processes, at least 1 (as DETR)."""
    n = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(n)
        n = n / dist.get_world_size()
    return max(n.item(), 1.0)


class SetCriterion(nn.Module):
    """Class loss (``ce`` with ``eos_coef`` | sigmoid ``focal`` | ``vfl``), L1 and GIoU.

    ``ce`` expects ``num_classes + 1`` logits (the last is no-object, weighted ``eos_coef``) and is
    averaged over queries as in DETR. ``focal`` and ``vfl`` expect ``num_classes`` logits; unmatched
    queries are trained toward all-zero scores, and the sum is divided by the number of boxes.
    ``alpha``/``gamma`` are the focal or varifocal ones (DN-DETR 0.25/2, RT-DETR VFL 0.75/2).
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        class_loss: str = "ce",
        weight_class: float = 1.0,
        weight_bbox: float = 5.0,
        weight_giou: float = 2.0,
        eos_coef: float = 0.1,
        alpha: float = 0.25,
        gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if class_loss not in CLASS_LOSSES:
            raise ValueError(f"class_loss must be one of {CLASS_LOSSES}, got {class_loss!r}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.class_loss = class_loss
        self.weights = {"class": weight_class, "bbox": weight_bbox, "giou": weight_giou}
        self.alpha, self.gamma = alpha, gamma
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    # -- the three terms on one output, given an assignment ---------------------------------
    def loss_terms(
        self,
        pred_logits: Tensor,
        pred_boxes: Tensor,
        targets: list[dict],
        indices: Indices,
        num_boxes: float,
        class_mask: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Weighted ``class``/``bbox``/``giou`` of ``[B,Q,C]``/``[B,Q,4]`` under ``indices``.

        ``class_mask [B,Q]`` (bool) limits the class loss to some queries (DN-DETR's valid
        denoising slots); box terms are computed on the assigned pairs only.
        """
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for src, _ in indices])
        tgt_labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        tgt_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)])
        src_boxes = pred_boxes[batch_idx, src_idx].float()  # [N,4]
        tgt_boxes = tgt_boxes.to(src_boxes)
        src_xyxy, tgt_xyxy = cxcywh_to_xyxy(src_boxes), cxcywh_to_xyxy(tgt_boxes)

        logits = pred_logits.float()
        if self.class_loss == "ce":
            target_classes = torch.full(
                logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device
            )
            target_classes[batch_idx, src_idx] = tgt_labels
            reduction = "mean"
            if class_mask is not None:  # weighted mean over the unmasked slots, 0 if none
                target_classes[~class_mask] = -100  # ignore_index
                reduction = "sum"
            loss_class = F.cross_entropy(
                logits.transpose(1, 2),
                target_classes,
                self.empty_weight,
                ignore_index=-100,
                reduction=reduction,
            )
            if class_mask is not None:
                weight = self.empty_weight[target_classes.clamp(min=0)] * class_mask
                loss_class = loss_class / weight.sum().clamp(min=1e-6)
        else:
            onehot = torch.zeros_like(logits)
            onehot[batch_idx, src_idx, tgt_labels] = 1.0
            if self.class_loss == "focal":
                loss = sigmoid_focal_loss(logits, onehot, self.alpha, self.gamma, "none")
            else:  # varifocal: the matched class's target is the box's IoU with its GT
                score = torch.zeros_like(logits)
                iou = paired_iou(src_xyxy.detach(), tgt_xyxy)
                score[batch_idx, src_idx, tgt_labels] = iou.to(score.dtype)
                weight = self.alpha * logits.sigmoid().detach() ** self.gamma * (1 - onehot)
                weight = weight + score
                loss = F.binary_cross_entropy_with_logits(logits, score, weight, reduction="none")
            if class_mask is not None:
                loss = loss * class_mask[..., None]
            loss_class = loss.sum() / num_boxes

        loss_bbox = F.l1_loss(src_boxes, tgt_boxes, reduction="sum") / num_boxes
        loss_giou = (1 - paired_giou(src_xyxy, tgt_xyxy)).sum() / num_boxes
        if len(src_idx) == 0:  # keep the box head in the graph (DDP needs every rank alike)
            zero = pred_boxes.sum() * 0.0
            loss_bbox, loss_giou = loss_bbox + zero, loss_giou + zero
        raw = {"class": loss_class, "bbox": loss_bbox, "giou": loss_giou}
        return {k: self.weights[k] * v for k, v in raw.items()}

    def matched_terms(
        self, outputs: dict, targets: list[dict], num_boxes: float
    ) -> dict[str, Tensor]:
        indices = self.matcher(outputs["pred_logits"], outputs["pred_boxes"], targets)
        return self.loss_terms(
            outputs["pred_logits"], outputs["pred_boxes"], targets, indices, num_boxes
        )

    # -- every output of a network ---------------------------------------------------------
    def forward(
        self, outputs: dict, targets: list[dict], across_processes: bool = True
    ) -> dict[str, Tensor]:
        """All weighted terms and their sum ``loss`` for a network's ``outputs``.

        ``across_processes=False`` normalises by this process's own box count (evaluation,
        where processes may run different numbers of batches and must not communicate).
        Always in fp32: under mixed precision (``bf16-mixed``) the matcher's costs and every
        loss term run with autocast off, on the outputs cast to float."""
        device_type = outputs["pred_logits"].device.type
        with torch.autocast(device_type, enabled=False):
            return self._forward(outputs, targets, across_processes)

    def _forward(
        self, outputs: dict, targets: list[dict], across_processes: bool
    ) -> dict[str, Tensor]:
        if across_processes:
            num_boxes = num_boxes_across_processes(targets, outputs["pred_logits"].device)
        else:
            num_boxes = max(float(sum(len(t["labels"]) for t in targets)), 1.0)
        losses: dict[str, Tensor] = {}

        def add(terms: dict[str, Tensor], prefix: str = "", suffix: str = "") -> None:
            for k, v in terms.items():
                losses[f"loss_{prefix}{k}{suffix}"] = v

        add(self.matched_terms(outputs, targets, num_boxes))
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            add(self.matched_terms(aux, targets, num_boxes), suffix=f"_aux{i}")
        if "enc_outputs" in outputs:
            add(self.matched_terms(outputs["enc_outputs"], targets, num_boxes), "enc_")
        if "dn_outputs" in outputs:
            dn, meta = outputs["dn_outputs"], outputs["dn_meta"]
            dn_num_boxes = num_boxes * meta.num_groups
            layers = [dn, *dn.get("aux_outputs", [])]
            for i, out in enumerate(layers):
                terms = self.loss_terms(
                    out["pred_logits"],
                    out["pred_boxes"],
                    targets,
                    meta.indices,
                    dn_num_boxes,
                    meta.class_mask,
                )
                add(terms, "dn_", "" if i == 0 else f"_aux{i - 1}")
        losses["loss"] = sum(losses.values())
        return losses
