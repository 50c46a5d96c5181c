"""Augmentation recipes: boxes stay tight around the drawn objects, the stop-epoch switch works
across persistent workers, and the DETR resize arithmetic matches the official one."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from detr_lineage.data.transforms import (
    DetectionTransform,
    IoUCrop,
    ZoomOut,
    build_transform,
    detr_resize_shape,
)

# Toy-scale sizes (the official ones are 480-800 / 1333 / 640): same recipes, small images.
SMALL = dict(
    detr_scales=(96, 112, 128, 144),
    detr_max_size=220,
    detr_crop_resize=(80, 100, 120),
    detr_crop_size=(64, 120),
    detr_val_size=128,
    rtdetr_size=128,
)
RECIPES = [("detr", True), ("detr", False), ("rtdetr", True), ("rtdetr", False)]


def _official_get_size(w: int, h: int, size: int, max_size: int | None) -> tuple[int, int]:
    """facebookresearch/detr datasets/transforms.py get_size_with_aspect_ratio, (w, h) in."""
    if max_size is not None:
        min_original, max_original = float(min((w, h))), float(max((w, h)))
        if max_original / min_original * size > max_size:
            size = int(round(max_size * min_original / max_original))
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


@pytest.mark.parametrize(
    ("h", "w", "size", "max_size"),
    [(480, 640, 800, 1333), (640, 480, 512, 1333), (300, 1000, 800, 1333), (427, 640, 600, None)],
)
def test_detr_resize_shape_matches_official(h: int, w: int, size: int, max_size: int | None):
    assert detr_resize_shape(h, w, size, max_size) == _official_get_size(w, h, size, max_size)


def test_official_eval_sizes():
    image = np.zeros((480, 640, 3), np.uint8)
    boxes = np.array([[64, 48, 320, 240]], np.float32)
    labels = np.array([3])
    out, b, lab = build_transform("detr", train=False)(image, boxes, labels)
    assert out.shape == (800, 1066, 3)
    np.testing.assert_allclose(b, boxes * np.array([1066 / 640, 800 / 480] * 2), atol=1e-3)
    out, b, lab = build_transform("rtdetr", train=False)(image, boxes, labels)
    assert out.shape == (640, 640, 3)
    np.testing.assert_allclose(b, boxes * np.array([1.0, 640 / 480] * 2), atol=1e-3)
    assert lab.tolist() == [3]


def test_none_recipe_is_identity_and_unknown_recipe_fails():
    image = np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    boxes = np.array([[1, 2, 10, 20]], np.float32)
    out, b, lab = build_transform("none", train=True)(image, boxes, np.array([0]))
    assert out is image and b is boxes
    with pytest.raises(ValueError, match="unknown recipe"):
        build_transform("yolo", train=True)  # type: ignore[arg-type]


def _draw(
    rng: np.random.Generator, h: int = 120, w: int = 160
) -> tuple[np.ndarray, np.ndarray, int]:
    """One white shape (0 rectangle, 1 ellipse, 2 triangle) on black; its tight xyxy box [1,4]."""
    image = np.zeros((h, w, 3), np.uint8)
    bw, bh = int(rng.integers(12, 70)), int(rng.integers(12, 60))
    x0, y0 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
    kind = int(rng.integers(3))
    if kind == 0:
        image[y0 : y0 + bh, x0 : x0 + bw] = 255
    elif kind == 1:
        cv2.ellipse(
            image, (x0 + bw // 2, y0 + bh // 2), (bw // 2, bh // 2), 0, 0, 360, (255,) * 3, -1
        )
    else:
        pts = np.array([[x0, y0 + bh - 1], [x0 + bw - 1, y0 + bh - 1], [x0 + bw // 2, y0]])
        cv2.fillPoly(image, [pts.astype(np.int32)], (255,) * 3)
    ys, xs = np.nonzero(image[..., 0])
    box = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], np.float32)
    return image, box, kind


def _bright_box(image: np.ndarray) -> np.ndarray | None:
    """Tight xyxy box of the pixels brighter than mid-range (the drawn shape), or None."""
    gray = image.astype(np.float32).mean(axis=2)
    lo, hi = gray.min(), gray.max()
    if hi - lo < 20:
        return None
    ys, xs = np.nonzero(gray > (lo + hi) / 2)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


@pytest.mark.parametrize(("recipe", "train"), RECIPES)
def test_box_stays_tight_around_drawn_shape(recipe: str, train: bool):
    """Transform an image with one drawn shape; the output box must hug the shape's pixels.

    A crop that cuts a shape leaves the clipped box, which is tight only for a rectangle: a cut
    ellipse or triangle (pixels touching the image border) must then just be inside its box.
    """
    rng = np.random.default_rng(7)
    transform = build_transform(recipe, train=train, seed=1, **SMALL)  # type: ignore[arg-type]
    kept = 0
    for _ in range(40):
        image, box, kind = _draw(rng)
        out, out_boxes, out_labels = transform(image, box, np.array([4]))
        pixels = _bright_box(out)
        if len(out_boxes) == 0:
            # DETR drops a box only when its object is cropped away entirely; RT-DETR's IoU crop
            # also drops boxes whose centre left the crop (part of the shape may remain).
            if recipe == "detr":
                assert pixels is None
            continue
        kept += 1
        assert out_labels.tolist() == [4]
        assert pixels is not None
        # 1.5 px: resampling moves a shape's edge by up to about one output pixel.
        height, width = out.shape[:2]
        cut = pixels[0] <= 1 or pixels[1] <= 1 or pixels[2] >= width - 1 or pixels[3] >= height - 1
        if kind == 0 or not cut:
            np.testing.assert_allclose(out_boxes[0], pixels, atol=1.5)
        else:
            assert np.all(out_boxes[0, :2] <= pixels[:2] + 1.5)
            assert np.all(out_boxes[0, 2:] >= pixels[2:] - 1.5)
    assert kept >= 20


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.mark.parametrize(("recipe", "train"), RECIPES)
def test_labels_follow_their_boxes(recipe: str, train: bool):
    """Several objects: every surviving (box, label) pair lies on that object's mask pixels.

    (Masks go through cv2's nearest-neighbour resampling, which shifts edges by up to a source
    pixel; tightness itself is checked on the image pixels above.)
    """
    rng = np.random.default_rng(3)
    transform = build_transform(recipe, train=train, seed=2, **SMALL)  # type: ignore[arg-type]
    pipeline = transform.pipeline
    assert pipeline is not None
    for _ in range(25):
        h, w = 120, 160
        mask = np.zeros((h, w), np.uint8)
        boxes, labels = [], []
        for label in range(1, 5):  # four non-overlapping rectangles in a 2x2 grid
            cx, cy = (label - 1) % 2, (label - 1) // 2
            bw, bh = int(rng.integers(8, 70)), int(rng.integers(8, 55))
            x0 = cx * 80 + int(rng.integers(0, 80 - bw))
            y0 = cy * 60 + int(rng.integers(0, 60 - bh))
            mask[y0 : y0 + bh, x0 : x0 + bw] = label
            boxes.append([x0, y0, x0 + bw, y0 + bh])
            labels.append(label)
        image = np.repeat(mask[..., None] * 60, 3, axis=2).astype(np.uint8)
        out = pipeline(
            image=image, mask=mask, bboxes=np.array(boxes, np.float32), labels=np.array(labels)
        )
        out_mask = out["mask"]
        assert out["image"].shape[:2] == out_mask.shape
        for box, label in zip(np.asarray(out["bboxes"]), out["labels"], strict=True):
            ious = {}
            for other in np.unique(out_mask[out_mask > 0]):
                ys, xs = np.nonzero(out_mask == other)
                ious[other] = _iou(box, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            assert max(ious, key=ious.get) == label
            assert ious[label] > 0.5 or (box[2] - box[0]) * (box[3] - box[1]) < 16


def test_zoom_out_and_iou_crop_box_math():
    image = np.full((100, 200, 3), 255, np.uint8)
    box = np.array([[20, 10, 60, 50]], np.float32)
    zoom = ZoomOut(side_range=(2.0, 2.0), p=1.0)
    out = zoom(image=image, bboxes=box / [200, 100, 200, 100])  # albumentations-normalised
    pad_top, _, pad_left, _ = zoom.params["pad"]
    assert out["image"].shape == (200, 400, 3)
    expected = (box + [pad_left, pad_top, pad_left, pad_top]) / [400, 200, 400, 200]
    np.testing.assert_allclose(out["bboxes"], expected, atol=1e-6)
    # IoU crop: a box whose centre is outside the crop is dropped, others are clipped.
    crop = IoUCrop(p=1.0)
    boxes = np.array([[0.0, 0.0, 0.1, 0.1], [0.4, 0.4, 0.9, 0.9]])
    params = {"shape": (100, 200, 3)}
    kept = crop.apply_to_bboxes(boxes, crop_coords=(60, 30, 200, 100), **params)
    assert len(kept) == 1


class _Probe(Dataset):
    """Reports, from inside a worker, whether the strong RT-DETR ops are on."""

    def __init__(self, transform: DetectionTransform) -> None:
        self.transform = transform

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor(self.transform.strong_ops_active)


def test_stop_epoch_reaches_persistent_workers():
    transform = build_transform("rtdetr", train=True, rtdetr_stop_epoch=2, **SMALL)
    loader = DataLoader(_Probe(transform), batch_size=4, num_workers=1, persistent_workers=True)
    seen = []
    for epoch in range(4):
        transform.set_epoch(epoch)
        seen.append([bool(x) for batch in loader for x in batch])
    assert seen == [[True] * 4, [True] * 4, [False] * 4, [False] * 4]
    assert build_transform("rtdetr", train=True, **SMALL).strong_ops_active  # None: never off


class _Boxes(Dataset):
    def __init__(self, transform: DetectionTransform) -> None:
        self.transform = transform
        self.image = np.zeros((120, 160, 3), np.uint8)
        self.image[30:80, 40:120] = 200

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> torch.Tensor:
        box = np.array([[40, 30, 120, 80]], np.float32)
        image, boxes, _ = self.transform(self.image, box, np.array([0]))
        return torch.tensor([*image.shape[:2], float(boxes.sum())])


def test_workers_draw_different_augmentations():
    """Two workers forked from one transform must not replay the same random stream."""
    transform = build_transform("detr", train=True, seed=0, **SMALL)
    loader = DataLoader(_Boxes(transform), batch_size=1, num_workers=2)
    out = [b[0] for b in loader]  # worker 0 serves items 0,2,4,6; worker 1 items 1,3,5,7
    worker0, worker1 = torch.stack(out[0::2]), torch.stack(out[1::2])
    assert not torch.equal(worker0, worker1)
