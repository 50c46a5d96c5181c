"""The one Hungarian matcher every variant uses (DETR, DN-DETR, RT-DETRv2)."""

from __future__ import annotations

import warnings

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from .boxes import cxcywh_to_xyxy, generalized_box_iou

Indices = list[tuple[Tensor, Tensor]]  # per image: (query indices, target indices), int64


class HungarianMatcher(nn.Module):
    """One-to-one assignment of predictions to ground truth by minimum total cost.

    cost = cost_class * C_class + cost_bbox * L1(cxcywh) + cost_giou * (-GIoU).
    ``class_cost="softmax"`` is DETR's ``-p(target class)``; ``"focal"`` is the focal-style cost of
    Deformable/DN-DETR and RT-DETR (``pos - neg`` of the focal loss at the target class).
    The cost matrix is built for the whole batch at once; scipy solves each image.
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
        """``[B,Q,C]``, ``[B,Q,4]`` -> cost ``[B,Q,T]`` against all T targets of the batch."""
        b, q = pred_logits.shape[:2]
        logits = pred_logits.flatten(0, 1).float()  # [B*Q, C]
        boxes = pred_boxes.flatten(0, 1).float()  # [B*Q, 4]
        tgt_labels = torch.cat([t["labels"] for t in targets])
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(boxes)
        if self.class_cost == "softmax":
            c_class = -logits.softmax(-1)[:, tgt_labels]
        else:
            p = logits.sigmoid()[:, tgt_labels]
            a, g = self.focal_alpha, self.focal_gamma
            pos = a * (1 - p) ** g * -(p + 1e-8).log()
            neg = (1 - a) * p**g * -(1 - p + 1e-8).log()
            c_class = pos - neg
        c_bbox = torch.cdist(boxes, tgt_boxes, p=1)
        c_giou = -generalized_box_iou(cxcywh_to_xyxy(boxes), cxcywh_to_xyxy(tgt_boxes))
        cost = self.cost_class * c_class + self.cost_bbox * c_bbox + self.cost_giou * c_giou
        return cost.view(b, q, -1)

    @torch.no_grad()
    def forward(self, pred_logits: Tensor, pred_boxes: Tensor, targets: list[dict]) -> Indices:
        sizes = [len(t["boxes"]) for t in targets]
        device = pred_logits.device
        empty = torch.empty(0, dtype=torch.int64, device=device)
        if sum(sizes) == 0:
            return [(empty, empty) for _ in targets]
        cost = self.cost_matrix(pred_logits, pred_boxes, targets).cpu()
        if not torch.isfinite(cost).all():
            raise FloatingPointError(
                "matcher cost has NaN/inf: the predictions are not finite (training diverged?)"
            )
        num_queries = cost.shape[1]
        indices = []
        for i, c in enumerate(cost.split(sizes, -1)):
            if sizes[i] > num_queries:
                warnings.warn(
                    f"image {targets[i].get('image_id', i)} has {sizes[i]} targets but only "
                    f"{num_queries} queries: {sizes[i] - num_queries} targets stay unmatched",
                    stacklevel=2,
                )
            rows, cols = linear_sum_assignment(c[i].numpy())
            indices.append(
                (torch.as_tensor(rows, device=device), torch.as_tensor(cols, device=device))
            )
        return indices
