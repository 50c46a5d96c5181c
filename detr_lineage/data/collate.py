"""Batch collation shared by every detection data module (toy shapes, COCO).

Images of different sizes are zero-padded at the bottom/right to the largest height and width of
the batch; the padding mask tells the networks (attention key-padding, position encodings)
which pixels are not part of the image. Targets stay a list of per-image dicts because the
number of objects differs from image to image (and may be zero).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["collate_detection"]


def collate_detection(
    batch: list[tuple[Tensor, dict[str, Any]]], *, pad_to_multiple: int = 1
) -> dict[str, Any]:
    """Stack ``(image, target)`` items into ``{"images", "masks", "targets"}``.

    ``images`` is float ``[B,C,Hmax,Wmax]`` with zeros in the padding, ``masks`` is bool
    ``[B,Hmax,Wmax]`` with True exactly on the padding, ``targets`` is the list of the B target
    dicts unchanged. ``pad_to_multiple`` (keyword, default 1 = no rounding) rounds Hmax and Wmax
    up to a multiple, for networks whose strides need it (use ``functools.partial``).
    """
    if len(batch) == 0:
        raise ValueError("collate_detection got an empty batch")
    if pad_to_multiple < 1:
        raise ValueError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}")
    images = [image for image, _ in batch]
    for image in images:
        if image.dim() != 3:
            raise ValueError(f"expected images of shape [C,H,W], got {tuple(image.shape)}")
    channels = images[0].shape[0]
    if any(image.shape[0] != channels for image in images):
        raise ValueError("all images of a batch must have the same number of channels")
    h_max = max(image.shape[1] for image in images)
    w_max = max(image.shape[2] for image in images)
    h_max = -(-h_max // pad_to_multiple) * pad_to_multiple
    w_max = -(-w_max // pad_to_multiple) * pad_to_multiple

    padded = images[0].new_zeros((len(images), channels, h_max, w_max))  # [B,C,Hmax,Wmax]
    masks = torch.ones((len(images), h_max, w_max), dtype=torch.bool)  # [B,Hmax,Wmax]
    for b, image in enumerate(images):
        _, h, w = image.shape
        padded[b, :, :h, :w].copy_(image)
        masks[b, :h, :w] = False
    return {"images": padded, "masks": masks, "targets": [target for _, target in batch]}
