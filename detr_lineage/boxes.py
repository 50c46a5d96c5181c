"""Box formats and overlaps, thin over torchvision.ops.

Boxes are normalised ``cxcywh`` everywhere in the model and the loss; ``xyxy`` only where
an overlap is computed or a detection is reported.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_convert, box_iou, generalized_box_iou, generalized_box_iou_loss

__all__ = [
    "box_iou",
    "cxcywh_to_xyxy",
    "generalized_box_iou",
    "inverse_sigmoid",
    "paired_giou",
    "paired_iou",
    "xyxy_to_cxcywh",
]


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``[..., 4]`` (cx, cy, w, h) -> (x0, y0, x1, y1)."""
    return box_convert(boxes, "cxcywh", "xyxy")


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """``[..., 4]`` (x0, y0, x1, y1) -> (cx, cy, w, h)."""
    return box_convert(boxes, "xyxy", "cxcywh")


def paired_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of matched pairs ``[N]`` (xyxy): the diagonal of ``box_iou`` without the N x N matrix."""
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    lt = torch.max(boxes1[:, :2], boxes2[:, :2])
    rb = torch.min(boxes1[:, 2:], boxes2[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    return inter / (area1 + area2 - inter)


def paired_giou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Generalised IoU of matched pairs ``[N]`` (xyxy), via torchvision's element-wise GIoU loss."""
    return 1 - generalized_box_iou_loss(boxes1, boxes2, reduction="none")


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """logit(x), finite: ``log(max(x, eps) / max(1 - x, eps))`` on x clamped to [0, 1], the
    official DETR-family formula (at x = 1 it gives log(1 / eps), not log((1 - eps) / eps))."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))
