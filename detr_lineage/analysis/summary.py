"""The comparison table: final and best mAP, and how fast each group reaches a target.

Definitions (stated in the Markdown so a reader does not have to guess):

- *steps to t*: optimiser steps done at the first evaluation where the metric is >= t (no
  interpolation between evaluations); *epochs* and *wall time* at that same evaluation.
- Per group: the mean over the seeds that reached t, and how many did (``reached``).
- *speed-up*: baseline's mean steps to t / the group's (> 1: the group gets there faster);
  empty when either did not reach t. Being conditional on reaching t, read it with ``reached``.
- ``±``: sample standard deviation over seeds (ddof = 1); none with one seed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from .runs import Run


def first_reach(series: pd.DataFrame, threshold: float) -> pd.Series | None:
    """The first row (in step order) whose value is >= threshold, or None."""
    hits = series[series["value"] >= threshold]
    return None if hits.empty else hits.sort_values("step", kind="stable").iloc[0]


def short_name(metric: str) -> str:
    """``val/map_50`` -> ``map_50`` (column names of the table)."""
    return metric.split("/", 1)[-1]


def fmt_threshold(t: float) -> str:
    return f"{t:g}"


def run_summary(
    run: Run, metric: str, thresholds: Sequence[float], map_metric: str = "val/map"
) -> dict:
    """One run's row: best/final of ``map_metric`` and ``metric``, and time to each threshold."""
    row: dict = {"run": run.name, "seed": run.seed, "path": run.path}
    for m in dict.fromkeys([map_metric, metric]):
        series = run.series(m)
        name = short_name(m)
        row[f"best_{name}"] = float(series["value"].max()) if len(series) else np.nan
        row[f"final_{name}"] = float(series["value"].iloc[-1]) if len(series) else np.nan
    series = run.series(metric)
    row["last_step"] = int(run.frame["steps"].max()) if len(run.frame) else 0
    for t in thresholds:
        hit = first_reach(series, t)
        key = fmt_threshold(t)
        row[f"steps_to_{key}"] = float(hit["steps"]) if hit is not None else np.nan
        row[f"epochs_to_{key}"] = float(hit["epoch"]) if hit is not None else np.nan
        row[f"wall_s_to_{key}"] = float(hit["wall_s"]) if hit is not None else np.nan
    return row


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (ddof 1) of the finite values; std is NaN below two values."""
    finite = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if finite.size == 0:
        return np.nan, np.nan
    std = float(finite.std(ddof=1)) if finite.size > 1 else np.nan
    return float(finite.mean()), std


def summary_tables(
    groups: Mapping[str, Sequence[Run]],
    metric: str = "val/map_50",
    thresholds: Sequence[float] = (0.25, 0.5),
    baseline: str | None = None,
    map_metric: str = "val/map",
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """-> (one row per group, one row per run). ``baseline`` defaults to the first group."""
    if baseline is None and groups:
        baseline = next(iter(groups))
    if baseline is not None and baseline not in groups:
        raise ValueError(f"baseline group {baseline!r} is not among {', '.join(groups)}")
    per_run = []
    for group, runs in groups.items():
        for run in runs:
            per_run.append({"group": group, **run_summary(run, metric, thresholds, map_metric)})
    runs_df = pd.DataFrame(per_run)
    rows = []
    for group in groups:
        mine = runs_df[runs_df["group"] == group]
        seeds = [s for s in mine["seed"] if s is not None and not _isnan(s)]
        row: dict = {
            "group": group,
            "n_seeds": len(mine),
            "seeds": ",".join(str(int(s)) for s in seeds),
        }
        for m in dict.fromkeys([map_metric, metric]):
            name = short_name(m)
            for kind in ("best", "final"):
                row[f"{kind}_{name}_mean"], row[f"{kind}_{name}_std"] = mean_std(
                    mine[f"{kind}_{name}"]
                )
        for t in thresholds:
            key = fmt_threshold(t)
            steps = mine[f"steps_to_{key}"]
            row[f"reached_{key}"] = int(steps.notna().sum())
            row[f"steps_to_{key}"] = mean_std(steps)[0]
            row[f"epochs_to_{key}"] = mean_std(mine[f"epochs_to_{key}"])[0]
            row[f"wall_s_to_{key}"] = mean_std(mine[f"wall_s_to_{key}"])[0]
        rows.append(row)
    table = pd.DataFrame(rows)
    for t in thresholds:
        key = fmt_threshold(t)
        base = table.loc[table["group"] == baseline, f"steps_to_{key}"]
        base_steps = float(base.iloc[0]) if len(base) else np.nan
        table[f"speedup_{key}"] = base_steps / table[f"steps_to_{key}"]
    table.attrs.update(baseline=baseline, metric=metric, map_metric=map_metric)
    return table, runs_df


def _isnan(x: object) -> bool:
    return isinstance(x, float) and math.isnan(x)


def _pm(mean: float, std: float, digits: int = 3) -> str:
    if _isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" if _isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def format_duration(seconds: float) -> str:
    """``754`` -> ``12m 34s`` (``–`` when unknown)."""
    if seconds is None or _isnan(seconds):
        return "–"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h {m:02d}m"
    return f"{m}m {s:02d}s" if m else f"{s}s"


def _num(x: float, digits: int = 0) -> str:
    return "–" if _isnan(x) else f"{x:.{digits}f}"


def markdown_table(
    table: pd.DataFrame, thresholds: Sequence[float], notes: Sequence[str] = ()
) -> str:
    """The two tables (scores; time to each threshold) plus definitions, as Markdown."""
    metric, map_metric = table.attrs["metric"], table.attrs["map_metric"]
    baseline = table.attrs["baseline"]
    names = list(dict.fromkeys([short_name(map_metric), short_name(metric)]))
    head = ["group", "seeds"]
    for name in names:
        head += [f"best {name}", f"final {name}"]
    lines = ["## Scores", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in table.iterrows():
        cells = [str(r["group"]), f"{r['n_seeds']} ({r['seeds']})" if r["seeds"] else "1"]
        for name in names:
            for kind in ("best", "final"):
                cells.append(_pm(r[f"{kind}_{name}_mean"], r[f"{kind}_{name}_std"]))
        lines.append("| " + " | ".join(cells) + " |")
    head = ["group", f"{metric} ≥", "reached", "steps", "epochs", "wall time", "speed-up"]
    lines += [
        "",
        f"## Time to reach {metric} (baseline for the speed-up: `{baseline}`)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for t in thresholds:
        key = fmt_threshold(t)
        for _, r in table.iterrows():
            speedup = r[f"speedup_{key}"]
            cells = [
                str(r["group"]),
                key,
                f"{r[f'reached_{key}']}/{r['n_seeds']}",
                _num(r[f"steps_to_{key}"]),
                _num(r[f"epochs_to_{key}"], 2),
                format_duration(r[f"wall_s_to_{key}"]),
                "–" if _isnan(speedup) else f"{speedup:.2f}×",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "- Steps: optimiser steps done at the first evaluation with the metric ≥ the threshold; "
        "epochs and wall time at that evaluation. Per group: mean over the seeds that reached "
        "it (`reached` says how many).",
        f"- Speed-up: `{baseline}`'s mean steps ÷ the group's (> 1 = faster), over the seeds "
        "that reached the threshold.",
        "- ±: sample standard deviation over seeds (ddof = 1); none with a single seed.",
        *[f"- {n}" for n in notes],
    ]
    return "\n".join(lines) + "\n"
