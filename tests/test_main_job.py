"""Every run of the main job (`make train`: experiments/ablations/toy_main.yaml) starts from the
spec: the exact `fit` command the ablation runner builds, one `fast_dev_run` step each."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from detr_lineage.analysis.ablate import expand, load_spec
from detr_lineage.cli import main
from detr_lineage.lit.base import DetectionModule

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "experiments" / "ablations" / "toy_main.yaml"
# shrink the data only (the model, its denoising and the budget keys stay the spec's)
SMALL = ["--data.init_args.num_train=8", "--data.init_args.num_val=4"]
SMALL += ["--data.init_args.batch_size=4", "--data.init_args.num_workers=0"]
SMALL += ["--trainer.enable_progress_bar=false"]


def planned():
    cwd = os.getcwd()
    os.chdir(ROOT)  # spec paths are relative to the repository
    try:
        return expand(load_spec(SPEC))
    finally:
        os.chdir(cwd)


def test_main_job_grid_is_three_variants_with_denoising_on_and_off():
    runs = planned()
    assert sorted(r.group for r in runs) == sorted(
        f"{v}-dn_{dn}" for v in ("detr", "dn_detr", "rtdetr_v2") for dn in ("on", "off")
    )
    snapshot = [a for a in runs[0].command("out") if "SnapshotCheckpoint" in a]
    assert snapshot and '"steps": [200]' in snapshot[0]  # the notebook's early model


def fit_one_step(run, tmp_path, monkeypatch) -> DetectionModule:
    """The run's `fit` command as the ablation runner builds it, on shrunk data, one step."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    seen: list[DetectionModule] = []
    setup = DetectionModule.setup

    def recording_setup(self, stage):
        seen.append(self)
        return setup(self, stage)

    monkeypatch.setattr(DetectionModule, "setup", recording_setup)
    cmd = run.command(tmp_path, checkpoint_every_n_steps=100)
    argv = cmd[cmd.index("fit") :]
    main([*argv, *SMALL, "--trainer.fast_dev_run=true"])
    (model,) = seen
    return model


@pytest.mark.slow
@pytest.mark.parametrize("index", range(6))
def test_every_main_job_run_starts_from_the_spec(index, tmp_path, monkeypatch):
    run = planned()[index]
    model = fit_one_step(run, tmp_path, monkeypatch)
    assert model.trainer.global_step == 1  # one optimiser step was taken
    assert (model.net.denoising is not None) == (run.denoising == "on")
    assert type(model).__name__ == {"detr": "DETR", "dn_detr": "DNDETR"}.get(
        run.variant, "RTDETRv2"
    )


# -- the lineage spec: the main job's runs plus the variants it lacks ------------------------
LINEAGE = ROOT / "experiments" / "ablations" / "toy_lineage.yaml"


def planned_lineage():
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        return expand(load_spec(LINEAGE))
    finally:
        os.chdir(cwd)


def without_tags(cmd: list[str]) -> list[str]:
    """A run's command but its tags (which name the spec)."""
    i = cmd.index("--run.tags")
    return cmd[:i] + cmd[i + 2 :]


def test_lineage_spec_runs_the_main_jobs_runs_alike():
    """Every main-job run is in toy_lineage.yaml under its name with the same `fit` command
    (configs, overrides, budget, checkpoints, snapshot), so `detr-lineage lineage --runs
    runs/toy_main runs/toy_lineage` compares like with like; the lineage adds its variants."""
    main_runs = {r.name: r for r in planned()}
    lineage_runs = {r.name: r for r in planned_lineage()}
    assert set(main_runs) <= set(lineage_runs)
    for name, run in main_runs.items():
        ours = lineage_runs[name]
        assert without_tags(ours.command("out", 100)) == without_tags(run.command("out", 100))
    extra = sorted(set(lineage_runs) - set(main_runs))
    assert extra == [
        "conditional_detr-dn_off-s0", "deformable_detr-dn_off-s0", "dino-dn_off-s0",
        "dino-dn_on-s0",
    ]  # fmt: skip
    overrides = dict(lineage_runs["dino-dn_on-s0"].overrides)
    assert overrides == dict(main_runs["rtdetr_v2-dn_on-s0"].overrides)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["conditional_detr-dn_off-s0", "deformable_detr-dn_off-s0", "dino-dn_on-s0"]
)
def test_lineage_only_runs_start_from_the_spec(name, tmp_path, monkeypatch):
    (run,) = [r for r in planned_lineage() if r.name == name]
    model = fit_one_step(run, tmp_path, monkeypatch)
    assert model.trainer.global_step == 1
    assert (model.net.num_queries, model.num_classes) == (16, 3)
    assert model.hparams.lr_linear_proj_mult == (0.1 if run.variant == "deformable_detr" else 1)
