"""COCO bbox evaluation: detections -> COCO results -> the 12 standard numbers.

The official repositories score with pycocotools' ``COCOeval``; we do the same through
faster-coco-eval (a C++ port with the same matching rules), which ``tests/test_coco.py``
checks gives the same 12 numbers as pycocotools on the same files. ``backend="pycocotools"``
is there for anyone who wants the reference implementation itself.

Typical use from a LightningModule (see ``CocoDataModule.coco_gt``)::

    detections = [{"image_id": 42, "boxes": xyxy_px, "scores": s, "labels": l}, ...]
    results = to_coco_results(detections, datamodule.label_to_category_id)
    stats = evaluate_coco(datamodule.coco_gt("val"), results, image_ids=seen_ids)
    module.log_dict({f"val/{k}": v for k, v in stats.items()})
    print(stats.summary)
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

__all__ = [
    "STAT_NAMES",
    "CocoStats",
    "evaluate_coco",
    "format_coco_summary",
    "load_coco_gt",
    "to_coco_results",
    "write_coco_results",
]

STAT_NAMES: tuple[str, ...] = (
    "map",
    "map_50",
    "map_75",
    "map_small",
    "map_medium",
    "map_large",
    "mar_1",
    "mar_10",
    "mar_100",
    "mar_small",
    "mar_medium",
    "mar_large",
)

# (title, IoU, area, maxDets) of each line of pycocotools' summarize(), in STAT_NAMES order.
_SUMMARY_ROWS: tuple[tuple[str, str, str, int], ...] = (
    ("Average Precision  (AP)", "0.50:0.95", "all", 100),
    ("Average Precision  (AP)", "0.50", "all", 100),
    ("Average Precision  (AP)", "0.75", "all", 100),
    ("Average Precision  (AP)", "0.50:0.95", "small", 100),
    ("Average Precision  (AP)", "0.50:0.95", "medium", 100),
    ("Average Precision  (AP)", "0.50:0.95", "large", 100),
    ("Average Recall     (AR)", "0.50:0.95", "all", 1),
    ("Average Recall     (AR)", "0.50:0.95", "all", 10),
    ("Average Recall     (AR)", "0.50:0.95", "all", 100),
    ("Average Recall     (AR)", "0.50:0.95", "small", 100),
    ("Average Recall     (AR)", "0.50:0.95", "medium", 100),
    ("Average Recall     (AR)", "0.50:0.95", "large", 100),
)

Backend = Literal["faster_coco_eval", "pycocotools"]


class CocoStats(dict[str, float]):
    """The 12 COCO numbers by name (``map``, ``map_50``, ...), plus the printable ``summary``.

    A plain ``dict[str, float]`` so it can go straight into ``log_dict``; -1 means "no ground
    truth in that area range" (the pycocotools convention).
    """

    summary: str

    def __init__(self, values: Sequence[float]) -> None:
        super().__init__(zip(STAT_NAMES, (float(v) for v in values), strict=True))
        self.summary = format_coco_summary(self)


def format_coco_summary(stats: Mapping[str, float]) -> str:
    """The 12 lines pycocotools' ``COCOeval.summarize()`` prints, as one string."""
    lines = []
    for name, (title, iou, area, max_dets) in zip(STAT_NAMES, _SUMMARY_ROWS, strict=True):
        lines.append(
            f" {title} @[ IoU={iou:<9} | area={area:>6s} | maxDets={max_dets:>3d} ] = "
            f"{stats[name]:0.3f}"
        )
    return "\n".join(lines)


def _as_numpy(x: Any, dtype: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu")
        x = x.float() if x.is_floating_point() else x
        x = x.numpy()
    return np.asarray(x, dtype=dtype)


def to_coco_results(
    detections: Iterable[Mapping[str, Any]], label_to_category_id: Sequence[int]
) -> list[dict[str, Any]]:
    """Per-image detections -> COCO results (``bbox`` xywh, ``category_id``, ``score``).

    Each detection dict has ``image_id`` (COCO id), ``boxes`` [k,4] xyxy in original-image pixels,
    ``scores`` [k] and ``labels`` [k] (contiguous 0-based, mapped back to COCO category ids).
    """
    id_map = np.asarray(label_to_category_id, dtype=np.int64)
    results: list[dict[str, Any]] = []
    for det in detections:
        image_id = int(det["image_id"])
        boxes = _as_numpy(det["boxes"], np.float64).reshape(-1, 4)  # [k,4] xyxy
        scores = _as_numpy(det["scores"], np.float64).reshape(-1)  # [k]
        labels = _as_numpy(det["labels"], np.int64).reshape(-1)  # [k]
        if not len(boxes) == len(scores) == len(labels):
            raise ValueError(
                f"image {image_id}: boxes, scores and labels differ in length "
                f"({len(boxes)}, {len(scores)}, {len(labels)})"
            )
        if len(labels) and (labels.min() < 0 or labels.max() >= len(id_map)):
            raise ValueError(
                f"image {image_id}: label {int(labels.max())} out of range for "
                f"{len(id_map)} classes"
            )
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
        categories = id_map[labels]
        for box, score, category in zip(xywh.tolist(), scores.tolist(), categories.tolist()):
            results.append(
                {"image_id": image_id, "category_id": category, "bbox": box, "score": score}
            )
    return results


def write_coco_results(path: str | os.PathLike[str], results: list[dict[str, Any]]) -> Path:
    """Write results as the JSON list ``COCO.loadRes`` reads (pycocotools itself cannot load an
    empty list; ``evaluate_coco`` can)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        json.dump(results, f)
    return path


def _coco_class(backend: Backend) -> type:
    if backend == "faster_coco_eval":
        from faster_coco_eval import COCO
    else:
        from pycocotools.coco import COCO
    return COCO


def _build_coco(backend: Backend, dataset: dict[str, Any]) -> Any:
    """A backend COCO object over an in-memory dataset dict, without pycocotools' chatter."""
    coco = _coco_class(backend)()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def load_coco_gt(
    source: str | os.PathLike[str] | dict[str, Any], backend: Backend = "pycocotools"
) -> Any:
    """A COCO ground-truth object from an annotation file or dict (quietly)."""
    if isinstance(source, dict):
        return _build_coco(backend, source)
    with open(source) as f:
        return _build_coco(backend, json.load(f))


def evaluate_coco(
    coco_gt: Any,
    results: list[dict[str, Any]] | str | os.PathLike[str],
    image_ids: Iterable[int] | None = None,
    backend: Backend = "faster_coco_eval",
) -> CocoStats:
    """COCO bbox AP/AR of ``results`` (list or results file) against ``coco_gt``.

    ``coco_gt`` is any pycocotools-style COCO object (pycocotools or faster-coco-eval: the
    dataset dict is re-indexed for the chosen backend when the classes differ). ``image_ids``
    restricts the evaluation to the images actually run (as DETR's evaluator does); default:
    every image of ``coco_gt``. Empty results give 0 where there is ground truth.
    """
    if not isinstance(results, list):
        with open(results) as f:
            results = json.load(f)
    assert isinstance(results, list)
    coco_class = _coco_class(backend)
    if isinstance(coco_gt, coco_class):
        gt = coco_gt
    else:  # index the same dict for this backend once, and keep it on the given object
        twin_key = f"_detr_lineage_{backend}_twin"
        gt = coco_gt.__dict__.get(twin_key)
        if gt is None or gt.dataset is not coco_gt.dataset:
            gt = _build_coco(backend, coco_gt.dataset)
            coco_gt.__dict__[twin_key] = gt

    known = set(gt.getImgIds())
    unknown = {int(r["image_id"]) for r in results} - known
    if unknown:
        raise ValueError(
            f"{len(unknown)} result image ids are not in the ground truth, "
            f"e.g. {sorted(unknown)[:5]}"
        )
    ids = sorted(known) if image_ids is None else sorted({int(i) for i in image_ids})
    if not set(ids) <= known:
        missing = sorted(set(ids) - known)[:5]
        raise ValueError(f"image_ids not in the ground truth, e.g. {missing}")

    results = [dict(r) for r in results]  # loadRes adds keys in place
    with contextlib.redirect_stdout(io.StringIO()):
        if results:
            dt = gt.loadRes(results)
        else:  # pycocotools' loadRes cannot take an empty list
            dt = _build_coco(
                backend,
                {
                    "images": list(gt.dataset.get("images", [])),
                    "categories": list(gt.dataset.get("categories", [])),
                    "annotations": [],
                },
            )
        if backend == "faster_coco_eval":
            from faster_coco_eval import COCOeval_faster

            evaluator = COCOeval_faster(gt, dt, iouType="bbox", print_function=lambda *a: None)
        else:
            from pycocotools.cocoeval import COCOeval

            evaluator = COCOeval(gt, dt, iouType="bbox")
        evaluator.params.imgIds = ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return CocoStats(list(evaluator.stats)[: len(STAT_NAMES)])
