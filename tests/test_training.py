"""End-to-end: matcher, loss and model working together on toy shapes (CPU)."""

from __future__ import annotations

import pytest
import torch

from detr_lineage.data.toy_shapes import ToyShapesDataModule
from detr_lineage.denoising import DenoisingConfig
from detr_lineage.lit import DETR, DNDETR
from detr_lineage.nn.backbone import BackboneConfig
from tests.helpers import make_module

TINY = dict(
    num_classes=6,
    backbone=BackboneConfig(name="conv", channels=[16, 32, 64], return_strides=[8]),
    d_model=64,
    nhead=4,
    num_encoder_layers=1,
    num_decoder_layers=2,
    dim_feedforward=128,
    num_queries=10,
)


def fixed_batch(n: int = 4) -> dict:
    dm = ToyShapesDataModule(preset="easy", image_size=64, max_objects=4, batch_size=n)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def overfit(model, batch: dict, steps: int, lr: float = 1e-3) -> tuple[float, float]:
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    first = last = None
    for _ in range(steps):
        out = model.net(batch["images"], batch["masks"], batch["targets"])
        losses = model.criterion(out, batch["targets"])
        opt.zero_grad()
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        # the matching queries' loss: denoising terms are re-noised every step, so they keep a floor
        matching = sum(v.item() for k, v in losses.items() if k != "loss" and "_dn_" not in k)
        first = matching if first is None else first
        last = matching
    return first, last


@pytest.mark.slow
@pytest.mark.parametrize(
    "make",
    [
        lambda: make_module(DETR, **TINY, dropout=0.0),
        lambda: make_module(DNDETR, **TINY, denoising=DenoisingConfig(groups=2)),
    ],
    ids=["detr", "dn_detr"],
)
def test_tiny_model_overfits_one_batch(make):
    """On one fixed batch the matching loss falls at least 5x within a few hundred steps, and the
    mAP@0.5 of the post-processed detections (the module's own metric path) rises."""
    model, batch = make(), fixed_batch()
    before = map50(model, batch)
    first, last = overfit(model, batch, steps=300)
    after = map50(model, batch)
    assert last < first / 5, (first, last)
    assert before < 0.1 and after > 0.5, (before, after)


def map50(model, batch: dict) -> float:
    from torchmetrics.detection import MeanAveragePrecision

    model.eval()
    with torch.no_grad():
        outputs = model.net(batch["images"], batch["masks"])
    metric = MeanAveragePrecision(iou_thresholds=[0.5])
    metric.update(model.detections(outputs, batch["targets"]), model.ground_truth(batch["targets"]))
    return metric.compute()["map_50"].item()


def test_bad_targets_are_named():
    from detr_lineage.lit.base import check_targets

    good = {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}
    check_targets(
        [good, {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}], 6
    )
    outside = {
        "labels": torch.tensor([1]),
        "boxes": torch.tensor([[0.95, 0.5, 0.2, 0.2]]),
        "image_id": 17,
    }
    with pytest.raises(ValueError, match=r"image 17: target box .* outside \[0, 1\]"):
        check_targets([good, good, outside], 6)  # the bad image is found inside the batch
    with pytest.raises(ValueError, match="label 6 is outside"):
        check_targets([{**good, "labels": torch.tensor([6]), "image_id": 3}], 6)
    with pytest.raises(ValueError, match=r"boxes must be \[n,4\]"):
        check_targets([{**good, "boxes": torch.zeros(1, 3)}], 6)
