"""COCO (or any COCO-format detection dataset) as a LightningDataModule.

Annotation files are parsed and checked once, when the data module is set up, so that a bad
file fails before training starts with an error that names the file and the offending
image/annotation ids (``CocoFormatError``), never hours into an epoch. What the official
loaders (torchvision ``CocoDetection`` + DETR's ``ConvertCocoPolysToMask``) do is kept:

- images in increasing id order; ``limit`` keeps the first N (after ``keep_empty``);
- crowd annotations (``iscrowd=1``) are not trained on, but stay in the evaluation ground truth;
- boxes with a non-positive width or height, and boxes lying entirely outside their image
  (by the JSON ``width``/``height``), are skipped and counted in one log line; the rest are
  clamped to the image;
- a ``width``/``height`` in the JSON that differs from the decoded image is an error naming
  the image (found when the image is loaded, or at set-up with ``check_images``);
  ``check_images`` decodes every image at set-up, ``skip_unreadable`` drops the images that
  cannot be decoded (counted in a warning) instead of stopping;
- a training split without a single trainable box warns (the model would learn background
  only); a validation split without one stops at set-up (its mAP, the checkpoint monitor,
  would be -1);
- category ids are mapped to contiguous 0-based labels in increasing id order
  (``label_to_category_id`` maps back for evaluation; ``num_classes`` = number of categories,
  not max id + 1).

Parsed annotations live in flat numpy arrays, so forked DataLoader workers share them instead of
copying millions of small Python objects (the reason RT-DETR serialises its annotation lists).

Epoch-dependent augmentation (RT-DETRv2's ``stop_epoch``): ``CocoDataModule.set_epoch`` writes
the epoch into shared memory that persistent workers read. ``DatasetEpochCallback`` calls it at
the start of every training epoch; ``setup("fit")`` attaches that callback to the trainer if it
is not there already, so nothing needs to be added to a config.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import random
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from detr_lineage.data.collate import DetectionLoader, collate_detection, evaluation_sampler
from detr_lineage.data.transforms import (
    DETR_CROP_RESIZE,
    DETR_CROP_SIZE,
    DETR_MAX_SIZE,
    DETR_SCALES,
    DETR_VAL_SIZE,
    RTDETR_SIZE,
    DetectionTransform,
    Recipe,
    build_transform,
)

__all__ = [
    "SPLITS",
    "CocoDataModule",
    "CocoDetection",
    "CocoFormatError",
    "CocoImages",
    "DatasetEpochCallback",
    "load_coco_file",
]

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")
_REQUIRED_KEYS: tuple[str, ...] = ("images", "annotations", "categories")
_MAX_LISTED = 5  # ids quoted in an error message

Target = dict[str, Any]


class CocoFormatError(ValueError):
    """An annotation file that is not usable COCO; the message names the file and the ids."""


def _ids_text(ids: Sequence[Any]) -> str:
    shown = ", ".join(str(i) for i in list(ids)[:_MAX_LISTED])
    return shown + (f", ... ({len(ids)} in total)" if len(ids) > _MAX_LISTED else "")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {path}")
    try:
        with path.open() as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise CocoFormatError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CocoFormatError(f"{path} is not a COCO file: top level is {type(data).__name__}")
    missing = [k for k in _REQUIRED_KEYS if k not in data]
    if missing:
        raise CocoFormatError(
            f"{path} is not a COCO detection file: missing key(s) {', '.join(missing)} "
            f"(found: {', '.join(sorted(data)) or 'nothing'})"
        )
    for key in _REQUIRED_KEYS:
        if not isinstance(data[key], list):
            raise CocoFormatError(f"{path}: '{key}' must be a list, got {type(data[key]).__name__}")
    return data


@dataclass
class _CocoFile:
    """One validated annotation file: categories, images sorted by id, trainable boxes."""

    path: Path
    dataset: dict[str, Any]  # the raw JSON (kept only while an evaluation GT may be needed)
    categories: list[dict[str, Any]]  # sorted by id
    image_ids: np.ndarray  # int64 [N], increasing
    file_names: list[str]  # [N]
    image_rows: np.ndarray  # int64 [N]: row of each image in dataset["images"]
    image_sizes: np.ndarray  # int64 [N,2]: (height, width) from the JSON, 0 where not given
    ann_start: np.ndarray  # int64 [N+1]: trainable boxes of image i are [start[i], start[i+1])
    boxes: np.ndarray  # float32 [M,4] xywh pixels (non-crowd, positive width and height)
    labels: np.ndarray  # int64 [M] contiguous 0-based
    num_skipped: int  # boxes skipped for a non-positive width/height or lying outside


def load_coco_file(path: str | os.PathLike[str]) -> _CocoFile:
    """Read and validate a COCO detection file; raise ``CocoFormatError`` naming what is wrong."""
    path = Path(path)
    data = _read_json(path)

    categories = data["categories"]
    for i, cat in enumerate(categories):
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int):
            raise CocoFormatError(f"{path}: categories[{i}] has no integer 'id'")
    dup_cats = [cid for cid, n in Counter(c["id"] for c in categories).items() if n > 1]
    if dup_cats:
        raise CocoFormatError(f"{path}: duplicate category ids {_ids_text(sorted(dup_cats))}")
    categories = sorted(categories, key=lambda c: c["id"])
    cat_to_label = {c["id"]: label for label, c in enumerate(categories)}

    images = data["images"]
    for i, img in enumerate(images):
        if not isinstance(img, dict) or not isinstance(img.get("id"), int):
            raise CocoFormatError(f"{path}: images[{i}] has no integer 'id'")
        if not isinstance(img.get("file_name"), str):
            raise CocoFormatError(f"{path}: image id {img['id']} has no 'file_name'")
    dup_images = [iid for iid, n in Counter(img["id"] for img in images).items() if n > 1]
    if dup_images:
        raise CocoFormatError(f"{path}: duplicate image ids {_ids_text(sorted(dup_images))}")
    image_rows = np.array(sorted(range(len(images)), key=lambda r: images[r]["id"]), np.int64)
    image_ids = np.array([images[r]["id"] for r in image_rows], dtype=np.int64)
    image_sizes = np.array([_json_size(images[r]) for r in image_rows], np.int64).reshape(-1, 2)
    index_of_image = {int(iid): i for i, iid in enumerate(image_ids)}

    owners: list[int] = []  # image index of each trainable box
    boxes: list[list[float]] = []
    labels: list[int] = []
    skipped: list[Any] = []  # non-positive width or height
    outside: list[Any] = []  # no area left once clamped to the image
    ann_ids: list[Any] = []
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "id" not in ann:
            raise CocoFormatError(f"{path}: annotations[{i}] has no 'id'")
        aid = ann["id"]
        ann_ids.append(aid)
        image_index = index_of_image.get(ann.get("image_id"))  # type: ignore[arg-type]
        if image_index is None:
            raise CocoFormatError(
                f"{path}: annotation id {aid} refers to image id {ann.get('image_id')!r}, "
                "which is not in 'images'"
            )
        label = cat_to_label.get(ann.get("category_id"))  # type: ignore[arg-type]
        if label is None:
            raise CocoFormatError(
                f"{path}: annotation id {aid} (image id {ann['image_id']}) has category id "
                f"{ann.get('category_id')!r}, which is not in 'categories' "
                f"(ids {_ids_text([c['id'] for c in categories])})"
            )
        bbox = ann.get("bbox")
        if (
            not isinstance(bbox, list | tuple)
            or len(bbox) != 4
            or not all(isinstance(v, int | float) and math.isfinite(v) for v in bbox)
        ):
            raise CocoFormatError(
                f"{path}: annotation id {aid} (image id {ann['image_id']}) has bbox {bbox!r}; "
                "expected [x, y, width, height] with finite numbers"
            )
        if bbox[2] <= 0 or bbox[3] <= 0:
            skipped.append(aid)
            continue
        if ann.get("iscrowd", 0):
            continue
        height, width = image_sizes[image_index]
        if width > 0 and height > 0 and not _overlaps_image(bbox, width, height):
            outside.append(aid)
            continue
        owners.append(image_index)
        boxes.append([float(v) for v in bbox])
        labels.append(label)
    dup_anns = [aid for aid, n in Counter(ann_ids).items() if n > 1]
    if dup_anns:
        raise CocoFormatError(f"{path}: duplicate annotation ids {_ids_text(sorted(dup_anns))}")
    if skipped or outside:
        reasons = [
            f"{len(ids)} {why} (ids {_ids_text(ids)})"
            for ids, why in (
                (skipped, "with non-positive width or height"),
                (outside, "lying entirely outside their image"),
            )
            if ids
        ]
        log.warning(
            "%s: skipped %d annotation(s): %s, as the official loaders do",
            path,
            len(skipped) + len(outside),
            "; ".join(reasons),
        )

    owner = np.asarray(owners, dtype=np.int64)
    order = np.argsort(owner, kind="stable")
    counts = np.bincount(owner, minlength=len(image_ids))
    ann_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return _CocoFile(
        path=path,
        dataset=data,
        categories=categories,
        image_ids=image_ids,
        file_names=[images[r]["file_name"] for r in image_rows],
        image_rows=image_rows,
        image_sizes=image_sizes,
        ann_start=ann_start,
        boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4)[order],
        labels=np.asarray(labels, dtype=np.int64)[order],
        num_skipped=len(skipped) + len(outside),
    )


def _json_size(image: dict[str, Any]) -> tuple[int, int]:
    """(height, width) of an ``images`` entry, 0 for a missing or non-numeric value."""
    h, w = image.get("height"), image.get("width")
    valid = all(isinstance(v, int | float) and math.isfinite(v) and v > 0 for v in (h, w))
    return (int(h), int(w)) if valid else (0, 0)


def _overlaps_image(bbox: Sequence[float], width: float, height: float) -> bool:
    """Whether an xywh box keeps an area once clamped to the image (the official rule)."""
    x0, y0 = max(bbox[0], 0.0), max(bbox[1], 0.0)
    x1, y1 = min(bbox[0] + bbox[2], width), min(bbox[1] + bbox[3], height)
    return x1 > x0 and y1 > y0


@dataclass
class CocoImages:
    """The images of one split and their trainable boxes, as flat arrays (fork-friendly)."""

    image_dir: Path
    image_ids: np.ndarray  # int64 [N]
    file_names: np.ndarray  # str [N]
    image_sizes: np.ndarray  # int64 [N,2] (height, width) from the JSON, 0 where not given
    ann_start: np.ndarray  # int64 [N+1]
    boxes: np.ndarray  # float32 [M,4] xywh pixels
    labels: np.ndarray  # int64 [M]

    def __len__(self) -> int:
        return len(self.image_ids)

    def num_objects(self) -> np.ndarray:
        """Trainable boxes per image, int64 [N]."""
        return np.diff(self.ann_start)

    def subset(self, keep: np.ndarray) -> CocoImages:
        """The images at the (increasing) indices ``keep`` with their boxes."""
        starts, ends = self.ann_start[keep], self.ann_start[keep + 1]
        rows = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends, strict=True)] or [[]])
        rows = rows.astype(np.int64)
        return CocoImages(
            image_dir=self.image_dir,
            image_ids=self.image_ids[keep],
            file_names=self.file_names[keep],
            image_sizes=self.image_sizes[keep],
            ann_start=np.concatenate([[0], np.cumsum(ends - starts)]).astype(np.int64),
            boxes=self.boxes[rows],
            labels=self.labels[rows],
        )


def _select(
    parsed: _CocoFile, image_dir: Path, keep_empty: bool, limit: int | None
) -> tuple[CocoImages, np.ndarray]:
    """The split's images (after keep_empty and limit) and their rows in the parsed file."""
    counts = np.diff(parsed.ann_start)
    chosen = np.arange(len(parsed.image_ids)) if keep_empty else np.flatnonzero(counts > 0)
    if limit is not None:
        chosen = chosen[:limit]
    everything = CocoImages(
        image_dir=image_dir,
        image_ids=parsed.image_ids,
        file_names=np.array(parsed.file_names, dtype=str),
        image_sizes=parsed.image_sizes,
        ann_start=parsed.ann_start,
        boxes=parsed.boxes,
        labels=parsed.labels,
    )
    return everything.subset(chosen), chosen


def _decode_problems(images: CocoImages) -> tuple[list[int], list[str]]:
    """Decode every image: indices of the unreadable ones (with the reason) and of size
    mismatches with the JSON (with the message)."""
    unreadable, messages = [], []
    for i, (iid, name) in enumerate(zip(images.image_ids, images.file_names, strict=True)):
        path = images.image_dir / str(name)
        try:
            with Image.open(path) as pil:
                pil.load()
                width, height = pil.size
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            unreadable.append(i)
            messages.append(f"image id {int(iid)} ({path}): {e}")
            continue
        _check_size(images, i, height, width)
    return unreadable, messages


def _check_size(images: CocoImages, index: int, height: int, width: int) -> None:
    json_h, json_w = (int(v) for v in images.image_sizes[index])
    if json_h and json_w and (json_h, json_w) != (height, width):
        path = images.image_dir / str(images.file_names[index])
        raise CocoFormatError(
            f"image id {int(images.image_ids[index])} ({path}) is {width}x{height} pixels but "
            f"its 'width'/'height' in the annotation file say {json_w}x{json_h}: the boxes "
            "would not match the pixels; fix the JSON entry or the image"
        )


def _check_files(images: CocoImages, ann_file: Path) -> None:
    if not images.image_dir.is_dir():
        raise FileNotFoundError(f"image directory not found: {images.image_dir} (for {ann_file})")
    missing = [
        (int(iid), name)
        for iid, name in zip(images.image_ids, images.file_names, strict=True)
        if not (images.image_dir / name).is_file()
    ]
    if missing:
        listed = "; ".join(f"image id {iid}: {images.image_dir / n}" for iid, n in missing[:3])
        raise FileNotFoundError(
            f"{len(missing)} image(s) listed in {ann_file} are missing on disk: {listed}"
            + (" ..." if len(missing) > 3 else "")
        )


def _evaluation_gt(parsed: _CocoFile, chosen: np.ndarray) -> dict[str, Any]:
    """The raw ground truth of the chosen images (crowd included), with the fields pycocotools
    needs (``area``, ``iscrowd``) filled in where a custom file leaves them out."""
    data = parsed.dataset
    images = [data["images"][r] for r in parsed.image_rows[chosen]]
    keep = {img["id"] for img in images}
    annotations = []
    for ann in data["annotations"]:
        if ann["image_id"] in keep:
            if "area" not in ann or "iscrowd" not in ann:
                w, h = ann["bbox"][2], ann["bbox"][3]
                ann = {"area": float(w * h), "iscrowd": 0, **ann}
            annotations.append(ann)
    out = {k: v for k, v in data.items() if k not in _REQUIRED_KEYS}
    out.update(images=images, annotations=annotations, categories=parsed.categories)
    return out


class CocoDetection(Dataset[tuple[Tensor, Target]]):
    """Items per the data contract: image float [3,H,W] in [0,1], normalised cxcywh boxes."""

    def __init__(self, images: CocoImages, transform: DetectionTransform) -> None:
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """Decoded image uint8 [H,W,3], clamped xyxy boxes [n,4] px, labels [n], image id."""
        images = self.images
        image_id = int(images.image_ids[index])
        path = images.image_dir / str(images.file_names[index])
        try:
            with Image.open(path) as pil:
                image = np.array(pil.convert("RGB"))  # [H,W,3] uint8
        except OSError as e:
            raise OSError(f"cannot read image id {image_id} ({path}): {e}") from e
        height, width = image.shape[:2]
        _check_size(images, index, height, width)
        s, e = images.ann_start[index], images.ann_start[index + 1]
        xywh = images.boxes[s:e]  # [n,4]
        xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        xyxy[:, 0::2] = xyxy[:, 0::2].clip(0, width)
        xyxy[:, 1::2] = xyxy[:, 1::2].clip(0, height)
        keep = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
        return image, xyxy[keep], images.labels[s:e][keep], image_id

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        image, boxes, labels, image_id = self.load(index)
        orig_h, orig_w = image.shape[:2]
        image, boxes, labels = self.transform(image, boxes, labels)
        height, width = image.shape[:2]
        chw = np.ascontiguousarray(image.transpose(2, 0, 1))  # [3,H,W] uint8, contiguous
        scale = np.array([width, height, width, height], dtype=np.float32)
        cxcywh = np.concatenate([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]], 1)
        target: Target = {
            "labels": torch.from_numpy(labels.astype(np.int64)),  # [n]
            "boxes": torch.from_numpy((cxcywh / scale).astype(np.float32)),  # [n,4]
            "image_id": image_id,
            "orig_size": torch.tensor([orig_h, orig_w], dtype=torch.long),
            "size": torch.tensor([height, width], dtype=torch.long),
        }
        return torch.from_numpy(chw).float().div_(255.0), target


def resize_batch(batch: dict[str, Any], side: int) -> dict[str, Any]:
    """A collated batch resized to ``side x side`` (nearest); normalised boxes are unchanged."""
    images = F.interpolate(batch["images"], size=(side, side))
    masks = F.interpolate(batch["masks"][:, None].float(), size=(side, side))[:, 0].bool()
    size = torch.tensor([side, side])
    targets = [{**t, "size": size} if "size" in t else t for t in batch["targets"]]
    return {**batch, "images": images, "masks": masks, "targets": targets}


class DatasetEpochCallback(L.Callback):
    """Tell the data module the epoch at the start of each training epoch (before the workers
    fetch the epoch's first batch), for epoch-dependent augmentation such as RT-DETRv2's
    ``stop_epoch``. ``CocoDataModule`` attaches one itself when it is set up for fitting."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and callable(getattr(datamodule, "set_epoch", None)):
            datamodule.set_epoch(trainer.current_epoch)


class CocoDataModule(L.LightningDataModule):
    """A COCO-format dataset under ``root`` (relative paths default to the COCO 2017 layout).

    Args:
        root: dataset directory; annotation/image paths below are relative to it.
        train_annotations, train_images, val_annotations, val_images: files and folders.
        test_annotations, test_images: default to the val ones (COCO test-dev has no labels).
        recipe: augmentation recipe, "detr" | "rtdetr" | "none" (see ``transforms.py``).
        limit: keep only the first N images (by id) of each split, for quick experiments.
        keep_empty: keep training images without trainable annotations (background images).
            Evaluation splits always keep every image, as the official evaluation does.
        check_images: decode every image of the stage's splits at set-up (and compare its
            size with the JSON) instead of finding a bad one when its batch loads.
        skip_unreadable: decode every image at set-up and drop those that cannot be decoded
            (a warning counts and names them; evaluation leaves them out) instead of stopping.
        batch_size, val_batch_size: per-device batch sizes (val defaults to batch_size).
        num_workers, pin_memory: DataLoader settings (workers are persistent;
            pin_memory only takes effect when CUDA is available).
        detr_*: sizes of the DETR recipe (official defaults; scale them down for toy data).
        rtdetr_size: square input size of the RT-DETRv2 recipe.
        rtdetr_stop_epoch: from this (0-based) epoch on, photometric distortion, zoom-out and
            IoU crop are off (official configs: 71 of 72 epochs, 117 of 120 for S/M*);
            None keeps them on throughout. Also ends ``rtdetr_multiscale``.
        rtdetr_multiscale: RT-DETRv2's batch-level multi-scale training (official M*/M/L/X:
            480-800 in steps of 32, 640 three times; S: off): each training batch is resized
            (nearest, as the official collate) to a square side drawn from this list, until
            ``rtdetr_stop_epoch``. Boxes are normalised, so they stay as they are.
        seed: seed of the augmentation random streams (workers derive theirs from torch's).
    """

    def __init__(
        self,
        root: str,
        train_annotations: str | None = "annotations/instances_train2017.json",
        train_images: str = "train2017",
        val_annotations: str | None = "annotations/instances_val2017.json",
        val_images: str = "val2017",
        test_annotations: str | None = None,
        test_images: str | None = None,
        recipe: Recipe = "detr",
        limit: int | None = None,
        keep_empty: bool = True,
        check_images: bool = False,
        skip_unreadable: bool = False,
        batch_size: int = 2,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        pin_memory: bool = True,
        detr_scales: tuple[int, ...] = DETR_SCALES,
        detr_max_size: int = DETR_MAX_SIZE,
        detr_crop_resize: tuple[int, ...] = DETR_CROP_RESIZE,
        detr_crop_size: tuple[int, int] = DETR_CROP_SIZE,
        detr_val_size: int = DETR_VAL_SIZE,
        rtdetr_size: int = RTDETR_SIZE,
        rtdetr_stop_epoch: int | None = None,
        rtdetr_multiscale: list[int] | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be >= 1 or None, got {limit}")
        if batch_size < 1 or (val_batch_size is not None and val_batch_size < 1):
            raise ValueError("batch sizes must be >= 1")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.root = Path(root)
        self.recipe = recipe
        self.limit = limit
        self.keep_empty = keep_empty
        self.check_images = check_images
        self.skip_unreadable = skip_unreadable
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.rtdetr_stop_epoch = rtdetr_stop_epoch
        if rtdetr_multiscale is not None and (not rtdetr_multiscale or min(rtdetr_multiscale) < 1):
            raise ValueError(f"rtdetr_multiscale must be positive sizes, got {rtdetr_multiscale}")
        self.rtdetr_multiscale = list(rtdetr_multiscale) if rtdetr_multiscale else None
        self.split_files: dict[str, tuple[Path, Path] | None] = {
            "train": (self.root / train_annotations, self.root / train_images)
            if train_annotations
            else None,
            "val": (self.root / val_annotations, self.root / val_images)
            if val_annotations
            else None,
        }
        test_ann = test_annotations or val_annotations
        self.split_files["test"] = (
            (self.root / test_ann, self.root / (test_images or val_images)) if test_ann else None
        )
        sizes: dict[str, Any] = dict(
            detr_scales=detr_scales,
            detr_max_size=detr_max_size,
            detr_crop_resize=detr_crop_resize,
            detr_crop_size=detr_crop_size,
            detr_val_size=detr_val_size,
            rtdetr_size=rtdetr_size,
            seed=seed,
        )
        self.train_transform = build_transform(
            recipe, train=True, rtdetr_stop_epoch=rtdetr_stop_epoch, **sizes
        )
        self.eval_transform = build_transform(recipe, train=False, **sizes)
        self._parsed: dict[Path, _CocoFile] = {}
        self._splits: dict[str, CocoImages] = {}
        self._gt_dicts: dict[str, dict[str, Any]] = {}
        self._gt_objects: dict[str, Any] = {}
        self._categories: list[dict[str, Any]] | None = None
        self._categories_from: Path | None = None
        self.datasets: dict[str, CocoDetection] = {}

    # ----------------------------------------------------------------- loading and validation
    def _files(self, split: str) -> tuple[Path, Path]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
        files = self.split_files[split]
        if files is None:
            raise ValueError(f"no annotation file configured for the {split} split")
        return files

    def _parse(self, ann_file: Path) -> _CocoFile:
        if ann_file not in self._parsed:
            parsed = load_coco_file(ann_file)
            categories = [(c["id"], c.get("name")) for c in parsed.categories]
            if self._categories is None:
                self._categories, self._categories_from = parsed.categories, ann_file
            elif categories != [(c["id"], c.get("name")) for c in self._categories]:
                raise CocoFormatError(
                    f"{ann_file} and {self._categories_from} have different categories "
                    "(ids or names); all splits must share one label space"
                )
            self._parsed[ann_file] = parsed
        return self._parsed[ann_file]

    def prepare_split(self, split: str) -> CocoImages:
        """Parse, validate and index one split (cached): the checks of ``setup`` for one split."""
        if split in self._splits:
            return self._splits[split]
        ann_file, image_dir = self._files(split)
        parsed = self._parse(ann_file)
        keep_empty = self.keep_empty if split == "train" else True
        images, chosen = _select(parsed, image_dir, keep_empty, self.limit)
        _check_files(images, ann_file)
        if self.check_images or self.skip_unreadable:
            images, chosen = self._decode_all(images, chosen, ann_file, split)
        self._check_boxes(images, ann_file, split)
        self._splits[split] = images
        if split != "train":
            self._gt_dicts[split] = _evaluation_gt(parsed, chosen)
        pending = [
            s
            for s, files in self.split_files.items()
            if files is not None and files[0] == ann_file and s not in self._splits
        ]
        if not pending:
            parsed.dataset = {}  # every split of this file is indexed: free the raw JSON
        return images

    def _decode_all(
        self, images: CocoImages, chosen: np.ndarray, ann_file: Path, split: str
    ) -> tuple[CocoImages, np.ndarray]:
        unreadable, messages = _decode_problems(images)
        if not unreadable:
            return images, chosen
        listed = "; ".join(messages[:3]) + (" ..." if len(messages) > 3 else "")
        if not self.skip_unreadable:
            raise CocoFormatError(
                f"{len(unreadable)} image(s) of {ann_file} cannot be decoded: {listed} "
                "(skip_unreadable: true drops them)"
            )
        warnings.warn(
            f"{split} split: skipped {len(unreadable)} of {len(images)} image(s) that cannot "
            f"be decoded: {listed}",
            stacklevel=2,
        )
        keep = np.setdiff1d(np.arange(len(images)), unreadable)
        return images.subset(keep), chosen[keep]

    @staticmethod
    def _check_boxes(images: CocoImages, ann_file: Path, split: str) -> None:
        if len(images.boxes) > 0:
            return
        if split == "train":
            warnings.warn(
                f"{ann_file}: the train split has no trainable box (every annotation is crowd, "
                "degenerate or missing): the model will learn background only",
                stacklevel=2,
            )
        elif split == "val":
            raise CocoFormatError(
                f"{ann_file}: the val split ({len(images)} images) has no ground-truth box "
                "(every annotation is crowd, degenerate or missing), so val/map, the checkpoint "
                "monitor, cannot be computed; point val_annotations to a labelled file, or "
                "val_annotations: null to train without validation"
            )

    def _stage_splits(self, stage: str | None) -> list[str]:
        wanted = {
            "fit": ["train", "val"],
            "validate": ["val"],
            "test": ["test"],
            "predict": ["test"],
        }.get(stage or "", list(SPLITS))
        return [s for s in wanted if self.split_files[s] is not None]

    def setup(self, stage: str | None = None) -> None:
        """Validate the annotation files and image folders of the stage's splits."""
        for split in self._stage_splits(stage):
            images = self.prepare_split(split)
            if split not in self.datasets:
                transform = self.train_transform if split == "train" else self.eval_transform
                self.datasets[split] = CocoDetection(images, transform)
        trainer = self.trainer
        if (
            stage == "fit"
            and trainer is not None
            and not any(isinstance(cb, DatasetEpochCallback) for cb in trainer.callbacks)
        ):
            trainer.callbacks.append(DatasetEpochCallback())

    # --------------------------------------------------------------------------- label space
    def _ensure_categories(self) -> list[dict[str, Any]]:
        if self._categories is None:
            for split in SPLITS:
                if self.split_files[split] is not None:
                    self.prepare_split(split)
                    break
            else:
                raise ValueError("no annotation file configured")
        assert self._categories is not None
        return self._categories

    @property
    def label_to_category_id(self) -> list[int]:
        """COCO category id of each contiguous label (categories sorted by id)."""
        return [int(c["id"]) for c in self._ensure_categories()]

    @property
    def class_names(self) -> list[str]:
        return [str(c.get("name", c["id"])) for c in self._ensure_categories()]

    @property
    def num_classes(self) -> int:
        """Number of categories (not max id + 1: labels are contiguous)."""
        return len(self._ensure_categories())

    @property
    def max_objects(self) -> int:
        """Most trainable boxes in one image of the training split (or of the first split)."""
        split = next(s for s in SPLITS if self.split_files[s] is not None)
        counts = self.prepare_split(split).num_objects()
        return int(counts.max()) if len(counts) else 0

    def coco_gt(self, split: str = "val") -> Any:
        """pycocotools ``COCO`` ground truth of the split's images (crowd boxes included)."""
        if split not in self._gt_objects:
            self.prepare_split(split)
            if split not in self._gt_dicts:  # train: its raw JSON was freed after indexing
                ann_file, image_dir = self._files(split)
                parsed = load_coco_file(ann_file)
                _, chosen = _select(parsed, image_dir, self.keep_empty, self.limit)
                self._gt_dicts[split] = _evaluation_gt(parsed, chosen)
            gt = self._gt_dicts[split]
            from pycocotools.coco import COCO

            coco = COCO()
            coco.dataset = gt
            with contextlib.redirect_stdout(io.StringIO()):
                coco.createIndex()
            self._gt_objects[split] = coco
        return self._gt_objects[split]

    # ------------------------------------------------------------------------------- epochs
    def set_epoch(self, epoch: int) -> None:
        """Current training epoch, seen by every (persistent) worker's copy of the transform."""
        before = self.train_transform.strong_ops_active
        self.train_transform.set_epoch(epoch)
        if before and not self.train_transform.strong_ops_active:
            log.info(
                "epoch %d: stop_epoch reached, photometric distort / zoom-out / IoU crop are off",
                epoch,
            )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """RT-DETRv2's multi-scale training: resize the whole training batch (see the args)."""
        trainer = self.trainer
        if not self.rtdetr_multiscale or trainer is None or not trainer.training:
            return batch
        if self.rtdetr_stop_epoch is not None and trainer.current_epoch >= self.rtdetr_stop_epoch:
            return batch
        side = random.choice(self.rtdetr_multiscale)
        return resize_batch(batch, side)

    # -------------------------------------------------------------------------- dataloaders
    def _dataset(self, split: str) -> CocoDetection:
        if split not in self.datasets:
            self.setup({"train": "fit", "val": "validate", "test": "test"}[split])
        return self.datasets[split]

    def _loader(self, split: str, train: bool) -> DataLoader | list[Any]:
        if self.split_files[split] is None:
            return []  # split switched off (annotations: null): Lightning runs no batches
        dataset = self._dataset(split)
        batch_size = self.batch_size if train else self.val_batch_size
        return DetectionLoader(
            dataset,
            batch_size=batch_size,
            shuffle=train,
            sampler=None if train else evaluation_sampler(dataset),
            generator=None if train else torch.Generator(),  # see evaluation_sampler
            # The official loaders drop the last partial batch; a tiny `limit` set keeps it.
            drop_last=train and len(dataset) >= batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_detection,
        )

    def train_dataloader(self) -> DataLoader | list[Any]:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader | list[Any]:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader | list[Any]:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> DataLoader | list[Any]:
        return self._loader("test", train=False)
