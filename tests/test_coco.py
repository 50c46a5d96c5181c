"""The COCO path end to end on COCO-format data written by the project itself:
toy shapes -> COCO files -> CocoDataModule -> evaluation, plus every bad input the data module
must reject (or skip) at setup time."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detr_lineage.data.coco import CocoDataModule, CocoFormatError, DatasetEpochCallback
from detr_lineage.data.coco_eval import (
    STAT_NAMES,
    evaluate_coco,
    to_coco_results,
    write_coco_results,
)
from detr_lineage.data.toy_shapes import CLASS_NAMES, ToyShapesDataset, get_preset
from detr_lineage.data.toy_to_coco import export_toy_to_coco

N_TRAIN, N_VAL, SIZE = 10, 8, 96


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("toy_coco")
    export_toy_to_coco(root, N_TRAIN, preset="easy", seed=3, split="train", image_size=SIZE)
    export_toy_to_coco(root, N_VAL, preset="crowded", seed=3, split="val", image_size=SIZE)
    return root


@pytest.fixture
def copy_root(toy_root: Path, tmp_path: Path) -> Path:
    """A private copy of the toy dataset that a test may corrupt."""
    return Path(shutil.copytree(toy_root, tmp_path / "coco"))


def _edit(root: Path, split: str, edit: Any) -> None:
    path = root / "annotations" / f"instances_{split}2017.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _dm(root: Path, **kwargs: Any) -> CocoDataModule:
    kwargs.setdefault("recipe", "none")
    kwargs.setdefault("num_workers", 0)
    return CocoDataModule(str(root), **kwargs)


def _pixel_boxes(target: dict[str, Any]) -> np.ndarray:
    """Target boxes as xyxy pixels of the original image."""
    h, w = target["orig_size"].tolist()
    cx, cy, bw, bh = (target["boxes"] * torch.tensor([w, h, w, h])).unbind(-1)
    return torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1).numpy()


def test_round_trip_matches_toy_shapes(toy_root: Path):
    dm = _dm(toy_root)
    dm.setup("fit")
    assert dm.num_classes == len(CLASS_NAMES)
    assert dm.class_names == list(CLASS_NAMES)
    assert dm.label_to_category_id == [2 * i + 1 for i in range(len(CLASS_NAMES))]
    toy = ToyShapesDataset(replace(get_preset("easy"), image_size=SIZE), "train", N_TRAIN, 3)
    train = dm.datasets["train"]
    assert len(train) == N_TRAIN
    max_objects = 0
    for index in range(N_TRAIN):
        image, target = train[index]
        toy_image, toy_target = toy[index]
        assert target["image_id"] == index + 1
        assert image.dtype == torch.float32 and image.shape == toy_image.shape
        assert (image - toy_image).abs().max() <= 0.5 / 255 + 1e-6
        assert target["labels"].tolist() == toy_target["labels"].tolist()
        np.testing.assert_allclose(_pixel_boxes(target), _pixel_boxes(toy_target), atol=0.5)
        assert target["orig_size"].tolist() == target["size"].tolist() == [SIZE, SIZE]
        max_objects = max(max_objects, len(target["labels"]))
    assert dm.max_objects == max_objects


@pytest.mark.parametrize("recipe", ["detr", "rtdetr"])
def test_batches_follow_the_contract(toy_root: Path, recipe: str):
    dm = _dm(
        toy_root,
        recipe=recipe,
        batch_size=4,
        detr_scales=(64, 80),
        detr_max_size=120,
        detr_crop_resize=(60, 70),
        detr_crop_size=(40, 60),
        detr_val_size=96,
        rtdetr_size=64,
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape[0] == 4 and batch["masks"].dtype == torch.bool
    assert batch["images"].min() >= 0.0 and batch["images"].max() <= 1.0
    for target in batch["targets"]:
        assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.long
        assert ((target["boxes"] >= 0) & (target["boxes"] <= 1)).all()
        if recipe == "rtdetr":
            assert target["size"].tolist() == [64, 64]
    val = next(iter(dm.val_dataloader()))
    expected = [96, 96] if recipe == "detr" else [64, 64]
    assert all(t["size"].tolist() == expected for t in val["targets"])


def _gt_detections(dm: CocoDataModule, split: str) -> list[dict[str, Any]]:
    dataset = dm.datasets[split]
    detections = []
    for index in range(len(dataset)):
        _, target = dataset[index]
        n = len(target["labels"])
        detections.append(
            {
                "image_id": target["image_id"],
                "boxes": torch.from_numpy(_pixel_boxes(target)),
                "scores": torch.linspace(1.0, 0.5, n),
                "labels": target["labels"],
            }
        )
    return detections


def test_ground_truth_as_predictions_scores_one(toy_root: Path, tmp_path: Path):
    dm = _dm(toy_root)
    dm.setup("validate")
    results = to_coco_results(_gt_detections(dm, "val"), dm.label_to_category_id)
    stats = evaluate_coco(dm.coco_gt("val"), results)
    assert list(stats) == list(STAT_NAMES)
    for name in ("map", "map_50", "map_75", "mar_100"):
        assert stats[name] == pytest.approx(1.0), name
    assert len(stats.summary.splitlines()) == 12
    # The written file is what pycocotools' loadRes expects.
    path = write_coco_results(tmp_path / "coco_results.json", results)
    dt = dm.coco_gt("val").loadRes(str(path))
    assert len(dt.getAnnIds()) == len(results)


def test_shifted_boxes_score_exactly_as_pycocotools(toy_root: Path, tmp_path: Path):
    """faster-coco-eval through our code == pycocotools run by hand on the same files."""
    dm = _dm(toy_root)
    dm.setup("validate")
    rng = np.random.default_rng(0)
    detections = _gt_detections(dm, "val")
    for det in detections:
        n = len(det["labels"])
        det["boxes"] = det["boxes"] + torch.from_numpy(rng.normal(0, 1.0, (n, 4))).float()
        det["scores"] = torch.from_numpy(rng.random(n)).float()
        flip = torch.from_numpy(rng.random(n) < 0.2)  # some wrong classes
        det["labels"] = torch.where(flip, (det["labels"] + 1) % len(CLASS_NAMES), det["labels"])
    results = to_coco_results(detections, dm.label_to_category_id)
    path = write_coco_results(tmp_path / "res.json", results)

    ann_file = toy_root / "annotations" / "instances_val2017.json"
    gt = COCO(str(ann_file))
    reference = COCOeval(gt, gt.loadRes(str(path)), "bbox")
    reference.evaluate()
    reference.accumulate()
    reference.summarize()

    ours = evaluate_coco(dm.coco_gt("val"), str(path))
    assert 0.05 < ours["map"] < 0.99
    np.testing.assert_allclose(list(ours.values()), reference.stats, rtol=0, atol=1e-12)
    ref_backend = evaluate_coco(dm.coco_gt("val"), results, backend="pycocotools")
    np.testing.assert_allclose(list(ref_backend.values()), reference.stats, rtol=0, atol=1e-12)


def test_empty_results_and_image_subset(toy_root: Path):
    dm = _dm(toy_root)
    dm.setup("validate")
    stats = evaluate_coco(dm.coco_gt("val"), [])
    assert stats["map"] == 0.0 and stats["mar_100"] == 0.0
    # Restricting to the images actually run: GT of image 1 only, predicted perfectly.
    det = [d for d in _gt_detections(dm, "val") if d["image_id"] == 1]
    stats = evaluate_coco(dm.coco_gt("val"), to_coco_results(det, dm.label_to_category_id), [1])
    assert stats["map"] == pytest.approx(1.0)


def test_limit_and_keep_empty(copy_root: Path):
    def empty_images_2_and_5(data: dict[str, Any]) -> None:
        data["annotations"] = [a for a in data["annotations"] if a["image_id"] not in (2, 5)]

    _edit(copy_root, "train", empty_images_2_and_5)
    _edit(copy_root, "val", empty_images_2_and_5)
    dm = _dm(copy_root)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == N_TRAIN
    assert len(dm.datasets["train"][1][1]["labels"]) == 0  # image id 2: empty but kept

    dm = _dm(copy_root, keep_empty=False, limit=4)
    dm.setup("fit")
    ids = [dm.datasets["train"][i][1]["image_id"] for i in range(len(dm.datasets["train"]))]
    assert ids == [1, 3, 4, 6]  # empties dropped first, then the first 4
    assert len(dm.datasets["val"]) == 4  # evaluation keeps empty images
    assert sorted(dm.coco_gt("val").getImgIds()) == [1, 2, 3, 4]
    assert sorted(dm.coco_gt("train").getImgIds()) == [1, 3, 4, 6]


def test_crowd_boxes_not_trained_but_evaluated(copy_root: Path):
    crowd_ids: list[int] = []

    def make_crowd(data: dict[str, Any]) -> None:
        for ann in data["annotations"]:
            if ann["image_id"] == 1:
                ann["iscrowd"] = 1
                crowd_ids.append(ann["id"])
                break

    _edit(copy_root, "val", make_crowd)
    dm = _dm(copy_root)
    dm.setup("validate")
    gt = dm.coco_gt("val")
    n_gt = len(gt.getAnnIds(imgIds=[1]))
    _, target = dm.datasets["val"][0]
    assert len(target["labels"]) == n_gt - 1
    assert gt.loadAnns(crowd_ids)[0]["iscrowd"] == 1


# ------------------------------------------------------------------------------ bad inputs
def test_missing_annotation_file(copy_root: Path):
    (copy_root / "annotations" / "instances_val2017.json").unlink()
    dm = _dm(copy_root)
    with pytest.raises(FileNotFoundError, match="instances_val2017.json"):
        dm.setup("fit")


def test_json_that_is_not_coco(copy_root: Path):
    (copy_root / "annotations" / "instances_train2017.json").write_text('{"images": []}')
    with pytest.raises(CocoFormatError, match=r"instances_train2017.json.*annotations"):
        _dm(copy_root).setup("fit")


def test_image_missing_on_disk(copy_root: Path):
    (copy_root / "train2017" / f"{3:012d}.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"image id 3: .*000000000003\.png"):
        _dm(copy_root).setup("fit")


def test_degenerate_boxes_are_skipped_and_counted(copy_root: Path, caplog):
    def degenerate(data: dict[str, Any]) -> None:
        data["annotations"][0]["bbox"][2] = 0.0
        data["annotations"][1]["bbox"][3] = -4.0

    _edit(copy_root, "train", degenerate)
    with caplog.at_level(logging.WARNING, logger="detr_lineage.data.coco"):
        dm = _dm(copy_root)
        dm.setup("fit")
    lines = [r.getMessage() for r in caplog.records if "non-positive" in r.getMessage()]
    assert len(lines) == 1 and "skipped 2 annotation(s)" in lines[0] and "ids 1, 2" in lines[0]
    n_boxes = sum(len(dm.datasets["train"][i][1]["labels"]) for i in range(N_TRAIN))
    n_anns = len(
        json.loads((copy_root / "annotations/instances_train2017.json").read_text())["annotations"]
    )
    assert n_boxes == n_anns - 2


def test_unknown_category_id(copy_root: Path):
    def bad_category(data: dict[str, Any]) -> None:
        data["annotations"][4]["category_id"] = 2  # toy ids are odd

    _edit(copy_root, "train", bad_category)
    with pytest.raises(CocoFormatError, match=r"annotation id 5 .*category id 2"):
        _dm(copy_root).setup("fit")


def test_duplicate_image_ids(copy_root: Path):
    def duplicate(data: dict[str, Any]) -> None:
        data["images"][3]["id"] = data["images"][2]["id"]

    _edit(copy_root, "train", duplicate)
    with pytest.raises(CocoFormatError, match=r"instances_train2017.json: duplicate image ids 3"):
        _dm(copy_root).setup("fit")


# --------------------------------------------------------------------- RT-DETR stop epoch
class _Recorder(L.LightningModule):
    """Records, per epoch, whether any image/box was changed by the strong augmentations."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.changed: dict[int, list[bool]] = {}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        for image, target in zip(batch["images"], batch["targets"], strict=True):
            full_box = torch.tensor([[0.5, 0.5, 1.0, 1.0]])
            changed = not (
                torch.allclose(image, torch.full_like(image, 128 / 255), atol=1e-6)
                and torch.allclose(target["boxes"], full_box, atol=1e-5)
            )
            self.changed.setdefault(self.current_epoch, []).append(changed)
        return self.weight.sum() * 0.0

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        raise AssertionError("val split is switched off: no validation batches")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_rtdetr_stop_epoch_with_persistent_workers(tmp_path: Path):
    """Flat grey images whose one box covers the image: only the strong ops (zoom-out,
    brightness) change them, so the last epoch must see them untouched."""
    (tmp_path / "train2017").mkdir()
    (tmp_path / "annotations").mkdir()
    images, anns = [], []
    for i in range(1, 13):
        Image.fromarray(np.full((40, 48, 3), 128, np.uint8)).save(tmp_path / f"train2017/{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": 48, "height": 40})
        anns.append(
            {
                "id": i,
                "image_id": i,
                "category_id": 7,
                "bbox": [0, 0, 48, 40],
                "area": 48 * 40,
                "iscrowd": 0,
            }
        )
    data = {"images": images, "annotations": anns, "categories": [{"id": 7, "name": "grey"}]}
    (tmp_path / "annotations/instances_train2017.json").write_text(json.dumps(data))

    L.seed_everything(0)
    dm = CocoDataModule(
        str(tmp_path),
        val_annotations=None,
        recipe="rtdetr",
        rtdetr_size=32,
        rtdetr_stop_epoch=2,
        batch_size=4,
        num_workers=1,
    )
    model = _Recorder()
    trainer = L.Trainer(
        max_epochs=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm)
    assert any(isinstance(cb, DatasetEpochCallback) for cb in trainer.callbacks)
    assert any(model.changed[0]) and any(model.changed[1])
    assert model.changed[2] == [False] * 12


def test_evaluation_loader_leaves_the_global_random_state_alone(toy_root: Path) -> None:
    """As for toy shapes: validating must not shift the random stream training draws from."""
    dm = _dm(toy_root, batch_size=2)
    dm.setup("fit")
    torch.manual_seed(123)
    state = torch.get_rng_state()
    for _ in range(2):
        assert len(list(dm.val_dataloader())) > 0
    assert torch.equal(torch.get_rng_state(), state)
