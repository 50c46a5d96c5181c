"""Look inside trained detectors: predicted vs ground-truth boxes, and what each query learned.

``plot_query_specialization`` redraws the DETR paper's figure 7: for each query slot, the
centres of its predicted boxes over the validation images, coloured green for small boxes,
red for large wide ones and blue for large tall ones. A slot that specialises covers a region
and a size range; for RT-DETRv2 the slots are the top-k encoder proposals of each image, so
its panels mix what different positions in the ranking happen to pick.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from matplotlib.figure import Figure, SubFigure
from matplotlib.patches import Rectangle

from .runs import find_run_dirs, group_runs, load_runs


def one_run_per_group(runs_dir: str | Path) -> dict[str, Path]:
    """group -> the run dir of its first seed, for everything under ``runs_dir``."""
    groups = group_runs(load_runs([runs_dir]))
    return {name: Path(runs[0].path) for name, runs in groups.items()}


def find_checkpoint(run_dir: str | Path, prefer: str = "best") -> Path:
    """A run's checkpoint: ``best-*`` (highest val/map) or ``last``, falling back to the other."""
    version = find_run_dirs(run_dir)[0]
    directory = Path(version) / "checkpoints"
    best = sorted(directory.glob("best-*.ckpt"), key=lambda p: p.stat().st_mtime)
    last = [p for p in (directory / "last.ckpt", directory / "resume.ckpt") if p.is_file()]
    order = best[::-1] + last if prefer == "best" else last + best[::-1]
    if not order:
        raise FileNotFoundError(f"{directory}: no checkpoint")
    return order[0]


def datamodule_from_run(run_dir: str | Path, **overrides: Any):
    """The run's data module, rebuilt from its ``config.yaml`` (``overrides`` replace init args,
    e.g. ``num_workers=0``)."""
    version = find_run_dirs(run_dir)[0]
    with open(Path(version) / "config.yaml") as f:
        data = yaml.safe_load(f)["data"]
    module, _, name = data["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    return cls(**{**(data.get("init_args") or {}), **overrides})


@torch.no_grad()
def predict_batch(model: torch.nn.Module, batch: dict) -> tuple[dict, list[dict]]:
    """Network outputs and scored detections (original pixels, xyxy) of one collated batch."""
    model.eval()
    outputs = model(batch["images"], batch["masks"])
    return outputs, model.detections(outputs, batch["targets"])


def plot_predictions(
    model: torch.nn.Module,
    dataset: Any,
    indices: Sequence[int] = range(6),
    score_threshold: float = 0.5,
    class_names: Sequence[str] | None = None,
    columns: int = 3,
) -> Figure:
    """Images with ground truth (green, dashed) and detections above the threshold (red)."""
    from ..data.collate import collate_detection

    batch = collate_detection([dataset[i] for i in indices])
    _, detections = predict_batch(model, batch)
    rows = -(-len(indices) // columns)
    fig = Figure(figsize=(3.2 * columns, 3.2 * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, target, det in zip(axes.flat, batch["images"], batch["targets"], detections):
        h, w = target["orig_size"].tolist()
        pixels = image[:, :h, :w].permute(1, 2, 0).clamp(0, 1).numpy()
        ax.imshow(pixels, extent=(0, w, h, 0))  # pixel edges on integers, as the boxes
        gt = model.ground_truth([target])[0]
        for box in gt["boxes"].tolist():
            ax.add_patch(_box(box, "lime", "--"))
        keep = det["scores"] >= score_threshold
        for box, label, score in zip(
            det["boxes"][keep].tolist(), det["labels"][keep].tolist(), det["scores"][keep].tolist()
        ):
            ax.add_patch(_box(box, "red", "-"))
            name = class_names[label] if class_names else str(label)
            ax.text(
                box[0],
                box[1],
                f"{name} {score:.2f}",
                color="white",
                fontsize=6,
                va="bottom",
                bbox={"facecolor": "red", "alpha": 0.6, "pad": 0.5, "lw": 0},
            )
        ax.set_title(
            f"image {target['image_id']}: {int(keep.sum())} det / {len(gt['boxes'])} gt", fontsize=8
        )
    fig.suptitle(f"ground truth (green, dashed), detections with score ≥ {score_threshold}")
    return fig


def _box(xyxy: Sequence[float], colour: str, style: str) -> Rectangle:
    x0, y0, x1, y1 = xyxy
    return Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec=colour, ls=style, lw=1.2)


@torch.no_grad()
def query_boxes(
    model: torch.nn.Module, loader: Any, max_images: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Predicted boxes of every query slot over a loader: ``boxes [N,Q,4]`` (normalised cxcywh)
    and ``scores [N,Q]`` (the slot's best class probability, no-object excluded)."""
    model.eval()
    boxes, scores = [], []
    seen = 0
    for batch in loader:
        outputs = model(batch["images"], batch["masks"])
        logits = outputs["pred_logits"]  # [B,Q,C(+1)]
        if model.postprocess.mode == "softmax":
            prob = logits.softmax(-1)[..., :-1].max(-1).values
        else:
            prob = logits.sigmoid().max(-1).values
        boxes.append(outputs["pred_boxes"].cpu().numpy())
        scores.append(prob.cpu().numpy())
        seen += len(logits)
        if max_images is not None and seen >= max_images:
            break
    boxes_np, scores_np = np.concatenate(boxes), np.concatenate(scores)
    return boxes_np[:max_images], scores_np[:max_images]


def size_colours(boxes: np.ndarray, small: float = 0.2) -> np.ndarray:
    """The paper's colours of ``[...,4]`` cxcywh boxes: green if sqrt(w h) < ``small`` (of the
    image side), else red when wider than tall, blue when taller. -> ``[...,3]`` RGB."""
    w, h = boxes[..., 2], boxes[..., 3]
    colours = np.zeros((*boxes.shape[:-1], 3))
    is_small = np.sqrt(w * h) < small
    colours[is_small] = (0.0, 0.7, 0.0)
    colours[~is_small & (w >= h)] = (0.85, 0.0, 0.0)
    colours[~is_small & (w < h)] = (0.0, 0.2, 0.9)
    return colours


def plot_query_specialization(
    boxes: np.ndarray,
    scores: np.ndarray | None = None,
    num_slots: int = 20,
    min_score: float = 0.0,
    small: float = 0.2,
    title: str = "",
    columns: int = 5,
    fig: Figure | SubFigure | None = None,
) -> Figure | SubFigure:
    """One panel per query slot: centres of its boxes over all images (DETR paper, fig. 7).

    Draws into ``fig`` when given (e.g. a subfigure of ``plot_specialization_grid``)."""
    slots = min(num_slots, boxes.shape[1])
    rows = -(-slots // columns)
    if fig is None:
        fig = Figure(figsize=(1.9 * columns, 1.9 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_visible(False)
    for q, ax in zip(range(slots), axes.flat):
        ax.set_visible(True)
        b = boxes[:, q]
        if scores is not None and min_score > 0:
            b = b[scores[:, q] >= min_score]
        ax.scatter(b[:, 0], b[:, 1], c=size_colours(b, small), s=4, alpha=0.5, lw=0)
        ax.set_xlim(0, 1)
        ax.set_ylim(1, 0)  # image coordinates: y down
        ax.set_aspect("equal")
        ax.set_title(f"query {q}", fontsize=7)
    note = f"green: sqrt(wh) < {small:g}; red: large, wide; blue: large, tall"
    fig.suptitle(
        f"{title}\nbox centres per query slot over {len(boxes)} images; {note}", fontsize=9
    )
    return fig


def plot_specialization_grid(
    panels: dict[tuple[str, str], tuple[np.ndarray, np.ndarray | None]],
    num_slots: int = 20,
    columns: int = 5,
    title: str = "",
) -> Figure:
    """``(row, column) -> (boxes, scores)``: one query-specialisation figure per cell, e.g. rows
    = training stage (early, end) and columns = denoising (on, off), titled ``row, column``."""
    rows = list(dict.fromkeys(r for r, _ in panels))
    cols = list(dict.fromkeys(c for _, c in panels))
    slots = min(num_slots, max(b.shape[1] for b, _ in panels.values()))
    height = 1.5 * -(-slots // columns) + 0.7
    fig = Figure(figsize=(1.5 * columns * len(cols), height * len(rows)), layout="constrained")
    cells = fig.subfigures(len(rows), len(cols), squeeze=False)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            if (r, c) in panels:
                boxes, scores = panels[(r, c)]
                plot_query_specialization(
                    boxes, scores, num_slots, title=f"{r}, {c}", columns=columns, fig=cells[i][j]
                )
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def snapshot_checkpoints(run_dir: str | Path) -> dict[int, Path]:
    """step -> ``checkpoints/step_<step>.ckpt`` kept by ``SnapshotCheckpoint`` (may be empty)."""
    version = find_run_dirs(run_dir)[0]
    found = {}
    for path in (Path(version) / "checkpoints").glob("step_*.ckpt"):
        step = path.stem.removeprefix("step_")
        if step.isdigit():
            found[int(step)] = path
    return dict(sorted(found.items()))
