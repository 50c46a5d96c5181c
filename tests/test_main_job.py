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


@pytest.mark.slow
@pytest.mark.parametrize("index", range(6))
def test_every_main_job_run_starts_from_the_spec(index, tmp_path, monkeypatch):
    run = planned()[index]
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
    assert model.trainer.global_step == 1  # one optimiser step was taken
    assert (model.net.denoising is not None) == (run.denoising == "on")
    assert type(model).__name__ == {"detr": "DETR", "dn_detr": "DNDETR"}.get(
        run.variant, "RTDETRv2"
    )
