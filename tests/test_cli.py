"""The command line: a few real steps from the experiment YAMLs.

Most tests call ``detr_lineage.cli.main`` in-process (an interpreter start costs more than the
steps); one runs ``python -m detr_lineage`` in a subprocess as a user would.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from detr_lineage.cli import main

ROOT = Path(__file__).resolve().parents[1]
# Shrink the toy configs to seconds: tiny data, 2 steps of validation.
TINY = [
    "--data.num_train=32",
    "--data.num_val=8",
    "--data.num_test=8",
    "--data.batch_size=4",
    "--data.num_workers=0",
]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "detr_lineage", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def fit(*args: str) -> None:
    main(["fit", *args, "--trainer.enable_progress_bar=false"])


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
@pytest.mark.parametrize(
    "configs, dn_terms",
    [
        (["experiments/toy/detr.yaml"], False),
        (["experiments/toy/detr.yaml", "experiments/ablations/with_denoising.yaml"], True),
        (["experiments/toy/dn_detr.yaml"], True),
        (["experiments/toy/dn_detr.yaml", "experiments/ablations/no_denoising.yaml"], False),
        (["experiments/toy/rtdetr_v2.yaml"], True),
        (["experiments/toy/rtdetr_v2.yaml", "experiments/ablations/no_denoising.yaml"], False),
    ],
    ids=["detr", "detr_dn", "dn_detr", "dn_detr_no_dn", "rtdetr_v2", "rtdetr_v2_no_dn"],
)
def test_fit_writes_csv_with_shared_names(tmp_path, configs, dn_terms):
    args = [a for c in configs for a in ("--config", str(ROOT / c))]
    fit(
        *args,
        *TINY,
        "--trainer.max_steps=5",
        "--trainer.log_every_n_steps=1",
        "--trainer.val_check_interval=5",
        f"--run.dir={tmp_path}",
        "--run.name=run",
    )
    rows = read_csv(tmp_path / "run" / "version_0" / "metrics.csv")
    columns = set(rows[0])
    shared = {"train/loss", "train/loss_class", "train/loss_bbox", "train/loss_giou"}
    shared |= {"train/loss_class_aux0", "val/loss", "val/map", "val/map_50", "time/wall_s"}
    shared |= {"val/near_miss", "val/duplicates"}
    assert shared <= columns
    assert ("train/loss_dn_giou" in columns) == dn_terms
    assert ("train/loss_enc_giou" in columns) == ("rtdetr" in configs[0])
    steps = [int(r["step"]) for r in rows if r["train/loss"]]
    assert steps == [0, 1, 2, 3, 4]
    assert (tmp_path / "run" / "version_0" / "checkpoints" / "last.ckpt").exists()


@pytest.mark.slow
def test_resume_continues_the_curve(tmp_path):
    common = ["--config", str(ROOT / "experiments/toy/detr.yaml"), *TINY]
    common += ["--trainer.log_every_n_steps=1", f"--run.dir={tmp_path}", "--run.name=r"]
    fit(*common, "--trainer.max_steps=3")
    ckpt = tmp_path / "r" / "version_0" / "checkpoints" / "last.ckpt"
    fit(*common, "--trainer.max_steps=6", f"--ckpt_path={ckpt}")
    rows = read_csv(tmp_path / "r" / "version_0" / "metrics.csv")
    steps = [int(r["step"]) for r in rows if r["train/loss"]]
    assert steps == [0, 1, 2, 3, 4, 5]
    walls = [float(r["time/wall_s"]) for r in rows if r["time/wall_s"]]
    assert walls == sorted(walls)  # the wall-time axis continues too
    assert not (tmp_path / "r" / "version_1").exists()


@pytest.mark.slow
def test_fast_dev_run_in_a_subprocess_and_print_config(tmp_path):
    cfg = ["--config", str(ROOT / "experiments/toy/detr.yaml"), *TINY]
    res = cli("fit", *cfg, "--trainer.fast_dev_run=true", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    res = cli("fit", *cfg, "--print_config", cwd=tmp_path)
    assert res.returncode == 0 and "class_path: detr_lineage.lit.DETR" in res.stdout


def test_unknown_config_key_is_named(capsys):
    cfg = ["--config", str(ROOT / "experiments/toy/detr.yaml")]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *cfg, "--model.init_args.num_querys=3", "--print_config"])
    assert exit_info.value.code != 0
    assert "num_querys" in capsys.readouterr().err


@pytest.mark.slow
def test_num_classes_smaller_than_data_is_named(tmp_path):
    cfg = ["--config", str(ROOT / "experiments/toy/detr.yaml"), *TINY]
    res = cli(
        "fit",
        *cfg,
        "--model.init_args.net.num_classes=3",
        "--trainer.max_steps=1",
        f"--run.dir={tmp_path}",
        cwd=tmp_path,
    )
    assert res.returncode != 0
    assert "num_classes=3 but the data has 6 classes" in res.stderr
