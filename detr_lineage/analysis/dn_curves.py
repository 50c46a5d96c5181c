"""The course's denoising plot: class loss with denoising on vs off, per variant.

For each pair of groups that differ only in denoising (same variant, data, budget), the
matching queries' class loss (``train/loss_class``, EMA-smoothed, mean over seeds) of both
runs on a log axis, the off run's final value as a horizontal line, and the first step where
the on run reaches it, with the ratio of steps (on run's step / off run's last step) written
beside it. Pairs of different variants are separate panels: their class losses are of
different kinds (DETR cross-entropy, DN-DETR focal, RT-DETRv2 varifocal), so their values are
not comparable and never share an axis.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib import ticker
from matplotlib.figure import Figure

from .plots import TRAIN_SMOOTHING, group_curve
from .runs import Run, experiment_config
from .summary import fmt_threshold, mean_std

CLASS_LOSS_METRIC = "train/loss_class"
DENOISING_KEY = "model.init_args.net.denoising"
OLD_DENOISING_KEY = "model.init_args.denoising"  # runs saved before the ``net`` argument
# LightningModule class -> its class loss (criterion.py): values of different kinds differ in scale
CLASS_LOSS_KIND = {"DETR": "cross-entropy", "DNDETR": "focal", "RTDETRv2": "varifocal"}


def variant_of(run: Run) -> str:
    """The LightningModule class name of a run (``model.class_path``'s last part), or ''."""
    model = run.config.get("model") if isinstance(run.config, dict) else None
    path = model.get("class_path", "") if isinstance(model, dict) else ""
    return str(path).rsplit(".", 1)[-1]


def class_loss_kind(runs: Sequence[Run]) -> str:
    """'cross-entropy' | 'focal' | 'varifocal' from the runs' model class, '?' if unknown."""
    kinds = {CLASS_LOSS_KIND.get(variant_of(r), "?") for r in runs}
    return kinds.pop() if len(kinds) == 1 else "?"


def _denoising_on(runs: Sequence[Run]) -> bool | None:
    flat = experiment_config(runs[0].config) if runs[0].config else {}
    for key in (DENOISING_KEY, OLD_DENOISING_KEY):
        if key in flat:
            return flat[key] is not None
        if any(k.startswith(key + ".") for k in flat):
            return True
    tags = set(runs[0].tags)
    return True if "dn_on" in tags else False if "dn_off" in tags else None


def _without_denoising(runs: Sequence[Run]) -> str:
    flat = experiment_config(runs[0].config)
    rest = {
        k: v
        for k, v in flat.items()
        if k != "run.group"
        and not any(
            k == key or k.startswith(key + ".") for key in (DENOISING_KEY, OLD_DENOISING_KEY)
        )
    }
    return json.dumps(rest, sort_keys=True, default=str)


def denoising_pairs(groups: Mapping[str, Sequence[Run]]) -> list[tuple[str, str]]:
    """(on group, off group) pairs: groups whose configs differ only in ``denoising`` (or, for
    runs without a config, whose names differ only in ``dn_on`` / ``dn_off``)."""
    on, off = {}, {}
    for name, runs in groups.items():
        state = _denoising_on(runs)
        if state is None:
            continue
        key = _without_denoising(runs) if runs[0].config else name.replace("dn_on", "dn_off")
        (on if state else off).setdefault(key, name)
    return [(on[k], off[k]) for k in on if k in off]


@dataclass
class Crossing:
    """Where the on curve first reaches the off curve's final value."""

    target: float  # the off run's final (smoothed, seed-mean) value
    off_steps: float  # the off run's last step
    on_steps: float | None  # first step where the on curve is <= target; None: never
    ratio: float | None  # on_steps / off_steps (0.5: denoising needed half the steps)


def first_crossing(
    on_x: np.ndarray, on_y: np.ndarray, off_x: np.ndarray, off_y: np.ndarray
) -> Crossing:
    """The first logged x of the on curve, at or after its peak, whose value is <= the off
    curve's last value.

    Counting from the peak matters for varifocal loss (RT-DETRv2): its target is the IoU, so the
    loss starts near zero while the boxes are still random, rises, and only then falls; an
    early value below the target says nothing about convergence.
    """
    order = np.argsort(off_x, kind="stable")
    off_x, off_y = np.asarray(off_x, float)[order], np.asarray(off_y, float)[order]
    target, off_steps = float(off_y[-1]), float(off_x[-1])
    order = np.argsort(on_x, kind="stable")
    on_x, on_y = np.asarray(on_x, float)[order], np.asarray(on_y, float)[order]
    peak = int(np.argmax(on_y))
    hits = peak + np.flatnonzero(on_y[peak:] <= target)
    if hits.size == 0:
        return Crossing(target, off_steps, None, None)
    step = float(on_x[hits[0]])
    return Crossing(target, off_steps, step, step / off_steps)


def crossing_label(c: Crossing) -> str:
    if c.on_steps is None:
        return "DN on never reaches the off run's final value"
    return (
        f"DN on reaches it at step {c.on_steps:,.0f} = {c.ratio:.2f} x the off run's "
        f"{c.off_steps:,.0f} steps"
    )


def plot_denoising_class_loss(
    groups: Mapping[str, Sequence[Run]],
    metric: str = CLASS_LOSS_METRIC,
    smooth: float = TRAIN_SMOOTHING,
) -> tuple[Figure, list[tuple[str, str, Crossing]]] | None:
    """One log-y panel per (on, off) pair; None when no pair has the metric."""
    panels = []
    for on, off in denoising_pairs(groups):
        con = group_curve(groups[on], metric, "steps", smooth)
        coff = group_curve(groups[off], metric, "steps", smooth)
        if con.empty or coff.empty:
            continue
        panels.append((on, off, con, coff))
    if not panels:
        return None
    fig = Figure(figsize=(5.5 * len(panels), 4.2))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    found = []
    for ax, (on, off, con, coff) in zip(axes, panels):
        cross = first_crossing(con["x"], con["mean"], coff["x"], coff["mean"])
        found.append((on, off, cross))
        for name, c, colour in ((off, coff, "tab:gray"), (on, con, "tab:red")):
            label = f"{name} (n={len(groups[name])})"
            ax.plot(c["x"], c["mean"], color=colour, lw=1.4, label=label)
        for c, colour in ((coff, "tab:gray"), (con, "tab:red")):
            if (c["n"] > 1).any():
                ax.fill_between(c["x"], c["lo"], c["hi"], color=colour, alpha=0.15, lw=0)
        ax.axhline(cross.target, color="tab:gray", ls="--", lw=1)
        if cross.on_steps is not None:
            ax.axvline(cross.on_steps, color="tab:red", ls=":", lw=1.2)
            ax.plot([cross.on_steps], [cross.target], "o", color="tab:red", ms=6)
        ax.text(0.02, 0.03, crossing_label(cross), transform=ax.transAxes, fontsize=8, va="bottom")
        ax.set_yscale("log")
        plain = ticker.FuncFormatter(lambda v, _: f"{v:.2g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        kind = class_loss_kind(groups[on])
        ax.set_title(f"{variant_of(groups[on][0]) or on}: {metric} ({kind}, log)", fontsize=10)
        ax.set_xlabel("optimiser steps")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    note = (
        f"Denoising on vs off: matching queries' class loss (EMA {smooth:g}, mean over seeds). "
        "Dashed: the off run's final value; dotted: the first step where the on run reaches it. "
        "One panel per variant: CE / focal / varifocal values are not comparable across panels."
    )
    fig.suptitle(textwrap.fill(note, width=int(12.5 * 5.5 * len(panels))), fontsize=9)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.13, top=0.74, wspace=0.22)
    return fig, found


def denoising_speedups(
    groups: Mapping[str, Sequence[Run]], per_run: pd.DataFrame, thresholds: Sequence[float]
) -> pd.DataFrame:
    """Denoising's speed-up per (on, off) pair and threshold, paired by seed.

    For every seed present in both groups: off run's steps to the threshold / on run's (> 1:
    denoising got there in fewer optimiser steps), and the same for wall-clock seconds. A seed
    counts only where both runs reached the threshold; mean and sample std over those seeds.
    ``per_run``: ``summary_tables``'s second table (``group``, ``seed``, ``steps_to_<t>``,
    ``wall_s_to_<t>`` columns).
    """
    rows = []
    for on, off in denoising_pairs(groups):
        a = per_run[per_run["group"] == on].drop_duplicates("seed", keep="last").set_index("seed")
        b = per_run[per_run["group"] == off].drop_duplicates("seed", keep="last").set_index("seed")
        seeds = sorted(set(a.index) & set(b.index))
        for t in thresholds:
            key = fmt_threshold(t)
            row = {"on": on, "off": off, "threshold": t, "seeds": len(seeds)}
            for unit, col in (("steps", f"steps_to_{key}"), ("wall", f"wall_s_to_{key}")):
                ratios = [float(b.at[s, col] / a.at[s, col]) for s in seeds]
                ratios = [r for r in ratios if np.isfinite(r)]
                row[f"{unit}_speedup"], row[f"{unit}_speedup_std"] = mean_std(ratios)
                row["both_reached"] = len(ratios)
            rows.append(row)
    return pd.DataFrame(rows)


def speedups_markdown(table: pd.DataFrame) -> str:
    """``denoising_speedups`` as a Markdown section (empty string when there is no pair)."""
    if table.empty:
        return ""

    def cell(mean: float, std: float) -> str:
        if not np.isfinite(mean):
            return "–"
        return f"{mean:.2f}x" + (f" ± {std:.2f}" if np.isfinite(std) else "")

    lines = [
        "\n## Denoising on vs off: speed-up to each threshold, paired by seed\n",
        "Off run's steps (or seconds) to the threshold / on run's, per seed, then mean ± sample "
        "std over the seeds where both runs reached it (> 1: denoising is faster).\n",
        "| on | off | threshold | both reached / seeds | per step | per second |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in table.itertuples():
        lines.append(
            f"| {r.on} | {r.off} | {r.threshold:g} | {r.both_reached}/{r.seeds} "
            f"| {cell(r.steps_speedup, r.steps_speedup_std)} "
            f"| {cell(r.wall_speedup, r.wall_speedup_std)} |"
        )
    return "\n".join(lines) + "\n"


__all__ = [
    "CLASS_LOSS_KIND",
    "Crossing",
    "class_loss_kind",
    "crossing_label",
    "denoising_pairs",
    "denoising_speedups",
    "first_crossing",
    "plot_denoising_class_loss",
    "speedups_markdown",
    "variant_of",
]
