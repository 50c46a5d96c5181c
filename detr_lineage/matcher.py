"""The one Hungarian matcher every variant uses (DETR, DN-DETR, RT-DETRv2)."""

from __future__ import annotations

import warnings

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

Indices = list[tuple[Tensor, Tensor]]  # per image: (query indices, target indices), int64


class HungarianMatcher(nn.Module):
    """One-to-one assignment of predictions to ground truth by minimum total cost.

    cost = cost_class * C_class + cost_bbox * L1(cxcywh) + cost_giou * (-GIoU).
    ``class_cost="softmax"`` is DETR's ``-p(target class)``; ``"focal"`` is the focal-style cost of
    Deformable/DN-DETR and RT-DETR (``pos - neg`` of the focal loss at the target class).
    The cost matrix is built for the whole batch at once (each image against its own targets);
    scipy solves each image.
    """

    def __init__(
        self,
        cost_class: float = 1.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        class_cost: str = "softmax",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if class_cost not in ("softmax", "focal"):
            raise ValueError(f"class_cost must be 'softmax' or 'focal', got {class_cost!r}")
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matcher costs are zero")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.class_cost = class_cost
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    @torch.no_grad()
    def cost_matrix(self, pred_logits: Tensor, pred_boxes: Tensor, targets: list[dict]) -> Tensor:
        """``[B,Q,C]``, ``[B,Q,4]`` -> cost ``[B,Q,T]`` of each image's queries to its own targets.

        T is the largest target count of the batch; column j of image b is ``targets[b]``'s
        target j, and the columns past that image's count are padding (``+inf``). Only the
        block-diagonal image-to-own-target costs are built (DETR builds ``[B*Q, sum T]`` and
        throws the off-diagonal blocks away): B times less work.
        """
        b, q, c = pred_logits.shape
        device = pred_logits.device
        sizes = torch.tensor([len(t["boxes"]) for t in targets], device=device)
        tgt_labels = pad_sequence([t["labels"] for t in targets], batch_first=True)  # [B,T]
        tgt_boxes = pad_sequence(  # [B,T,4]; padding is a harmless valid box
            [t["boxes"] for t in targets], batch_first=True, padding_value=0.5
        ).to(device=device, dtype=torch.float32)
        tgt_labels = tgt_labels.to(device)
        padding = torch.arange(tgt_labels.shape[1], device=device) >= sizes[:, None]  # [B,T]
        num_real = c - 1 if self.class_cost == "softmax" else c  # softmax: last = no-object
        bad = ((tgt_labels < 0) | (tgt_labels >= num_real)) & ~padding
        if bad.any():
            i = int(bad.any(1).nonzero()[0])
            raise ValueError(
                f"image {_image_name(targets, i)} has labels "
                f"{tgt_labels[i][bad[i]].tolist()} outside [0, {num_real}) for {c} logits "
                f"({self.class_cost} class cost): labels must be contiguous 0-based class ids"
            )

        index = tgt_labels[:, None, :].expand(b, q, -1)  # [B,Q,T]
        logits = pred_logits.float()
        if self.class_cost == "softmax":
            c_class = -logits.softmax(-1).gather(2, index)
        else:
            p = logits.gather(2, index).sigmoid()
            a, g = self.focal_alpha, self.focal_gamma
            pos = a * (1 - p) ** g * -(p + 1e-8).log()
            neg = (1 - a) * p**g * -(1 - p + 1e-8).log()
            c_class = pos - neg
        boxes = pred_boxes.float()
        c_bbox = torch.cdist(boxes, tgt_boxes, p=1)  # [B,Q,T]
        c_giou = -_giou_grid(boxes, tgt_boxes)
        cost = self.cost_class * c_class + self.cost_bbox * c_bbox + self.cost_giou * c_giou
        return cost.masked_fill(padding[:, None, :], float("inf"))

    @torch.no_grad()
    def forward(self, pred_logits: Tensor, pred_boxes: Tensor, targets: list[dict]) -> Indices:
        """Per image ``(query indices, target indices)``, int64, on the predictions' device."""
        # NaN/inf anywhere makes the per-image sum non-finite (finite values summing past 3e38
        # do not occur): one cheap reduction instead of an element-wise isfinite.
        total = pred_logits.float().sum((1, 2)) + pred_boxes.float().sum((1, 2))  # [B]
        finite = torch.isfinite(total)
        if not finite.all():
            raise FloatingPointError(
                f"predictions of image {_image_name(targets, int((~finite).nonzero()[0]))} have "
                "NaN/inf: the matcher cannot assign them (training diverged?)"
            )
        sizes = [len(t["boxes"]) for t in targets]
        device = pred_logits.device
        empty = torch.empty(0, dtype=torch.int64, device=device)
        if sum(sizes) == 0:
            return [(empty, empty) for _ in targets]
        cost = self.cost_matrix(pred_logits, pred_boxes, targets).cpu()  # [B,Q,T]
        real = torch.arange(cost.shape[2]) < torch.tensor(sizes)[:, None]  # [B,T]
        bad = (~torch.isfinite(cost).all(1) & real).any(1)  # [B]
        if bad.any():  # finite predictions: only NaN/inf or degenerate target boxes get here
            raise FloatingPointError(
                f"matcher cost of image {_image_name(targets, int(bad.nonzero()[0]))} has NaN/inf: "
                "check its target boxes (finite, positive width and height)"
            )
        num_queries = cost.shape[1]
        indices = []
        for i, n in enumerate(sizes):
            if n > num_queries:
                warnings.warn(
                    f"image {_image_name(targets, i)} has {n} targets but only {num_queries} "
                    f"queries: {n - num_queries} targets stay unmatched",
                    stacklevel=2,
                )
            rows, cols = linear_sum_assignment(cost[i, :, :n].numpy())
            indices.append(
                (torch.as_tensor(rows, device=device), torch.as_tensor(cols, device=device))
            )
        return indices


def _image_name(targets: list[dict], i: int) -> str:
    """``image_id`` of image i for messages (its batch position when there is none)."""
    image_id = targets[i].get("image_id", i)
    return str(image_id.item() if isinstance(image_id, Tensor) else image_id)


def _giou_grid(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """GIoU of cxcywh ``[B,N,4]`` x ``[B,M,4]`` -> ``[B,N,M]``.

    The values of torchvision's ``generalized_box_iou`` on xyxy boxes, computed on ``[B,N,M]``
    planes: torchvision broadcasts ``[B,N,M,2]`` corner pairs, a strided layout that made
    GIoU most of the matcher's CPU time.
    """
    cx1, cy1, w1, h1 = (v[..., :, None] for v in boxes1.unbind(-1))  # [B,N,1]
    cx2, cy2, w2, h2 = (v[..., None, :] for v in boxes2.unbind(-1))  # [B,1,M]
    x0a, x1a, y0a, y1a = cx1 - w1 / 2, cx1 + w1 / 2, cy1 - h1 / 2, cy1 + h1 / 2
    x0b, x1b, y0b, y1b = cx2 - w2 / 2, cx2 + w2 / 2, cy2 - h2 / 2, cy2 + h2 / 2
    inter_w = (torch.minimum(x1a, x1b) - torch.maximum(x0a, x0b)).clamp_(min=0)
    inter_h = (torch.minimum(y1a, y1b) - torch.maximum(y0a, y0b)).clamp_(min=0)
    inter = inter_w * inter_h
    union = (x1a - x0a) * (y1a - y0a) + (x1b - x0b) * (y1b - y0b) - inter
    enclosing = (torch.maximum(x1a, x1b) - torch.minimum(x0a, x0b)) * (
        torch.maximum(y1a, y1b) - torch.minimum(y0a, y0b)
    )
    return inter / union - (enclosing - union) / enclosing
