"""EMA of the weights with the official RT-DETR warm-up of the decay.

The official ``ModelEMA`` (lyuwenyu/RT-DETR, also YOLOv5's) updates every floating-point
entry of the state dict (parameters and BN statistics) after each optimiser step with
``d = decay * (1 - exp(-updates / warmups))``: early on ``d`` is small and the average follows
the model, so EMA validation curves are usable from the start; Lightning's
``EMAWeightAveraging`` uses the full ``decay`` from the first step.
"""

from __future__ import annotations

import math
from typing import Any

from lightning.pytorch.callbacks import EMAWeightAveraging
from torch import Tensor


def warmup_decay(decay: float, warmups: int, updates: int) -> float:
    """The official decay of update number ``updates`` (1-based)."""
    return decay * (1.0 - math.exp(-updates / warmups))


class WarmupEMAFn:
    """``avg_fn`` of ``torch.optim.swa_utils.AveragedModel``: the official warm-up EMA.

    AveragedModel copies the model at its first update and then calls this with the number of
    updates averaged so far ``n`` (>= 1): this is the official update number ``n + 1``.
    """

    def __init__(self, decay: float, warmups: int) -> None:
        if not 0.0 <= decay < 1.0 or warmups < 1:
            raise ValueError(f"need 0 <= decay < 1 and warmups >= 1, got {decay}, {warmups}")
        self.decay, self.warmups = decay, warmups

    def __call__(self, averaged: Tensor, current: Tensor, num_averaged: Tensor | int) -> Tensor:
        if not averaged.is_floating_point():  # e.g. num_batches_tracked: as the official, copied
            return current
        d = warmup_decay(self.decay, self.warmups, int(num_averaged) + 1)
        return averaged * d + current * (1.0 - d)


class WarmupEMAWeightAveraging(EMAWeightAveraging):
    """Lightning's EMA callback with the official warm-up (RT-DETRv2: 0.9999, 2000 updates)."""

    def __init__(self, decay: float = 0.9999, warmups: int = 2000, **kwargs: Any) -> None:
        super().__init__(decay=decay, **kwargs)
        self.warmups = warmups
        self._kwargs["avg_fn"] = WarmupEMAFn(decay, warmups)
