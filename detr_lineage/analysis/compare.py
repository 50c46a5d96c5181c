"""``detr-lineage compare RUN_DIR... [--out DIR]``: overlay the curves of runs, tabulate speed.

Runs are grouped by ``run.group`` (runs that differ only by seed); every ``train/loss*`` term,
``val/map`` and ``val/map_50`` is plotted against steps, epochs and wall time (mean over seeds,
min-max band), and ``summary.md`` / ``summary.csv`` (per group) and ``runs.csv`` (per run) give
best/final mAP and the steps, epochs and time to reach each threshold, with the speed-up
against a baseline group. Reads the CSV logs (no network); W&B only for W&B run paths.
"""

from __future__ import annotations

import argparse
import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from . import plots
from .dn_curves import (
    class_loss_kind,
    crossing_label,
    denoising_speedups,
    plot_denoising_class_loss,
    speedups_markdown,
)
from .runs import Run, config_differences, group_runs, is_run_dir, load_runs
from .summary import markdown_table, summary_tables

DEFAULT_THRESHOLDS = (0.25, 0.5)
DEFAULT_METRIC = "val/map_50"
MAP_METRIC = "val/map"


@dataclass
class Comparison:
    """What ``compare`` read and wrote."""

    runs: list[Run]
    groups: dict[str, list[Run]]
    table: pd.DataFrame  # one row per group
    per_run: pd.DataFrame  # one row per run
    markdown: str
    notes: list[str] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)


DEFAULT_PLOTS = ("train/loss*", MAP_METRIC, "val/map_50", "val/near_miss", "val/duplicates")
# shown in summary.md: DN on vs off class loss, the overview, mAP@0.5 vs steps / epochs / time
HEADLINE_FIGURES = ("dn_class_loss", "overview", "val__map_50")


def plotted_metrics(
    runs: Sequence[Run], metric: str = DEFAULT_METRIC, patterns: Sequence[str] = DEFAULT_PLOTS
) -> list[str]:
    """Logged metrics matching the glob ``patterns`` (default: every ``train/loss*`` term,
    ``val/map``, ``val/map_50``) plus ``metric``; train terms first, the total loss leading."""
    logged = sorted({m for r in runs for m in r.metrics})
    chosen = [m for m in logged if any(fnmatch.fnmatchcase(m, p) for p in patterns)]
    if metric in logged and metric not in chosen:
        chosen.append(metric)
    return sorted(chosen, key=lambda m: (not m.startswith("train/"), m != "train/loss", m))


def group_notes(groups: dict[str, list[Run]]) -> list[str]:
    """Warnings for groups whose runs differ by more than the seed (a likely grouping mistake)."""
    notes = []
    for name, runs in groups.items():
        diff = config_differences(runs)
        if diff:
            shown = ", ".join(diff[:6]) + (" ..." if len(diff) > 6 else "")
            notes.append(f"group `{name}` mixes runs whose configs differ beyond the seed: {shown}")
        seeds = [r.seed for r in runs]
        if len(runs) > 1 and len(set(seeds)) < len(seeds):
            notes.append(f"group `{name}` has runs with the same seed: {seeds}")
    return notes


def compare(
    sources: Sequence[str | Path],
    out: str | Path | None = None,
    baseline: str | None = None,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    metric: str = DEFAULT_METRIC,
    smooth: float = plots.TRAIN_SMOOTHING,
    wandb_group: str | None = None,
    wandb_project: str | None = None,
    make_plots: bool = True,
    plot_patterns: Sequence[str] = DEFAULT_PLOTS,
) -> Comparison:
    """Load, group, tabulate and (if ``out``) write the table and the PNGs into ``out``."""
    runs = load_runs(sources, wandb_group, wandb_project)
    if not runs:
        raise FileNotFoundError(f"no runs found under {', '.join(map(str, sources))}")
    groups = group_runs(runs)
    table, per_run = summary_tables(groups, metric, thresholds, baseline, MAP_METRIC)
    notes = group_notes(groups)
    if smooth > 0:
        notes.append(
            f"Plots: train curves smoothed by an EMA of weight {smooth:g}; {plots.BAND_NOTE}."
        )
    markdown = "# Comparison\n\n" + markdown_table(table, thresholds, notes)
    markdown += speedups_markdown(denoising_speedups(groups, per_run, thresholds))
    result = Comparison(runs, groups, table, per_run, markdown, notes)
    if out is None:
        return result
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "summary.csv", index=False)
    per_run.to_csv(out / "runs.csv", index=False)
    if make_plots:
        chosen = plotted_metrics(runs, metric, plot_patterns)
        overview = [m for m in dict.fromkeys(("train/loss", MAP_METRIC, metric)) if m in chosen]
        kinds = {g: class_loss_kind(rs) for g, rs in groups.items()}
        mixed = kinds if len(set(kinds.values())) > 1 else None  # never unlabelled on one axis
        if overview:
            fig = plots.plot_overview(groups, overview, smooth=smooth, kinds=mixed)
            result.images.append(plots.save(fig, out / "overview.png"))
        dn = plot_denoising_class_loss(groups, smooth=smooth)
        if dn is not None:
            result.images.insert(0, plots.save(dn[0], out / "dn_class_loss.png"))
            lines = [f"- {on} vs {off}: {crossing_label(c)}" for on, off, c in dn[1]]
            result.markdown += (
                "\n## Denoising on vs off (class loss of the matching queries)\n\n"
                "The first step where the DN run's smoothed class loss reaches the off run's "
                "final value:\n\n" + "\n".join(lines) + "\n"
            )
        for m in chosen:
            has_class_term = m.split("/")[-1] == "loss" or "class" in m
            fig = plots.plot_metric(groups, m, smooth, kinds=mixed if has_class_term else None)
            result.images.append(plots.save(fig, out / plots.metric_filename(m)))
        if result.images:
            headline = [p for p in result.images if p.stem in HEADLINE_FIGURES]
            headline += [p for p in result.images if p not in headline][: max(0, 3 - len(headline))]
            figures = "\n".join(f"![{p.stem}]({p.name})" for p in headline)
            result.markdown += f"\n## Curves\n\n{figures}\n\nAll metrics: `*.png` in this folder.\n"
    (out / "summary.md").write_text(result.markdown)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="detr-lineage compare",
        description="Overlay the curves of runs (mean over seeds) and tabulate time-to-mAP.",
    )
    parser.add_argument(
        "runs",
        nargs="*",
        help="version dirs, run-name dirs (latest version), parents of many runs, "
        "or W&B run paths entity/project/run_id",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output folder (default: RUN_DIR/comparison for one folder "
        "of runs, else ./comparison)",
    )
    parser.add_argument("--baseline", default=None, help="group for speed-ups (default: first)")
    parser.add_argument(
        "--thresholds",
        nargs="+",
        type=float,
        default=list(DEFAULT_THRESHOLDS),
        help="targets of --metric for the time-to-reach columns",
    )
    parser.add_argument("--metric", default=DEFAULT_METRIC, help="metric the thresholds apply to")
    parser.add_argument(
        "--smooth",
        type=float,
        default=plots.TRAIN_SMOOTHING,
        help="EMA weight for train curves (0 = raw)",
    )
    parser.add_argument("--wandb-group", default=None, help="also load this W&B group (online)")
    parser.add_argument("--wandb-project", default=None, help="entity/project for --wandb-group")
    parser.add_argument("--no-plots", action="store_true", help="only the tables")
    parser.add_argument(
        "--plot-metrics",
        nargs="+",
        default=list(DEFAULT_PLOTS),
        metavar="GLOB",
        help="metrics to plot (default: %(default)s; --metric is always added)",
    )
    return parser


def main(argv: list[str]) -> None:
    """Entry point of ``detr-lineage compare``."""
    args = build_parser().parse_args(argv)
    if not args.runs and not args.wandb_group:
        build_parser().error("give at least one run directory, W&B run path or --wandb-group")
    out = args.out
    if out is None:  # a folder of runs gets its own comparison/, else ./comparison
        single = Path(args.runs[0]) if len(args.runs) == 1 else None
        parent = single is not None and single.is_dir() and not is_run_dir(single)
        out = single / "comparison" if parent else Path("comparison")
    result = compare(
        args.runs,
        out,
        baseline=args.baseline,
        thresholds=args.thresholds,
        metric=args.metric,
        smooth=args.smooth,
        wandb_group=args.wandb_group,
        wandb_project=args.wandb_project,
        make_plots=not args.no_plots,
        plot_patterns=args.plot_metrics,
    )
    print(result.markdown)
    print(f"{len(result.runs)} runs in {len(result.groups)} groups -> {out}")
