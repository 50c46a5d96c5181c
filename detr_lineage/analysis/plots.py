"""Curves of groups of runs: mean over seeds with a min-max band, against steps, epochs, time.

Train curves (logged every few steps, noisy) are lightly smoothed by a debiased exponential
moving average (``TRAIN_SMOOTHING``, as TensorBoard's slider) before the seeds are averaged;
validation curves are drawn raw with markers. Each run is interpolated on the union of the
group's x values, within its own range only (a shorter run does not bend the mean past its end).
Figures are plain ``matplotlib.figure.Figure``s: no pyplot state, quick to save in bulk, and
Jupyter displays them as they are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib import ticker
from matplotlib.figure import Figure

from .runs import Run

TRAIN_SMOOTHING = 0.6
X_AXES = {"steps": "optimiser steps", "epoch": "epochs", "wall_s": "wall time"}
BAND_NOTE = "line: mean over seeds; band: min–max over seeds (none with one seed)"
KINDS_NOTE = "class losses of different kinds [in brackets] are not comparable in value"


def ema(values: np.ndarray, weight: float) -> np.ndarray:
    """Debiased exponential moving average; ``weight`` 0 returns the values unchanged."""
    values = np.asarray(values, dtype=float)
    if weight <= 0 or values.size == 0:
        return values
    out = np.empty_like(values)
    acc = 0.0
    for i, v in enumerate(values):
        acc = weight * acc + (1 - weight) * v
        out[i] = acc / (1 - weight ** (i + 1))
    return out


def is_loss(metric: str) -> bool:
    return "loss" in metric.split("/")[-1]


def group_curve(
    runs: Sequence[Run], metric: str, x: str = "steps", smooth: float = 0.0
) -> pd.DataFrame:
    """-> columns ``x, mean, lo, hi, n`` (n: runs with a value there), on the union of x."""
    per_run = []
    for run in runs:
        s = run.series(metric).dropna(subset=[x])
        if s.empty:
            continue
        per_run.append((s[x].to_numpy(float), ema(s["value"].to_numpy(float), smooth)))
    if not per_run:
        return pd.DataFrame(columns=["x", "mean", "lo", "hi", "n"])
    grid = np.unique(np.concatenate([xs for xs, _ in per_run]))
    stack = np.full((len(per_run), grid.size), np.nan)
    for i, (xs, vs) in enumerate(per_run):
        order = np.argsort(xs, kind="stable")
        xs, vs = xs[order], vs[order]
        inside = (grid >= xs[0]) & (grid <= xs[-1])
        stack[i, inside] = np.interp(grid[inside], xs, vs)
    n = np.isfinite(stack).sum(0)
    with np.errstate(all="ignore"):
        mean = np.nanmean(stack, 0)
        lo, hi = np.nanmin(stack, 0), np.nanmax(stack, 0)
    return pd.DataFrame({"x": grid, "mean": mean, "lo": lo, "hi": hi, "n": n})


def _time_unit(seconds: float) -> tuple[float, str]:
    if seconds > 2 * 3600:
        return 3600.0, "h"
    return (60.0, "min") if seconds > 120 else (1.0, "s")


def _draw(
    ax,
    groups: Mapping[str, Sequence[Run]],
    metric: str,
    x: str,
    smooth: float,
    colours: Mapping[str, str],
    suffix: Mapping[str, str] | None = None,
) -> bool:
    scale, unit = 1.0, ""
    if x == "wall_s":
        top = max((r.frame["wall_s"].max() for rs in groups.values() for r in rs), default=0.0)
        scale, unit = _time_unit(float(np.nan_to_num(top)))
    drawn = False
    for group, runs in groups.items():
        curve = group_curve(runs, metric, x, smooth if metric.startswith("train/") else 0.0)
        if curve.empty:
            continue
        marker = "o" if not metric.startswith("train/") else None
        xs = curve["x"].to_numpy(float) / scale
        label = f"{group} (n={len(runs)})" + (f" [{suffix[group]}]" if suffix else "")
        ax.plot(xs, curve["mean"], color=colours[group], marker=marker, ms=3, lw=1.4, label=label)
        if len(runs) > 1:
            ax.fill_between(xs, curve["lo"], curve["hi"], color=colours[group], alpha=0.2, lw=0)
        drawn = True
    ax.set_xlabel(X_AXES[x] + (f" ({unit})" if unit else ""))
    if is_loss(metric) and drawn:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ticker.LogFormatter())  # 25 rather than 2.5x10^1
        ax.yaxis.set_minor_formatter(ticker.LogFormatter())
    ax.grid(True, alpha=0.3)
    return drawn


def group_colours(groups: Sequence[str]) -> dict[str, str]:
    cmap = matplotlib.colormaps["tab10" if len(groups) <= 10 else "tab20"]
    return {g: cmap(i % cmap.N) for i, g in enumerate(groups)}


def plot_metric(
    groups: Mapping[str, Sequence[Run]],
    metric: str,
    smooth: float = TRAIN_SMOOTHING,
    axes: Sequence[str] = ("steps", "epoch", "wall_s"),
    kinds: Mapping[str, str] | None = None,
) -> Figure:
    """One metric, one panel per x axis, one line (+ band) per group.

    ``kinds`` (group -> class-loss kind) labels each line with its kind and says in the title
    that the values of different kinds are not comparable (pass it for losses with a class term).
    """
    fig = Figure(figsize=(5 * len(axes), 4.0))
    panels = fig.subplots(1, len(axes), squeeze=False)
    colours = group_colours(list(groups))
    for ax, x in zip(panels[0], axes):
        if not _draw(ax, groups, metric, x, smooth, colours, kinds):
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    panels[0][0].set_ylabel(metric + (" (log)" if is_loss(metric) else ""))
    panels[0][0].legend(fontsize=8)
    note = BAND_NOTE
    if metric.startswith("train/") and smooth > 0:
        note = f"EMA smoothing {smooth:g}; " + note
    if kinds:
        note = f"{KINDS_NOTE}\n{note}"
    fig.suptitle(f"{metric}\n{note}", fontsize=10)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.14, top=0.8 if kinds else 0.84, wspace=0.18)
    return fig


def plot_overview(
    groups: Mapping[str, Sequence[Run]],
    metrics: Sequence[str] = ("train/loss", "val/map", "val/map_50"),
    x: str = "steps",
    smooth: float = TRAIN_SMOOTHING,
    kinds: Mapping[str, str] | None = None,
) -> Figure:
    """The headline metrics side by side against one x axis (the README figure); ``kinds`` as
    in ``plot_metric`` (labels the loss panels' lines)."""
    fig = Figure(figsize=(5 * len(metrics), 4.0))
    panels = fig.subplots(1, len(metrics), squeeze=False)
    colours = group_colours(list(groups))
    for ax, metric in zip(panels[0], metrics):
        _draw(ax, groups, metric, x, smooth, colours, kinds if is_loss(metric) else None)
        ax.set_title(metric + (" (log)" if is_loss(metric) else ""), fontsize=10)
        if is_loss(metric):
            ax.legend(fontsize=8)
    if not any(is_loss(m) for m in metrics):
        panels[0][0].legend(fontsize=8)
    note = f"train curves: EMA smoothing {smooth:g}; {BAND_NOTE}"
    fig.suptitle(note + (f"\n{KINDS_NOTE}" if kinds else ""), fontsize=9)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.14, top=0.86, wspace=0.2)
    return fig


def metric_filename(metric: str) -> str:
    """``train/loss_bbox`` -> ``train__loss_bbox.png``."""
    return metric.replace("/", "__") + ".png"


def save(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
