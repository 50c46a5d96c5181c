"""Distributed validation counts every image once (issue 11, point 7).

Two processes (Lightning DDP on CPU, gloo) and one process validate the same checkpoint of a
tiny DN-DETR (denoising on) on the same 5 images (a set two processes cannot split evenly):
val/map and every val/loss* must agree, on the toy data and on COCO-format data. The DDP
``fit`` itself writes one run directory (rank 1 none) and its final validation agrees with
one process too. Other tests may reuse ``TINY_DN``, ``DDP``, ``cli_run`` and ``val_row``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from detr_lineage.cli import main
from detr_lineage.data.toy_to_coco import export_toy_to_coco
from tests.test_cli import ROOT, read_csv

pytestmark = pytest.mark.slow

NUM_VAL = 5  # odd: the default DistributedSampler would repeat one image on 2 processes
TINY_DN = [
    "--config",
    str(ROOT / "experiments/toy/dn_detr.yaml"),
    "--data.num_train=8",
    f"--data.num_val={NUM_VAL}",
    f"--data.num_test={NUM_VAL}",
    "--data.batch_size=1",  # val/loss is a mean over batches: equal batches on 1 and 2 processes
    "--data.num_workers=0",
    "--model.init_args.net.d_model=32",
    "--model.init_args.net.nhead=4",
    "--model.init_args.net.dim_feedforward=64",
    "--model.init_args.net.num_encoder_layers=1",
    "--model.init_args.net.num_decoder_layers=2",
    "--model.init_args.net.num_queries=10",
    "--model.init_args.num_select=10",
    "--trainer.accelerator=cpu",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]
DDP = ["--trainer.strategy=ddp", "--trainer.devices=2"]


def cli_run(*args: str, cwd: Path, wandb: str = "disabled") -> None:
    env = {**os.environ, "WANDB_MODE": wandb, "OMP_NUM_THREADS": "1"}
    env = {k: v for k, v in env.items() if k not in ("MASTER_PORT", "LOCAL_RANK", "RANK")}
    res = subprocess.run(
        [sys.executable, "-m", "detr_lineage", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-4000:]


def val_row(metrics_csv: Path) -> dict[str, float]:
    """The last row with val/map, as floats (val/* columns only)."""
    rows = [r for r in read_csv(metrics_csv) if r.get("val/map")]
    return {k: float(v) for k, v in rows[-1].items() if k.startswith("val/") and v != ""}


def assert_same(one: dict[str, float], two: dict[str, float]) -> None:
    assert one.keys() == two.keys()
    assert {"val/map", "val/map_50", "val/loss", "val/loss_class", "val/loss_giou"} <= one.keys()
    assert two == pytest.approx(one, rel=1e-5, abs=1e-7)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    """A 2-step DDP fit (validation at the end); W&B offline on: its run directory."""
    tmp = tmp_path_factory.mktemp("ddp")
    cli_run(
        "fit",
        *TINY_DN,
        *DDP,
        "--trainer.max_steps=2",
        "--trainer.val_check_interval=2",
        "--trainer.log_every_n_steps=1",
        f"--run.dir={tmp}",
        "--run.name=r",
        cwd=tmp,
        wandb="offline",
    )
    return tmp / "r"


def test_ddp_fit_writes_one_run_directory(ddp_run):
    assert sorted(p.name for p in ddp_run.iterdir()) == ["version_0"]
    wandb_runs = list((ddp_run / "version_0").glob("wandb/offline-run-*"))
    assert len(wandb_runs) == 1  # rank 0 only
    steps = [int(r["step"]) for r in read_csv(ddp_run / "version_0" / "metrics.csv")]
    assert steps and max(steps) <= 2


def test_ddp_validation_equals_one_process_on_toy_data(ddp_run):
    ckpt = ddp_run / "version_0" / "checkpoints" / "last.ckpt"
    common = [*TINY_DN, f"--run.dir={ddp_run.parent}", "--run.name=r", f"--ckpt_path={ckpt}"]
    main(["validate", *common])  # one process, in this one
    cli_run("validate", *common, *DDP, cwd=ddp_run.parent)
    assert sorted(p.name for p in ddp_run.iterdir()) == ["validate_0", "validate_1", "version_0"]
    one = val_row(ddp_run / "validate_0" / "metrics.csv")
    assert_same(one, val_row(ddp_run / "validate_1" / "metrics.csv"))
    # The DDP fit's own validation at step 2 saw the same weights (last.ckpt) and images.
    assert_same(one, val_row(ddp_run / "version_0" / "metrics.csv"))


def test_ddp_validation_equals_one_process_on_coco_data(ddp_run, tmp_path):
    export_toy_to_coco(tmp_path, 4, split="train", seed=0, image_size=64)
    export_toy_to_coco(tmp_path, NUM_VAL, split="val", seed=1, image_size=64)
    data = tmp_path / "data.yaml"
    data.write_text(
        "data:\n"
        "  class_path: detr_lineage.data.coco.CocoDataModule\n"
        "  init_args:\n"
        f"    root: {tmp_path}\n"
        "    recipe: none\n"
        "    batch_size: 1\n"
        "    num_workers: 0\n"
        "    pin_memory: false\n"
    )
    ckpt = ddp_run / "version_0" / "checkpoints" / "last.ckpt"
    args = [*TINY_DN[:2], "--config", str(data), *TINY_DN[7:]]  # the toy data options dropped
    common = [*args, f"--run.dir={tmp_path}", "--run.name=c", f"--ckpt_path={ckpt}"]
    main(["validate", *common])
    cli_run("validate", *common, *DDP, cwd=tmp_path)
    one = val_row(tmp_path / "c" / "validate_0" / "metrics.csv")
    assert one["val/map_50"] >= 0.0  # evaluated (the COCO evaluator reports -1 without GT)
    assert_same(one, val_row(tmp_path / "c" / "validate_1" / "metrics.csv"))


# -- the gathering itself, with detections that score (the tiny models above score 0 mAP) ----
def _image(i: int) -> dict:
    """Image i: two ground-truth boxes and detections of varying quality (one misses)."""
    g = torch.Generator().manual_seed(i)
    xy = torch.rand(2, 2, generator=g) * 50
    gt = torch.cat([xy, xy + 20 + torch.rand(2, 2, generator=g) * 20], 1)
    boxes = gt + torch.randn(2, 4, generator=g) * (2 + 3 * i)
    boxes = torch.cat([boxes, torch.tensor([[70.0, 70, 90, 90]])])
    det = {"boxes": boxes, "scores": torch.rand(3, generator=g), "labels": torch.tensor([0, 1, 0])}
    return {"image_id": i, "det": det, "gt": {"boxes": gt, "labels": torch.tensor([0, 1])}}


def _map(images: list[dict]) -> float:
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(box_format="xyxy", backend="faster_coco_eval")
    metric.update([i["det"] for i in images], [i["gt"] for i in images])
    return float(metric.compute()["map"])


def _gather_worker(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    from detr_lineage.lit.base import gather_unique

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    # Lightning's default DistributedSampler on 5 images: rank 0 [0, 2, 4], rank 1 [1, 3, 0].
    mine = [_image(i) for i in ([0, 2, 4], [1, 3, 0])[rank]]
    gathered: list = [None, None]
    dist.all_gather_object(gathered, mine)
    naive = [item for part in gathered for item in part]  # what torchmetrics' sync did
    unique = gather_unique(mine)
    Path(f"{out}{rank}").write_text(
        f"{[i['image_id'] for i in unique]};{_map(unique)!r};{_map(naive)!r}"
    )
    dist.destroy_process_group()


def test_gather_unique_counts_a_repeated_image_once(tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "rank")
    # fork: the children need no fresh interpreter (importing torchmetrics costs ~20 s each)
    args = (str(tmp_path / "store"), out)
    mp.start_processes(_gather_worker, args=args, nprocs=2, start_method="fork")
    one = _map([_image(i) for i in range(NUM_VAL)])
    for rank in (0, 1):
        ids, unique, naive = Path(f"{out}{rank}").read_text().split(";")
        assert ids == "[0, 1, 2, 3, 4]"
        assert float(unique) == pytest.approx(one, abs=1e-12)
        assert abs(float(naive) - one) > 1e-3  # image 0 twice: the old count was wrong
