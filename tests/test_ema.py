"""EMA with the official RT-DETR warm-up: d = decay * (1 - exp(-updates / warmups))."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from detr_lineage.ema import WarmupEMAFn, WarmupEMAWeightAveraging


def official_ema(states: list[dict], decay: float, warmups: int) -> dict:
    """The official ModelEMA, from its formula, one update per step; its update 1 (d ~ 5e-4 of
    the model at creation) is taken as a copy, which is what AveragedModel's first update does."""
    ema = {k: v.clone() for k, v in states[0].items()}
    for updates, state in enumerate(states[1:], start=2):
        d = decay * (1 - math.exp(-updates / warmups))
        for k, v in ema.items():
            if v.is_floating_point():
                v.mul_(d).add_((1 - d) * state[k])
            else:
                v.copy_(state[k])
    return ema


def test_warmup_ema_equals_the_official_update() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    averaged = AveragedModel(model, avg_fn=WarmupEMAFn(0.9999, 5), use_buffers=True)
    states = []
    for _ in range(6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            model[1].running_mean.add_(torch.randn(4))
            model[1].num_batches_tracked.add_(1)
        averaged.update_parameters(model)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    expected = official_ema(states, 0.9999, 5)
    got = averaged.module.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6)
    # and it is far from Lightning's plain EMA, which would still be near the first state
    plain = states[0]["0.weight"]
    assert (got["0.weight"] - plain).abs().max() > 1.0


def test_decay_ramp_and_callback_wiring() -> None:
    fn = WarmupEMAFn(0.9999, 2000)
    a, c = torch.zeros(1), torch.ones(1)
    # update 2000: d = 0.9999 * (1 - e^-1) = 0.63206...
    assert fn(a, c, 1999).item() == pytest.approx(1 - 0.9999 * (1 - math.exp(-1)), rel=1e-6)
    cb = WarmupEMAWeightAveraging(decay=0.9999, warmups=2000)
    assert isinstance(cb._kwargs["avg_fn"], WarmupEMAFn) and cb._kwargs["avg_fn"].warmups == 2000
    with pytest.raises(ValueError, match="decay"):
        WarmupEMAFn(1.5, 10)
