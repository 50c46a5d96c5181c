"""Which numeric precision a CPU run trains in.

The toy configs ask for ``trainer.precision: bf16-mixed``: on a CPU with native bf16 (AVX512-BF16
or AMX) the toy train steps are ~1.4x faster under bf16 autocast (README, Speed). Elsewhere bf16
is emulated and slower, so a CPU run without native support falls back to fp32 (``32-true``)
and says so once. Losses, the matcher and box arithmetic stay fp32 either way (``SetCriterion``
turns autocast off; boxes are formed in fp32).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

BF16_PRECISIONS = ("bf16-mixed", "bf16", "bf16-true")


def cpu_has_native_bf16() -> bool:
    """True if this CPU computes bf16 natively (AVX512-BF16 or AMX tiles)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def trains_on_cpu(accelerator: object) -> bool:
    """Whether Lightning's ``accelerator`` setting puts training on the CPU."""
    if accelerator is None or accelerator == "auto":
        return not (torch.cuda.is_available() or torch.backends.mps.is_available())
    return str(accelerator) == "cpu" or type(accelerator).__name__ == "CPUAccelerator"


def resolve_precision(precision: object, accelerator: object = "auto") -> object:
    """``precision`` unchanged, except bf16 on a CPU without native bf16 -> ``"32-true"``."""
    if str(precision) not in BF16_PRECISIONS or not trains_on_cpu(accelerator):
        return precision
    if cpu_has_native_bf16():
        return precision
    log.warning(
        "trainer.precision=%s: this CPU has no native bf16 (AVX512-BF16 or AMX), where bf16 is "
        "slower than fp32; training in fp32 (32-true) instead",
        precision,
    )
    return "32-true"
