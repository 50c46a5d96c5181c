"""Network output dicts shared by every variant (no variant imports here)."""

from __future__ import annotations

from torch import Tensor


def split_layers(logits: Tensor, boxes: Tensor, aux: bool = True) -> dict:
    """Per-layer ``[L,B,Q,*]`` outputs -> last layer's dict, earlier ones in ``aux_outputs``."""
    out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
    if aux:
        out["aux_outputs"] = [
            {"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])
        ]
    return out
