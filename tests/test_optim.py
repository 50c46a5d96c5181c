"""Optimisation: the warm-up / step schedule at given steps, epoch milestones converted to
optimiser steps (by hand and in a real Lightning fit), and the parameter groups."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn

from detr_lineage.data.toy_shapes import ToyShapesDataModule
from detr_lineage.lit import DETR, DINO, ConditionalDETR, DeformableDETR, RTDETRv2
from detr_lineage.lit.base import WarmupStepSchedule
from detr_lineage.nn.backbone import BackboneConfig
from detr_lineage.nn.deformable import MSDeformableAttention
from tests.helpers import make_module


def expected_factor(step: int, warmup: int, milestones: list[int], gamma: float) -> float:
    """Linear warm-up from 1/warmup at step 0 to 1 at step warmup-1, then gamma per milestone."""
    warm = min(1.0, (step + 1) / warmup) if warmup else 1.0
    drops = len([m for m in milestones if step >= m])
    return warm * gamma**drops


@pytest.mark.parametrize(
    "step, factor",
    [(0, 0.25), (1, 0.5), (2, 0.75), (3, 1.0), (9, 1.0), (10, 0.1), (19, 0.1), (20, 0.01)],
)
def test_warmup_step_schedule_values(step, factor):
    assert WarmupStepSchedule(4, [10, 20], 0.1)(step) == pytest.approx(factor)


def test_no_warmup_no_milestones_is_constant():
    schedule = WarmupStepSchedule(0, [], 0.1)
    assert [schedule(s) for s in (0, 1, 10**6)] == [1.0, 1.0, 1.0]


def tiny_detr(**kw) -> DETR:
    torch.manual_seed(0)
    args = dict(
        backbone=BackboneConfig("conv", channels=[8, 8, 8, 8], return_strides=[16]),
        d_model=16,
        nhead=2,
        num_encoder_layers=1,
        num_decoder_layers=2,
        dim_feedforward=16,
        num_queries=8,
    )
    return make_module(DETR, 6, **{**args, **kw})


@pytest.mark.parametrize(
    "epochs, total_steps, drops, want_steps",
    [(300, 300 * 7, [200], [1400]), (50, 50 * 3, [40, 45], [120, 135]), (12, 12, [11], [11])],
)
def test_epoch_milestones_become_steps(epochs, total_steps, drops, want_steps):
    module = tiny_detr(lr_drop_epochs=drops, warmup_steps=5)
    module._trainer = SimpleNamespace(max_epochs=epochs, estimated_stepping_batches=total_steps)
    scheduler = module.configure_optimizers()["lr_scheduler"]
    assert scheduler["interval"] == "step"
    factor = scheduler["scheduler"].lr_lambdas[0]
    for m in want_steps:
        assert factor(m - 1) == pytest.approx(expected_factor(m - 1, 5, want_steps, 0.1))
        assert factor(m) == pytest.approx(factor(m - 1) * 0.1)


def test_lr_drop_needs_max_epochs():
    module = tiny_detr(lr_drop_epochs=[2])
    module._trainer = SimpleNamespace(max_epochs=None, estimated_stepping_batches=100)
    with pytest.raises(ValueError, match="max_epochs"):
        module.configure_optimizers()


class LrRecorder(L.Callback):
    def __init__(self) -> None:
        self.lrs: list[dict[str, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        groups = trainer.optimizers[0].param_groups
        self.lrs.append({g["name"]: g["lr"] for g in groups})


def test_schedule_in_a_real_fit():
    """4 steps per epoch, warm-up 3 steps, drop after epoch 2 (= step 8): the learning rates
    the optimiser actually used at each of the 12 steps, for both groups."""
    module = tiny_detr(lr=1e-3, lr_backbone=2e-4, warmup_steps=3, lr_drop_epochs=[2])
    data = ToyShapesDataModule(image_size=32, num_train=16, num_val=4, batch_size=4, seed=0)
    recorder = LrRecorder()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[recorder],
    )
    trainer.fit(module, datamodule=data)
    assert len(recorder.lrs) == 12
    for step, lrs in enumerate(recorder.lrs):
        f = expected_factor(step, 3, [8], 0.1)
        assert lrs["detector"] == pytest.approx(1e-3 * f), step
        assert lrs["backbone"] == pytest.approx(2e-4 * f), step


def test_detr_parameter_groups():
    """ResNet-18 trunk, stem and layer1 frozen: only layer2-4 in the backbone group."""
    module = tiny_detr(backbone=BackboneConfig("resnet18", return_strides=[32]), lr_backbone=3e-5)
    groups = {g["name"]: g for g in module.parameter_groups()}
    assert set(groups) == {"backbone", "detector"}
    body = module.net.encoder.backbone.body
    trainable = [p for n, p in body.named_parameters() if p.requires_grad]
    frozen = [p for p in body.parameters() if not p.requires_grad]
    assert frozen and all(not p.requires_grad for p in body.stem.parameters())
    assert {id(p) for p in groups["backbone"]["params"]} == {id(p) for p in trainable}
    assert groups["backbone"]["lr"] == 3e-5 and groups["backbone"]["weight_decay"] == 1e-4
    rest = [p for n, p in module.net.named_parameters() if ".backbone." not in f".{n}"]
    assert {id(p) for p in groups["detector"]["params"]} == {id(p) for p in rest}
    assert groups["detector"]["lr"] == 1e-4
    n_groups = sum(len(g["params"]) for g in groups.values())
    assert n_groups == sum(p.requires_grad for p in module.parameters())


def test_rtdetr_parameter_groups_without_decay_on_norms():
    torch.manual_seed(0)
    module = make_module(
        RTDETRv2,
        4,
        backbone=BackboneConfig("resnet18vd", return_strides=[8, 16, 32], frozen_bn=False),
        hidden_dim=32,
        encoder_dim=32,
        nhead=2,
        encoder_dim_feedforward=32,
        num_decoder_layers=2,
        dim_feedforward=32,
        num_queries=10,
        lr_backbone=5e-5,
        weight_decay=3e-4,
    )
    assert module.hparams.no_decay_on_norm and module.hparams.warmup_steps == 2000
    assert module.hparams.lr_linear_proj_mult == 1.0  # official: no such group (optimizer.yml)
    groups = {g["name"]: g for g in module.parameter_groups()}
    assert set(groups) == {"backbone", "backbone_no_wd", "detector", "detector_no_wd"}
    norms = (nn.LayerNorm, nn.BatchNorm2d, nn.GroupNorm)
    norm_ids, names = set(), {}
    for mname, m in module.net.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            names[id(p)] = f"{mname}.{pname}"
            if isinstance(m, norms):
                norm_ids.add(id(p))
    for name, g in groups.items():
        ids = {id(p) for p in g["params"]}
        in_backbone = {names[i].startswith("backbone.") for i in ids}
        assert in_backbone == {name.startswith("backbone")}, name
        assert (ids <= norm_ids) if name.endswith("_no_wd") else not (ids & norm_ids), name
        assert g["weight_decay"] == (0.0 if name.endswith("_no_wd") else 3e-4)
        assert g["lr"] == (5e-5 if name.startswith("backbone") else 1e-4)
    all_ids = [id(p) for g in groups.values() for p in g["params"]]
    assert len(all_ids) == len(set(all_ids))
    assert set(all_ids) == {id(p) for p in module.net.parameters() if p.requires_grad}
    assert norm_ids - {id(p) for p in module.net.parameters() if not p.requires_grad} <= set(
        all_ids
    )
    # AdamW receives the groups as they are
    module._trainer = SimpleNamespace(max_epochs=1, estimated_stepping_batches=1)
    optimizer = module.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [
        groups[g["name"]]["weight_decay"] for g in optimizer.param_groups
    ]
    assert optimizer.defaults["betas"] == (0.9, 0.999)


# -- Deformable DETR's 0.1x learning rate of the sampling offsets and reference points ------
MULTI = BackboneConfig(name="conv", channels=[8, 8, 8, 8], return_strides=[4, 8, 16])
TINY_DEFORMABLE = dict(d_model=16, nhead=2, num_encoder_layers=2, num_decoder_layers=2,
                       dim_feedforward=16, num_queries=5, num_points=2)  # fmt: skip


def offset_and_reference_params(net: nn.Module) -> set[int]:
    """Found by module, not by name: every deformable attention's sampling-offset projection
    (encoder and decoder) and the decoder's reference-point projection, if any."""
    attns = [m for m in net.modules() if isinstance(m, MSDeformableAttention)]
    ids = {id(p) for m in attns for p in m.sampling_offsets.parameters()}
    reference = getattr(net, "reference_points", None)
    return ids | {id(p) for p in reference.parameters()} if reference is not None else ids


@pytest.mark.parametrize("two_stage", [False, True], ids=["single_stage", "two_stage"])
def test_deformable_detr_trains_offsets_and_reference_points_at_a_tenth(two_stage):
    """Official main.py: params named *reference_points* or *sampling_offsets* at lr x 0.1 (the
    two-stage model has no reference-point projection); AdamW gets exactly these groups."""
    torch.manual_seed(0)
    module = make_module(
        DeformableDETR, 4, backbone=MULTI, two_stage=two_stage, box_refine=two_stage,
        lr=2e-4, lr_backbone=2e-5, **TINY_DEFORMABLE,
    )  # fmt: skip
    assert module.hparams.lr_linear_proj_mult == 0.1
    groups = {g["name"]: g for g in module.parameter_groups()}
    assert set(groups) == {"backbone", "detector", "detector_linear_proj"}
    slow = offset_and_reference_params(module.net)
    attns = [m for m in module.net.modules() if isinstance(m, MSDeformableAttention)]
    assert len(attns) == 4 and len(slow) == 2 * 4 + (0 if two_stage else 2)
    assert {id(p) for p in groups["detector_linear_proj"]["params"]} == slow
    backbone = {id(p) for p in module.net.backbone.parameters() if p.requires_grad}
    assert {id(p) for p in groups["backbone"]["params"]} == backbone
    rest = {id(p) for p in module.net.parameters() if p.requires_grad} - slow - backbone
    assert {id(p) for p in groups["detector"]["params"]} == rest
    module._trainer = SimpleNamespace(max_epochs=1, estimated_stepping_batches=1)
    optimizer = module.configure_optimizers()["optimizer"]
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs == pytest.approx({"backbone": 2e-5, "detector": 2e-4, "detector_linear_proj": 2e-5})
    assert all(g["weight_decay"] == 1e-4 for g in optimizer.param_groups)


def test_dino_and_rtdetr_keep_the_offsets_at_the_full_lr_unless_asked():
    """Official DINO (param_dict_type 'default') and RT-DETRv2 (optimizer.yml) have no such
    group; DINO with the multiplier set moves its sampling offsets (it has no reference-point
    projection); a network with neither is named in the error."""
    torch.manual_seed(0)
    dino = make_module(DINO, 4, backbone=MULTI, **TINY_DEFORMABLE)
    assert dino.hparams.lr_linear_proj_mult == 1.0
    assert {g["name"] for g in dino.parameter_groups()} == {"backbone", "detector"}
    dino = make_module(DINO, 4, backbone=MULTI, lr_linear_proj_mult=0.5, **TINY_DEFORMABLE)
    groups = {g["name"]: g for g in dino.parameter_groups()}
    assert {id(p) for p in groups["detector_linear_proj"]["params"]} == (
        offset_and_reference_params(dino.net)
    )
    assert groups["detector_linear_proj"]["lr"] == pytest.approx(0.5e-4)
    conditional = make_module(
        ConditionalDETR, 4, backbone=BackboneConfig("conv", channels=[8, 8], return_strides=[4]),
        d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=16,
        num_queries=5, lr_linear_proj_mult=0.1,
    )  # fmt: skip
    with pytest.raises(ValueError, match="match no parameter of ConditionalDETRNet"):
        conditional.parameter_groups()
