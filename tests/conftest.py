"""Shared test settings: one torch thread per worker (pytest -n 2 on 2 cores), no W&B."""

from __future__ import annotations

import os

import pytest
import torch

os.environ["WANDB_MODE"] = "disabled"
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
