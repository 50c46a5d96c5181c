"""Network outputs -> scored detections in image pixels (xyxy)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .boxes import cxcywh_to_xyxy


class PostProcess(nn.Module):
    """``mode="softmax"``: DETR, one label per query (argmax over classes, no-object dropped).
    ``mode="sigmoid"``: DN-DETR / RT-DETR, top-``num_select`` over all (query, class) scores.
    """

    def __init__(self, mode: str = "softmax", num_select: int = 100) -> None:
        super().__init__()
        if mode not in ("softmax", "sigmoid"):
            raise ValueError(f"mode must be 'softmax' or 'sigmoid', got {mode!r}")
        self.mode, self.num_select = mode, num_select

    @torch.no_grad()
    def forward(self, pred_logits: Tensor, pred_boxes: Tensor, sizes: Tensor) -> list[dict]:
        """``[B,Q,C]``, ``[B,Q,4]``, ``sizes [B,2]`` (h, w) -> per image scores, labels, boxes."""
        if self.mode == "softmax":
            scores, labels = pred_logits.softmax(-1)[..., :-1].max(-1)  # [B,Q]
            boxes = pred_boxes
        else:
            b, q, c = pred_logits.shape
            scores, idx = pred_logits.sigmoid().flatten(1).topk(min(self.num_select, q * c), -1)
            labels = idx % c
            boxes = pred_boxes.gather(1, (idx // c)[..., None].expand(-1, -1, 4))
        h, w = sizes.unbind(-1)
        scale = torch.stack([w, h, w, h], -1).to(boxes)[:, None, :]  # [B,1,4]
        xyxy = cxcywh_to_xyxy(boxes) * scale
        return [{"scores": s, "labels": l, "boxes": bx} for s, l, bx in zip(scores, labels, xyxy)]
