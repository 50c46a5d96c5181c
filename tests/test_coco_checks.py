"""COCO-format data that would train or evaluate wrong without a word (issue 11, point 5):
splits without boxes, boxes outside their image, JSON sizes that disagree with the pixels,
images that cannot be decoded."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest

from detr_lineage.data.coco import CocoFormatError
from tests.test_coco import N_TRAIN, N_VAL, SIZE, _dm, _edit, toy_root  # noqa: F401


@pytest.fixture
def root(toy_root: Path, tmp_path: Path) -> Path:  # noqa: F811
    """A private copy of the toy COCO export that a test may corrupt."""
    return Path(shutil.copytree(toy_root, tmp_path / "coco"))


def _annotations(root: Path, split: str) -> list[dict[str, Any]]:
    path = root / "annotations" / f"instances_{split}2017.json"
    return json.loads(path.read_text())["annotations"]


def _n_boxes(dataset) -> int:
    return sum(len(dataset[i][1]["labels"]) for i in range(len(dataset)))


def test_train_split_without_a_trainable_box_warns(root: Path):
    def all_crowd(data: dict[str, Any]) -> None:
        for ann in data["annotations"]:
            ann["iscrowd"] = 1

    _edit(root, "train", all_crowd)
    with pytest.warns(UserWarning, match="train split has no trainable box"):
        _dm(root).setup("fit")


def test_val_split_without_ground_truth_stops_at_set_up(root: Path):
    _edit(root, "val", lambda data: data.update(annotations=[]))
    with pytest.raises(CocoFormatError, match=rf"val split \({N_VAL} images\) has no ground-truth"):
        _dm(root).setup("fit")
    _dm(root).setup("test")  # testing on unlabelled images (e.g. for a submission) is fine


def test_boxes_outside_the_image_are_counted_in_the_skip_line(root: Path, caplog):
    def outside(data: dict[str, Any]) -> None:
        data["annotations"][0]["bbox"][2] = 0.0  # degenerate: id 1
        data["annotations"][1]["bbox"][:2] = [SIZE + 5.0, 3.0]  # right of the image: id 2
        data["annotations"][2]["bbox"][:2] = [3.0, -500.0]  # above it: id 3

    _edit(root, "train", outside)
    with caplog.at_level(logging.WARNING, logger="detr_lineage.data.coco"):
        dm = _dm(root)
        dm.setup("fit")
    lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(lines) == 1
    assert "skipped 3 annotation(s): 1 with non-positive width or height (ids 1); " in lines[0]
    assert "2 lying entirely outside their image (ids 2, 3)" in lines[0]
    assert _n_boxes(dm.datasets["train"]) == len(_annotations(root, "train")) - 3


def _wrong_size(data: dict[str, Any]) -> None:
    image = next(img for img in data["images"] if img["id"] == 2)
    image["width"] = SIZE + 32


def test_json_size_different_from_the_image_names_the_image(root: Path):
    _edit(root, "train", _wrong_size)
    dm = _dm(root)
    dm.setup("fit")
    message = rf"image id 2 \(.*000000000002\.png\) is {SIZE}x{SIZE} pixels but .* {SIZE + 32}x"
    with pytest.raises(CocoFormatError, match=message):
        dm.datasets["train"][1]
    with pytest.raises(CocoFormatError, match=message):  # at set-up, on request
        _dm(root, check_images=True).setup("fit")


def _corrupt(root: Path, split: str, image_id: int) -> None:
    (root / f"{split}2017" / f"{image_id:012d}.png").write_bytes(b"not a png at all")


def test_check_images_finds_an_undecodable_image_at_set_up(root: Path):
    _corrupt(root, "train", 3)
    _dm(root).setup("fit")  # off by default: found only when the image loads
    with pytest.raises(CocoFormatError, match=r"1 image\(s\) of .* cannot be decoded: image id 3"):
        _dm(root, check_images=True).setup("fit")


def test_skip_unreadable_drops_and_counts(root: Path):
    _corrupt(root, "train", 3)
    _corrupt(root, "val", 2)
    with pytest.warns(UserWarning) as record:
        dm = _dm(root, skip_unreadable=True)
        dm.setup("fit")
    messages = sorted(str(w.message) for w in record if "cannot be decoded" in str(w.message))
    assert messages[0].startswith(f"train split: skipped 1 of {N_TRAIN} image(s)")
    assert "image id 3" in messages[0]
    assert messages[1].startswith(f"val split: skipped 1 of {N_VAL} image(s)")
    ids = [dm.datasets["train"][i][1]["image_id"] for i in range(len(dm.datasets["train"]))]
    assert ids == [i for i in range(1, N_TRAIN + 1) if i != 3]
    assert 2 not in dm.coco_gt("val").getImgIds() and len(dm.coco_gt("val").getImgIds()) == 7
