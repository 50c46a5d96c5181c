"""Near-miss and duplicate counts: does a detector reject what almost matches an object?

The course's contrastive-denoising question ("does the model become better at rejecting
near-misses?") needs more than mAP. Per image, over the detections scored at least
``score_threshold`` (default ``NEAR_MISS_SCORE``):

- a detection's *best IoU* is its highest IoU with a ground-truth box of the **same class**
  (0 when the image has none of that class);
- **near miss**: best IoU in ``[NEAR_MISS_LOW, HIT_IOU)`` = [0.1, 0.5): a confident box on the
  right kind of object that would not count as a detection at the usual IoU 0.5;
- **duplicate**: each detection with best IoU >= 0.5 is assigned to that best ground truth (ties:
  the lower index); an object assigned ``n > 1`` detections contributes ``n - 1`` duplicates.
  (DETR's set loss is meant to make duplicates rare; a detector that has not learned to
  suppress them shows them here.)

Detections of another class than the object are neither (they count for mAP, not here). The
logged values are means per image over the evaluated images: ``near_miss`` and ``duplicates``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torchvision.ops import box_iou

NEAR_MISS_SCORE = 0.5  # detections scored below this are not counted (both counts)
NEAR_MISS_LOW = 0.1  # best same-class IoU in [NEAR_MISS_LOW, HIT_IOU) = near miss
HIT_IOU = 0.5  # at or above: a hit on that object (a second hit on it is a duplicate)


def near_miss_counts(
    detections: dict[str, Tensor],
    ground_truth: dict[str, Tensor],
    score_threshold: float = NEAR_MISS_SCORE,
) -> tuple[int, int]:
    """(near misses, duplicates) of one image.

    ``detections``: ``boxes [N,4]`` xyxy, ``scores [N]``, ``labels [N]``; ``ground_truth``:
    ``boxes [M,4]`` xyxy (same units), ``labels [M]``.
    """
    keep = detections["scores"] >= score_threshold
    boxes, labels = detections["boxes"][keep].float(), detections["labels"][keep]
    gt_boxes, gt_labels = ground_truth["boxes"].float(), ground_truth["labels"]
    if len(boxes) == 0 or len(gt_boxes) == 0:
        return 0, 0
    iou = box_iou(boxes, gt_boxes.to(boxes.device))  # [N,M]
    same = labels[:, None] == gt_labels.to(labels.device)[None, :]
    iou = torch.where(same, iou, torch.zeros_like(iou))
    best, owner = iou.max(1)  # first maximum on ties
    near = int(((best >= NEAR_MISS_LOW) & (best < HIT_IOU)).sum())
    hits = owner[best >= HIT_IOU]
    per_object = torch.bincount(hits, minlength=len(gt_boxes))
    duplicates = int((per_object - 1).clamp(min=0).sum())
    return near, duplicates


class NearMissCounter:
    """Accumulates ``near_miss_counts`` over an evaluation epoch; ``compute`` gives per-image means
    (summed over processes first when torch.distributed is initialised) and resets."""

    def __init__(self, score_threshold: float = NEAR_MISS_SCORE) -> None:
        self.score_threshold = score_threshold
        self.reset()

    def reset(self) -> None:
        self.near_miss, self.duplicates, self.images = 0, 0, 0

    def update(self, detections: list[dict], ground_truths: list[dict]) -> None:
        for det, gt in zip(detections, ground_truths, strict=True):
            near, dup = near_miss_counts(det, gt, self.score_threshold)
            self.near_miss += near
            self.duplicates += dup
            self.images += 1

    def compute(self) -> dict[str, float]:
        totals = torch.tensor([self.near_miss, self.duplicates, self.images], dtype=torch.float64)
        if dist.is_available() and dist.is_initialized():
            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            totals = totals.to(device)
            dist.all_reduce(totals)
        self.reset()
        near, dup, images = totals.tolist()
        n = max(images, 1.0)
        return {"near_miss": near / n, "duplicates": dup / n}


__all__ = ["HIT_IOU", "NEAR_MISS_LOW", "NEAR_MISS_SCORE", "NearMissCounter", "near_miss_counts"]
