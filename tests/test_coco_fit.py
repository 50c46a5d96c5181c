"""The whole COCO path end to end on toy data exported as COCO: fit two steps, then test.

Runs the CLI in-process (``detr_lineage.cli.main``) to spare an interpreter start per call.
"""

from __future__ import annotations

import json

import pytest
from pycocotools.coco import COCO

from detr_lineage.cli import main
from detr_lineage.data.toy_to_coco import export_toy_to_coco
from tests.test_cli import ROOT


@pytest.fixture(scope="module")
def toy_coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    export_toy_to_coco(root, 8, split="train", seed=0, image_size=64)
    export_toy_to_coco(root, 8, split="val", seed=1, image_size=64)
    data = root / "data.yaml"
    data.write_text(
        "data:\n"
        "  class_path: detr_lineage.data.coco.CocoDataModule\n"
        "  init_args:\n"
        f"    root: {root}\n"
        "    recipe: none\n"
        "    batch_size: 4\n"
        "    num_workers: 0\n"
        "    pin_memory: false\n"
    )
    return root, data


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["detr", "dn_detr", "rtdetr_v2"])
def test_fit_and_test_on_exported_toy_coco(tmp_path, toy_coco, variant, capsys):
    root, data = toy_coco
    cfg = ["--config", str(ROOT / f"experiments/toy/{variant}.yaml"), "--config", str(data)]
    run = [f"--run.dir={tmp_path}", "--run.name=r", "--trainer.enable_progress_bar=false"]
    main(["fit", *cfg, *run, "--trainer.max_steps=2", "--trainer.log_every_n_steps=1"])
    ckpt = tmp_path / "r" / "version_0" / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    main(["test", *cfg, *run, f"--ckpt_path={ckpt}"])
    out = capsys.readouterr().out
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in out
    results = tmp_path / "r" / "test_0" / "coco_results.json"  # the test's own directory
    detections = json.loads(results.read_text())
    categories = {1, 3, 5, 7, 9, 11}  # the exporter's non-contiguous ids
    assert detections and {d["category_id"] for d in detections} <= categories
    gt = COCO(str(root / "annotations" / "instances_val2017.json"))
    gt.loadRes(str(results))  # the official tool accepts the file
