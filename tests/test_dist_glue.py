"""Distributed glue under a real 2-process gloo group on CPU: the box count that normalises the
losses is averaged over processes, and the evaluation (official COCO evaluator and the toy
torchmetrics mAP) sees every process's detections, so every rank reports the single-process
numbers. (DDP training itself: tests/test_ddp.py.)"""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detr_lineage.criterion import SetCriterion, num_boxes_across_processes
from detr_lineage.data.coco import CocoDataModule
from detr_lineage.lit import DETR
from detr_lineage.matcher import HungarianMatcher
from detr_lineage.nn.backbone import BackboneConfig
from tests.helpers import make_module

from .test_orig_sizes import CATEGORY_IDS, write_dataset

pytestmark = pytest.mark.slow  # two spawned interpreters: ~15 s idle, ~50 s loaded

BOXES_PER_RANK = [3, 6]


def targets_of(rank: int) -> list[dict]:
    g = torch.Generator().manual_seed(rank)
    n = BOXES_PER_RANK[rank]
    boxes = torch.cat([torch.rand(n, 2, generator=g) * 0.4 + 0.3, torch.full((n, 2), 0.2)], 1)
    return [{"boxes": boxes, "labels": torch.arange(n) % 3}]


def outputs_of(rank: int) -> dict:
    g = torch.Generator().manual_seed(10 + rank)
    return {
        "pred_logits": torch.randn(1, 8, 4, generator=g),
        "pred_boxes": torch.rand(1, 8, 4, generator=g) * 0.3 + 0.35,
    }


def detections_of(rank: int, truth: dict) -> list[dict]:
    """Rank 0: perfect detections of images 1-3; rank 1: images 4-5 with the wrong class."""
    dets = []
    for image_id in [1, 2, 3] if rank == 0 else [4, 5]:
        boxes = torch.tensor([b for b, _ in truth[image_id]], dtype=torch.float32)
        labels = torch.tensor([CATEGORY_IDS.index(c) for _, c in truth[image_id]])
        if rank == 1:
            labels = (labels + 1) % 3
        # distinct scores: with ties the evaluators' order (hence AP) depends on update order
        scores = 1.0 - 0.01 * (3 * image_id + torch.arange(len(labels), dtype=torch.float32))
        dets.append(
            {
                "image_id": image_id,
                "boxes": boxes,
                "labels": labels,
                "scores": scores,
            }
        )
    return dets


def toy_images(rank: int, truth: dict) -> list[dict]:
    """The module's per-image evaluation entries (toy data path); rank 1 also holds a repeat of
    image 4 (a padding sampler repeats images), which must count once."""
    dets = detections_of(rank, truth)
    dets = dets + dets[:1] if rank == 1 else dets
    out = []
    for det in dets:
        gt = {"boxes": det["boxes"], "labels": (det["labels"] - rank) % 3}
        pred = {k: det[k] for k in ("boxes", "labels", "scores")}
        out.append({"image_id": det["image_id"], "det": pred, "gt": gt})
    return out


def logged_map(module: DETR, images: list[dict]) -> float:
    """``val/map`` as the module logs it at the end of a validation epoch."""
    logged: dict[str, float] = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, float(value))
    module._eval_images = images
    module._log_map("val")
    return logged["val/map"]


def tiny_module() -> DETR:
    bb = BackboneConfig("conv", channels=[8, 8, 8, 8], return_strides=[16])
    return make_module(DETR, 3, backbone=bb, d_model=16, nhead=2, num_encoder_layers=1,
                num_decoder_layers=1, dim_feedforward=16, num_queries=4)  # fmt: skip


def criterion() -> SetCriterion:
    return SetCriterion(3, HungarianMatcher(1.0, 5.0, 2.0, "softmax"), "ce")


def _worker(rank: int, world: int, tmp: str) -> None:
    from pathlib import Path

    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=world)
    try:
        out = {"num_boxes": num_boxes_across_processes(targets_of(rank), torch.device("cpu"))}
        losses = criterion()(outputs_of(rank), targets_of(rank))
        out["losses"] = {k: float(v) for k, v in losses.items()}
        truth = {int(k): v for k, v in json.loads(Path(tmp, "truth.json").read_text()).items()}
        dm = CocoDataModule(tmp, train_annotations=None, recipe="none", num_workers=0)
        module = tiny_module()
        module._coco_detections = detections_of(rank, truth)
        out["coco"] = module._coco_evaluate(dm, "val")
        out["toy_map"] = logged_map(tiny_module(), toy_images(rank, truth))
        Path(tmp, f"rank{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    truth = write_dataset(tmp)
    (tmp / "truth.json").write_text(json.dumps(truth))
    mp.spawn(_worker, args=(2, str(tmp)), nprocs=2, join=True)
    ranks = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)]
    return tmp, truth, ranks


def test_box_count_is_averaged_over_processes(two_ranks):
    _, _, ranks = two_ranks
    mean = sum(BOXES_PER_RANK) / 2
    assert [r["num_boxes"] for r in ranks] == [mean, mean]
    # each rank's box terms are its sums divided by the mean count, not its own count
    for rank, r in enumerate(ranks):
        local = criterion()(outputs_of(rank), targets_of(rank))
        scale = BOXES_PER_RANK[rank] / mean
        for key in ("loss_bbox", "loss_giou"):
            assert r["losses"][key] == pytest.approx(float(local[key]) * scale, rel=1e-6)
        # DETR's CE is a mean over queries: the box count does not enter it
        assert r["losses"]["loss_class"] == pytest.approx(float(local["loss_class"]), rel=1e-6)


def test_coco_evaluation_gathers_every_process(two_ranks):
    tmp, truth, ranks = two_ranks
    dm = CocoDataModule(str(tmp), train_annotations=None, recipe="none", num_workers=0)
    module = tiny_module()
    module._coco_detections = detections_of(0, truth) + detections_of(1, truth)
    single = module._coco_evaluate(dm, "val")  # one process, every detection
    assert 0.0 < single["map"] < 1.0  # rank 0 alone would score 1, rank 1 alone 0
    for r in ranks:
        assert r["coco"] == pytest.approx(single)


def test_toy_map_is_synchronised_across_processes(two_ranks):
    _, truth, ranks = two_ranks
    single = logged_map(tiny_module(), toy_images(0, truth) + toy_images(1, truth)[:2])
    assert 0.0 < single < 1.0
    assert [r["toy_map"] for r in ranks] == pytest.approx([single, single])
