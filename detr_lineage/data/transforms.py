"""Augmentation recipes of the official repositories, rebuilt on albumentations.

A recipe maps ``(image uint8 [H,W,3], boxes float [n,4] xyxy pixels, labels int [n])`` to the
same triple after augmentation. Boxes travel through albumentations' ``bbox_params`` (checked
after every geometric op: clipped to the image, boxes that fall out are dropped together with
their labels), so they stay exact through flips, resizes, crops and zoom-outs.

- ``"detr"`` (facebookresearch/detr ``datasets/coco.py``): horizontal flip, then with p=0.5
  either (a) shorter side to a random scale in ``scales`` with the longer side <= ``max_size``,
  or (b) shorter side to one of ``crop_resize``, a random crop of ``crop_size`` px, then (a).
  Boxes are kept while they have a positive area (DETR clamps and drops degenerate boxes).
  Eval: shorter side ``val_size``, longer side <= ``max_size``.
- ``"rtdetr"`` (lyuwenyu/RT-DETR ``rtdetrv2_pytorch`` configs): photometric distortion (each
  part p=0.5), zoom-out (p=0.5, fill 0, canvas 1-4x), SSD-style IoU crop (p=0.8), horizontal
  flip, resize to ``size``; boxes narrower or shorter than 1 px are dropped (SanitizeBoundingBoxes
  min_size=1). From ``stop_epoch`` on the first three ops are off (the official ``stop_epoch``
  policy: ops off when ``epoch >= stop_epoch``, epochs counted from 0). Eval: resize to ``size``.
- ``"none"``: identity (no resize), for inspection and round-trip tests.

The epoch lives in a one-element shared-memory tensor inside :class:`DetectionTransform`, so
``set_epoch`` in the main process is seen by persistent DataLoader workers (forked or spawned);
``CocoDataModule`` is told the epoch by ``DatasetEpochCallback`` (see ``coco.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.augmentations.crops.transforms import BaseCrop
from albumentations.augmentations.geometric import functional as fgeometric
from albumentations.augmentations.pixel import functional as fpixel

__all__ = [
    "DETR_SCALES",
    "DetectionTransform",
    "IoUCrop",
    "PhotometricDistort",
    "Recipe",
    "ShortSideResize",
    "SizeRangeCrop",
    "ZoomOut",
    "build_transform",
    "detr_resize_shape",
]

Recipe = Literal["detr", "rtdetr", "none"]
RECIPES: tuple[str, ...] = ("detr", "rtdetr", "none")

DETR_SCALES: tuple[int, ...] = tuple(range(480, 801, 32))  # 480, 512, ..., 800
DETR_CROP_RESIZE: tuple[int, ...] = (400, 500, 600)
DETR_CROP_SIZE: tuple[int, int] = (384, 600)
DETR_MAX_SIZE = 1333
DETR_VAL_SIZE = 800
RTDETR_SIZE = 640

# DETR keeps a box while its clipped width and height are positive; albumentations keeps zero-size
# clipped boxes at min_width=0, so "positive" is spelled as a sub-pixel threshold.
_POSITIVE_PX = 1e-3


def detr_resize_shape(height: int, width: int, size: int, max_size: int | None) -> tuple[int, int]:
    """(h, w) after DETR's resize: shorter side ``size``, longer side capped at ``max_size``.

    Same integer arithmetic as the official ``get_size_with_aspect_ratio``, so image sizes (and
    with them the padding of a batch) match the official pipeline exactly.
    """
    if max_size is not None:
        short, long = float(min(height, width)), float(max(height, width))
        if long / short * size > max_size:
            size = int(round(max_size * short / long))
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


class ShortSideResize(A.DualTransform):
    """Resize the shorter side to a random choice of ``sizes`` (longer side <= ``max_size``)."""

    def __init__(
        self,
        sizes: Sequence[int],
        max_size: int | None = None,
        interpolation: int = cv2.INTER_LINEAR,
        p: float = 1.0,
    ) -> None:
        super().__init__(p=p)
        if not sizes or min(sizes) < 1:
            raise ValueError(f"sizes must be a non-empty list of positive ints, got {sizes}")
        self.sizes = [int(s) for s in sizes]
        self.max_size = max_size
        self.interpolation = interpolation

    def get_params_dependent_on_data(
        self, params: dict[str, Any], data: dict[str, Any]
    ) -> dict[str, Any]:
        height, width = params["shape"][:2]
        size = self.py_random.choice(self.sizes)
        return {"target_shape": detr_resize_shape(height, width, size, self.max_size)}

    def apply(self, img: np.ndarray, target_shape: tuple[int, int], **params: Any) -> np.ndarray:
        return fgeometric.resize(img, target_shape, self.interpolation)

    def apply_to_mask(
        self, mask: np.ndarray, target_shape: tuple[int, int], **params: Any
    ) -> np.ndarray:
        return fgeometric.resize(mask, target_shape, cv2.INTER_NEAREST)

    def apply_to_bboxes(self, bboxes: np.ndarray, **params: Any) -> np.ndarray:
        return bboxes  # albumentations boxes are normalised: a resize leaves them unchanged


class SizeRangeCrop(BaseCrop):
    """DETR's ``RandomSizeCrop``: a crop whose width and height are each uniform in a range.

    Unlike the official code (which raises), an image smaller than ``min_size`` is cropped to
    at most its own size.
    """

    def __init__(self, min_size: int, max_size: int, p: float = 1.0) -> None:
        super().__init__(p=p)
        if not 1 <= min_size <= max_size:
            raise ValueError(f"need 1 <= min_size <= max_size, got {min_size}, {max_size}")
        self.min_size = min_size
        self.max_size = max_size

    def get_params_dependent_on_data(
        self, params: dict[str, Any], data: dict[str, Any]
    ) -> dict[str, Any]:
        height, width = params["shape"][:2]
        crop_w = self.py_random.randint(min(self.min_size, width), min(width, self.max_size))
        crop_h = self.py_random.randint(min(self.min_size, height), min(height, self.max_size))
        x0 = self.py_random.randint(0, width - crop_w)
        y0 = self.py_random.randint(0, height - crop_h)
        return {"crop_coords": (x0, y0, x0 + crop_w, y0 + crop_h)}


class ZoomOut(A.DualTransform):
    """torchvision's ``RandomZoomOut``: the image on a 1-4x larger canvas filled with ``fill``."""

    def __init__(
        self, side_range: tuple[float, float] = (1.0, 4.0), fill: float = 0, p: float = 0.5
    ) -> None:
        super().__init__(p=p)
        if not 1.0 <= side_range[0] <= side_range[1]:
            raise ValueError(f"invalid side_range {side_range}")
        self.side_range = (float(side_range[0]), float(side_range[1]))
        self.fill = fill

    def get_params_dependent_on_data(
        self, params: dict[str, Any], data: dict[str, Any]
    ) -> dict[str, Any]:
        height, width = params["shape"][:2]
        r = self.py_random.uniform(*self.side_range)
        canvas_w, canvas_h = int(width * r), int(height * r)
        left = int((canvas_w - width) * self.py_random.random())
        top = int((canvas_h - height) * self.py_random.random())
        return {"pad": (top, canvas_h - height - top, left, canvas_w - width - left)}

    def apply(self, img: np.ndarray, pad: tuple[int, int, int, int], **params: Any) -> np.ndarray:
        top, bottom, left, right = pad
        return fgeometric.pad_with_params(
            img, top, bottom, left, right, cv2.BORDER_CONSTANT, self.fill
        )

    def apply_to_mask(
        self, mask: np.ndarray, pad: tuple[int, int, int, int], **params: Any
    ) -> np.ndarray:
        top, bottom, left, right = pad
        return fgeometric.pad_with_params(mask, top, bottom, left, right, cv2.BORDER_CONSTANT, 0)

    def apply_to_bboxes(
        self, bboxes: np.ndarray, pad: tuple[int, int, int, int], **params: Any
    ) -> np.ndarray:
        if not bboxes.size:
            return bboxes
        height, width = params["shape"][:2]
        top, bottom, left, right = pad
        out = bboxes.copy()  # [n,4+] normalised xyxy (+ label columns)
        new_w, new_h = width + left + right, height + top + bottom
        out[:, [0, 2]] = (bboxes[:, [0, 2]] * width + left) / new_w
        out[:, [1, 3]] = (bboxes[:, [1, 3]] * height + top) / new_h
        return out


class IoUCrop(BaseCrop):
    """torchvision's ``RandomIoUCrop`` (SSD): a crop that overlaps some box by a sampled min IoU.

    Boxes whose centre falls outside the crop are dropped (the official transform marks them
    degenerate for the next SanitizeBoundingBoxes); the rest are clipped to the crop. Drawing the
    "leave as is" option, or an image without boxes, leaves the image uncropped.
    """

    def __init__(
        self,
        min_scale: float = 0.3,
        max_scale: float = 1.0,
        min_aspect_ratio: float = 0.5,
        max_aspect_ratio: float = 2.0,
        sampler_options: Sequence[float] = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0),
        trials: int = 40,
        p: float = 0.8,
    ) -> None:
        super().__init__(p=p)
        self.min_scale = min_scale
        self.max_scale = max_scale
        self.min_aspect_ratio = min_aspect_ratio
        self.max_aspect_ratio = max_aspect_ratio
        self.sampler_options = [float(o) for o in sampler_options]
        self.trials = trials

    def get_params_dependent_on_data(
        self, params: dict[str, Any], data: dict[str, Any]
    ) -> dict[str, Any]:
        height, width = params["shape"][:2]
        full = {"crop_coords": (0, 0, width, height)}
        bboxes = np.asarray(data.get("bboxes", np.zeros((0, 4))), dtype=np.float64)
        if len(bboxes) == 0:
            return full  # torchvision loops until it draws "leave as is"
        xyxy = bboxes[:, :4] * np.array([width, height, width, height])  # [n,4] pixels
        cx, cy = (xyxy[:, 0] + xyxy[:, 2]) / 2, (xyxy[:, 1] + xyxy[:, 3]) / 2
        areas = (xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1])
        # torchvision repeats "draw an option, try `trials` crops" until success (bounded here);
        # the trials of one option are drawn at once and the first valid one is taken.
        rng = self.random_generator
        for _ in range(100):
            min_iou = self.py_random.choice(self.sampler_options)
            if min_iou >= 1.0:
                return full
            scale = rng.uniform(self.min_scale, self.max_scale, size=(self.trials, 2))
            new_w = (width * scale[:, 0]).astype(np.int64)  # [T]
            new_h = (height * scale[:, 1]).astype(np.int64)
            aspect = new_w / np.maximum(new_h, 1)
            ok = (new_w > 0) & (new_h > 0)
            ok &= (self.min_aspect_ratio <= aspect) & (aspect <= self.max_aspect_ratio)
            pos = rng.random((self.trials, 2))
            left = ((width - new_w) * pos[:, 0]).astype(np.int64)[:, None]  # [T,1]
            top = ((height - new_h) * pos[:, 1]).astype(np.int64)[:, None]
            right, bottom = left + new_w[:, None], top + new_h[:, None]
            inside = (left < cx) & (cx < right) & (top < cy) & (cy < bottom)  # [T,n]
            iw = np.minimum(xyxy[:, 2], right) - np.maximum(xyxy[:, 0], left)  # [T,n]
            ih = np.minimum(xyxy[:, 3], bottom) - np.maximum(xyxy[:, 1], top)
            inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
            iou = inter / (areas + (new_w * new_h)[:, None] - inter)
            ok &= np.where(inside, iou, -1.0).max(axis=1) >= min_iou  # some box centred inside
            if ok.any():
                t = int(np.argmax(ok))
                return {
                    "crop_coords": (
                        int(left[t, 0]),
                        int(top[t, 0]),
                        int(right[t, 0]),
                        int(bottom[t, 0]),
                    )
                }
        return full

    def apply_to_bboxes(
        self, bboxes: np.ndarray, crop_coords: tuple[int, int, int, int], **params: Any
    ) -> np.ndarray:
        if bboxes.size:
            height, width = params["shape"][:2]
            left, top, right, bottom = crop_coords
            cx = (bboxes[:, 0] + bboxes[:, 2]) / 2 * width
            cy = (bboxes[:, 1] + bboxes[:, 3]) / 2 * height
            if (left, top, right, bottom) != (0, 0, width, height):
                bboxes = bboxes[(left < cx) & (cx < right) & (top < cy) & (cy < bottom)]
        return super().apply_to_bboxes(bboxes, crop_coords, **params)


class PhotometricDistort(A.ImageOnlyTransform):
    """torchvision's ``RandomPhotometricDistort``: brightness, contrast (before or after),
    saturation, hue and a channel permutation, each applied independently with probability ``p``.
    """

    def __init__(
        self,
        brightness: tuple[float, float] = (0.875, 1.125),
        contrast: tuple[float, float] = (0.5, 1.5),
        saturation: tuple[float, float] = (0.5, 1.5),
        hue: tuple[float, float] = (-0.05, 0.05),
        p: float = 0.5,
    ) -> None:
        super().__init__(p=1.0)  # the whole op always runs; `p` is per part, as in torchvision
        self.brightness = brightness
        self.contrast = contrast
        self.saturation = saturation
        self.hue = hue
        self.part_p = p

    def get_params(self) -> dict[str, Any]:
        rnd = self.py_random

        def maybe(bounds: tuple[float, float]) -> float | None:
            return rnd.uniform(*bounds) if rnd.random() < self.part_p else None

        params: dict[str, Any] = {
            "brightness": maybe(self.brightness),
            "contrast": maybe(self.contrast),
            "saturation": maybe(self.saturation),
            "hue": maybe(self.hue),
            "contrast_before": rnd.random() < 0.5,
        }
        params["permutation"] = rnd.sample(range(3), 3) if rnd.random() < self.part_p else None
        return params

    def apply(
        self,
        img: np.ndarray,
        brightness: float | None,
        contrast: float | None,
        saturation: float | None,
        hue: float | None,
        contrast_before: bool,
        permutation: list[int] | None,
        **params: Any,
    ) -> np.ndarray:
        if brightness is not None:
            img = fpixel.adjust_brightness_torchvision(img, brightness)
        if contrast is not None and contrast_before:
            img = fpixel.adjust_contrast_torchvision(img, contrast)
        if saturation is not None:
            img = fpixel.adjust_saturation_torchvision(img, saturation)
        if hue is not None:
            img = fpixel.adjust_hue_torchvision(img, hue)
        if contrast is not None and not contrast_before:
            img = fpixel.adjust_contrast_torchvision(img, contrast)
        if permutation is not None and img.ndim == 3 and img.shape[2] == 3:
            img = np.ascontiguousarray(img[..., permutation])
        return img


def _compose(ops: list[A.BasicTransform], min_size_px: float, seed: int | None) -> A.Compose:
    """Compose with boxes in pixel xyxy, clipped, re-checked after every op (min side in px)."""
    return A.Compose(
        ops,
        bbox_params=A.BboxParams(
            format="pascal_voc",
            label_fields=["labels"],
            clip=True,
            min_width=min_size_px,
            min_height=min_size_px,
        ),
        seed=seed,
    )


class DetectionTransform:
    """A recipe as a picklable callable, with an epoch that persistent workers can see.

    ``pipeline`` runs before ``stop_epoch``; ``late_pipeline`` (if any) from ``stop_epoch`` on.
    The epoch is a shared-memory tensor, so :meth:`set_epoch` in the main process reaches the
    copies held by DataLoader workers. Each worker reseeds albumentations from
    ``torch.initial_seed()`` (different per worker, and per epoch for non-persistent workers):
    otherwise every forked worker would replay the parent's random stream.
    """

    def __init__(
        self,
        pipeline: A.Compose | None,
        late_pipeline: A.Compose | None = None,
        stop_epoch: int | None = None,
        name: str = "",
        seed: int | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.late_pipeline = late_pipeline
        self.stop_epoch = stop_epoch
        self.name = name
        self.seed = seed
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._seeded_from: int | None = None

    def set_epoch(self, epoch: int) -> None:
        """Tell the transform (and every worker's copy of it) the current training epoch."""
        self._epoch[0] = int(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    @property
    def strong_ops_active(self) -> bool:
        """False once the stop-epoch policy has switched the strong augmentations off."""
        return self.stop_epoch is None or self.late_pipeline is None or self.epoch < self.stop_epoch

    def _active_pipeline(self) -> A.Compose | None:
        return self.pipeline if self.strong_ops_active else self.late_pipeline

    def _reseed(self) -> None:
        """Workers: seed from torch's per-worker seed. Main process (num_workers=0): keep an
        explicit ``seed``, else seed once from torch, so ``seed_everything`` makes runs repeat."""
        in_worker = torch.utils.data.get_worker_info() is not None
        if not in_worker and (self.seed is not None or self._seeded_from is not None):
            return
        seed = torch.initial_seed()
        if seed != self._seeded_from:
            self._seeded_from = seed
            for pipe in (self.pipeline, self.late_pipeline):
                if pipe is not None:
                    pipe.set_random_seed(seed % 2**32)

    def __call__(
        self, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """image uint8 [H,W,3], boxes [n,4] xyxy px (inside the image), labels [n] -> same."""
        pipeline = self._active_pipeline()
        if pipeline is None:
            return image, boxes, labels
        self._reseed()
        out = pipeline(image=image, bboxes=boxes, labels=labels)
        out_boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
        out_labels = np.asarray(out["labels"], dtype=np.int64).reshape(-1)
        return out["image"], out_boxes, out_labels

    def __repr__(self) -> str:
        return f"DetectionTransform({self.name!r}, stop_epoch={self.stop_epoch})"


def build_transform(
    recipe: Recipe,
    train: bool,
    *,
    detr_scales: Sequence[int] = DETR_SCALES,
    detr_max_size: int | None = DETR_MAX_SIZE,
    detr_crop_resize: Sequence[int] = DETR_CROP_RESIZE,
    detr_crop_size: tuple[int, int] = DETR_CROP_SIZE,
    detr_val_size: int = DETR_VAL_SIZE,
    rtdetr_size: int | tuple[int, int] = RTDETR_SIZE,
    rtdetr_stop_epoch: int | None = None,
    seed: int | None = None,
) -> DetectionTransform:
    """The train or eval transform of a recipe; sizes default to the official COCO values.

    ``rtdetr_size`` is an int (square) or (h, w). ``seed`` makes the main-process sequence
    reproducible (workers reseed from torch's per-worker seed, which Lightning's seeding fixes).
    """
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; valid recipes: {', '.join(RECIPES)}")
    if recipe == "none":
        return DetectionTransform(None, name="none")
    if recipe == "detr":
        if not train:
            pipe = _compose([ShortSideResize([detr_val_size], detr_max_size)], _POSITIVE_PX, seed)
            return DetectionTransform(pipe, name="detr-eval", seed=seed)
        multi_scale = ShortSideResize(detr_scales, detr_max_size)
        pipe = _compose(
            [
                A.HorizontalFlip(p=0.5),
                A.OneOf(
                    [
                        A.Sequential([multi_scale], p=1.0),
                        A.Sequential(
                            [
                                ShortSideResize(detr_crop_resize, None),
                                SizeRangeCrop(*detr_crop_size),
                                ShortSideResize(detr_scales, detr_max_size),
                            ],
                            p=1.0,
                        ),
                    ],
                    p=1.0,
                ),
            ],
            _POSITIVE_PX,
            seed,
        )
        return DetectionTransform(pipe, name="detr-train", seed=seed)
    height, width = (rtdetr_size, rtdetr_size) if isinstance(rtdetr_size, int) else rtdetr_size
    resize = A.Resize(height=height, width=width, interpolation=cv2.INTER_LINEAR)
    if not train:
        return DetectionTransform(
            _compose([resize], _POSITIVE_PX, seed), name="rtdetr-eval", seed=seed
        )

    def flip_resize() -> list[A.BasicTransform]:
        return [A.HorizontalFlip(p=0.5), A.Resize(height=height, width=width)]

    strong = [PhotometricDistort(p=0.5), ZoomOut(fill=0, p=0.5), IoUCrop(p=0.8)]
    return DetectionTransform(
        _compose(strong + flip_resize(), 1.0, seed),
        _compose(flip_resize(), 1.0, seed),
        stop_epoch=rtdetr_stop_epoch,
        name="rtdetr-train",
        seed=seed,
    )
