"""A training run's files survive every later command (issue 11, points 1 and 2).

``test`` / ``validate`` / ``predict`` write into their own directory and never touch the
training run's ``metrics.csv`` or ``config.yaml``; ``last.ckpt`` is always the latest state,
so a finished run extended with a larger ``max_steps`` continues from its last step.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from detr_lineage.cli import CheckpointMismatchError, main, next_index
from tests.test_cli import ROOT, TINY, read_csv

# A tiny DETR; lr 0 keeps its weights (and so val/map) fixed: a plateau, as in DETR's first
# thousand steps, where no validation improves on the first one.
TINY_DETR = [
    "--config",
    str(ROOT / "experiments/toy/detr.yaml"),
    *TINY,
    "--model.init_args.net.d_model=32",
    "--model.init_args.net.nhead=4",
    "--model.init_args.net.dim_feedforward=64",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def run_cmd(subcommand: str, tmp_path: Path, *args: str) -> None:
    main([subcommand, *TINY_DETR, f"--run.dir={tmp_path}", "--run.name=r", *args])


def global_step(ckpt: Path) -> int:
    return int(torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 4-step run (validations at steps 2 and 4): its version directory."""
    tmp_path = tmp_path_factory.mktemp("trained")
    run_cmd("fit", tmp_path, "--trainer.max_steps=4", "--trainer.val_check_interval=2")
    return tmp_path / "r" / "version_0"


@pytest.mark.slow
def test_test_validate_predict_leave_the_training_run_untouched(trained):
    version, tmp_path = trained, trained.parents[1]
    before = {name: (version / name).read_bytes() for name in ("metrics.csv", "config.yaml")}
    best = next((version / "checkpoints").glob("best-*.ckpt"))
    assert global_step(best) < 4  # the rows after the best step are the ones that used to go

    run_cmd("test", tmp_path, f"--ckpt_path={best}")
    run_cmd("validate", tmp_path, f"--ckpt_path={version / 'checkpoints' / 'last.ckpt'}")
    run_cmd("test", tmp_path, f"--ckpt_path={best}")
    run_cmd("predict", tmp_path, f"--ckpt_path={best}")

    after = {name: (version / name).read_bytes() for name in before}
    assert after == before
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [
        "predict_0",
        "test_0",
        "test_1",
        "validate_0",
        "version_0",
    ]
    test_rows = read_csv(tmp_path / "r" / "test_1" / "metrics.csv")
    assert "test/map" in test_rows[0] and "train/loss" not in test_rows[0]
    assert "val/map" in read_csv(tmp_path / "r" / "validate_0" / "metrics.csv")[0]
    last = version / "checkpoints" / "last.ckpt"
    for stage, ckpt in (("test_0", best), ("validate_0", last), ("predict_0", best)):
        assert f"ckpt_path: {ckpt}" in (tmp_path / "r" / stage / "config.yaml").read_text()


@pytest.mark.slow
def test_last_ckpt_is_the_final_step_and_extending_continues(tmp_path):
    plateau = ["--model.init_args.lr=0", "--model.init_args.lr_backbone=0"]
    run_cmd("fit", tmp_path, *plateau, "--trainer.max_steps=5", "--trainer.val_check_interval=2")
    version = tmp_path / "r" / "version_0"
    rows = read_csv(version / "metrics.csv")
    maps = [float(r["val/map"]) for r in rows if r.get("val/map")]
    assert len(maps) == 2 and maps[0] == maps[1]  # no improvement after the first validation
    last = version / "checkpoints" / "last.ckpt"
    assert global_step(last) == 5

    run_cmd("fit", tmp_path, *plateau, "--trainer.max_steps=7", f"--ckpt_path={last}")
    rows = read_csv(version / "metrics.csv")
    steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert steps == list(range(7))  # steps 5 and 6 added; none redone
    assert global_step(last) == 7
    assert not (tmp_path / "r" / "version_1").exists()


def files_of(version: Path) -> dict[str, bytes]:
    return {name: (version / name).read_bytes() for name in ("metrics.csv", "config.yaml")}


@pytest.mark.slow
def test_checkpoint_of_another_variant_is_refused(trained):
    before = files_of(trained)
    ckpt = trained / "checkpoints" / "last.ckpt"
    rtdetr = ["--config", str(ROOT / "experiments/toy/rtdetr_v2.yaml"), *TINY]
    with pytest.raises(CheckpointMismatchError) as error:
        main(["test", *rtdetr, f"--run.dir={trained.parents[1]}", f"--ckpt_path={ckpt}"])
    message = str(error.value)
    assert (
        "variant: detr_lineage.lit.DETR in the checkpoint, detr_lineage.lit.RTDETRv2 in the config"
        in message
    )
    assert "--model_from_checkpoint=true" in message.splitlines()[0]
    assert message.splitlines()[-1].startswith("  variant: ")  # the cause is the last line
    assert files_of(trained) == before


@pytest.mark.slow
def test_hyper_parameter_mismatch_is_refused_unless_asked_for(trained):
    before = files_of(trained)
    ckpt = trained / "checkpoints" / "last.ckpt"
    args = ["--model.init_args.net.num_queries=30", "--model.init_args.eos_coef=0.2"]
    args.append(f"--ckpt_path={ckpt}")
    with pytest.raises(CheckpointMismatchError) as error:
        run_cmd("fit", trained.parents[1], *args, "--trainer.max_steps=6")
    assert str(error.value).splitlines()[1:3] == [
        "  eos_coef: 0.1 in the checkpoint, 0.2 in the config",
        "  net.num_queries: 20 in the checkpoint, 30 in the config",
    ]
    assert files_of(trained) == before

    # Knowingly: the checkpoint's model is built, and recorded as what ran.
    n = next_index(trained.parent, "test_")
    run_cmd("test", trained.parents[1], *args, "--model_from_checkpoint=true")
    config = yaml.safe_load((trained.parent / f"test_{n}" / "config.yaml").read_text())
    assert config["model"]["init_args"]["net"]["num_queries"] == 20
    assert config["model"]["init_args"]["eos_coef"] == 0.1
    assert files_of(trained) == before
