"""Resume is exact: a run checkpointed at step k (by the runner's ``ResumeCheckpoint``) and
resumed trains steps k, k+1, ... once each, on the same batches, with the same losses and ends
with the same weights as an uninterrupted run. DN-DETR with denoising: its noise comes from
the global random state, which the checkpoint carries."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from detr_lineage.analysis.resume import ResumeCheckpoint
from detr_lineage.data.collate import DetectionLoader, EpochShuffleSampler
from detr_lineage.data.toy_shapes import ToyShapesDataModule
from detr_lineage.denoising import DenoisingConfig
from detr_lineage.lit import DNDETR
from detr_lineage.nn.backbone import BackboneConfig
from tests.helpers import make_module

STEPS = 8  # 2 epochs of 4 batches


class Record(L.Callback):
    def __init__(self) -> None:
        self.steps: list[tuple[int, float, list[int]]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        ids = [int(t["image_id"]) for t in batch["targets"]]
        self.steps.append((trainer.global_step - 1, float(outputs["loss"]), ids))


def fit(
    tmp_path,
    name: str,
    max_steps: int,
    every: int | None = None,
    ckpt=None,
    val_every: int | None = None,
    workers: int = 0,
):
    L.seed_everything(0)
    module = make_module(
        DNDETR,
        6,
        backbone=BackboneConfig("conv", channels=[8, 8, 8, 8], return_strides=[16]),
        d_model=16,
        nhead=2,
        num_encoder_layers=1,
        num_decoder_layers=2,
        dim_feedforward=16,
        num_queries=8,
        num_select=8,
        denoising=DenoisingConfig(),
    )
    record = Record()
    callbacks = [record] + ([ResumeCheckpoint(every)] if every else [])
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=CSVLogger(tmp_path / name),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1 if val_every else 0,
        val_check_interval=val_every,
        check_val_every_n_epoch=None if val_every else 1,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    data = ToyShapesDataModule(
        image_size=32, num_train=16, num_val=4, batch_size=4, seed=0, num_workers=workers
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt, weights_only=False)
    return record.steps, module, trainer


@pytest.mark.parametrize("k", [3, 4], ids=["mid_epoch", "epoch_end"])
def test_resumed_run_equals_uninterrupted_run(tmp_path, k):
    full, full_module, _ = fit(tmp_path, "full", STEPS)
    first, _, trainer = fit(tmp_path, "first", k, every=k)
    ckpt = tmp_path / "first" / "lightning_logs" / "version_0" / "checkpoints" / "resume.ckpt"
    assert torch.load(ckpt, weights_only=False)["global_step"] == k
    second, resumed_module, _ = fit(tmp_path, "second", STEPS, ckpt=str(ckpt))
    assert [s for s, *_ in first] == list(range(k))
    assert [s for s, *_ in second] == list(range(k, STEPS))  # none repeated, none missing
    for got, want in zip(first + second, full, strict=True):
        assert got[2] == want[2], f"step {want[0]}: other images"
        assert got[1] == want[1], f"step {want[0]}: loss {got[1]} != {want[1]}"
    for (name, a), b in zip(full_module.state_dict().items(), resumed_module.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("workers", [0, 1])
def test_training_randomness_does_not_depend_on_validation(tmp_path, workers):
    """DN-DETR's noise comes from the global random state; validating every 2 steps (new val
    iterators each time, or persistent workers) must leave the training steps unchanged."""
    ref, ref_module, _ = fit(tmp_path, "no_val", 6)
    got, module, _ = fit(tmp_path, f"val_w{workers}", 6, val_every=2, workers=workers)
    assert [loss for _, loss, _ in got] == [loss for _, loss, _ in ref]
    for (name, a), b in zip(ref_module.state_dict().items(), module.state_dict().values()):
        assert torch.equal(a, b), name


def test_loader_resumes_mid_pass_and_restarts_after_a_finished_one():
    dataset = list(range(10))
    loader = DetectionLoader(dataset, batch_size=3, shuffle=True, collate_fn=lambda b: b)
    assert isinstance(loader.sampler, EpochShuffleSampler)
    loader.sampler.set_epoch(2)
    whole = list(loader)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    assert state["batches"] == 1
    again = DetectionLoader(dataset, batch_size=3, shuffle=True, collate_fn=lambda b: b)
    again.sampler.set_epoch(2)
    again.load_state_dict(state)
    assert list(again) == whole[1:]
    assert list(again) == whole  # the skip applies to one pass only
    again.load_state_dict({**state, "batches": len(again)})  # saved after the last batch
    assert list(again) == whole
    # another epoch, another order; the same epoch, the same order
    again.sampler.set_epoch(3)
    assert list(again) != whole
    again.sampler.set_epoch(2)
    assert list(again) == whole
