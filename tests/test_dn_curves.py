"""The course's plot: DN on vs off class loss, with the crossing step known by construction.

Synthetic class losses, logged at every step s = 0..99 (x = s + 1 optimiser steps done):
- off: 1 - 0.005 s  -> final value 0.505 at 100 steps;
- on:  1 - 0.010 s  -> first <= 0.505 at s = 50 (0.5), i.e. 51 steps: ratio 51 / 100.
A second seed of the on group, 1 - 0.006 s, moves the seed mean to 1 - 0.008 s: first
<= 0.505 at s = 62 (0.504), 63 steps. RT-DETRv2 pair: on (1 - 0.0005 s) is slower than off
(1 - 0.001 s) and never reaches off's final 0.901.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from detr_lineage.analysis import compare as compare_mod
from detr_lineage.analysis import plots
from detr_lineage.analysis.dn_curves import (
    class_loss_kind,
    denoising_pairs,
    denoising_speedups,
    first_crossing,
    plot_denoising_class_loss,
    speedups_markdown,
)
from detr_lineage.analysis.runs import group_runs, load_runs

DN = {"groups": 5, "label_noise": 0.2, "box_noise": 0.4}


def write_run(root: Path, name: str, group: str, seed: int, slope: float, cls: str, dn) -> None:
    directory = root / name / "version_0"
    directory.mkdir(parents=True)
    with open(directory / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "time/wall_s", "train/loss_class"])
        writer.writeheader()
        for s in range(100):
            writer.writerow({"step": s, "time/wall_s": s + 1, "train/loss_class": 1 - slope * s})
    config = {
        "seed_everything": seed,
        "model": {"class_path": f"detr_lineage.lit.{cls}", "init_args": {"net": {"denoising": dn}}},
        "run": {"name": name, "group": group, "tags": [], "dir": str(root)},
    }
    (directory / "config.yaml").write_text(yaml.safe_dump(config))


@pytest.fixture
def runs_root(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    write_run(root, "detr-on-s0", "detr-on", 0, 0.010, "DETR", DN)
    write_run(root, "detr-on-s1", "detr-on", 1, 0.006, "DETR", DN)
    write_run(root, "detr-off-s0", "detr-off", 0, 0.005, "DETR", None)
    write_run(root, "rt-on-s0", "rt-on", 0, 0.0005, "RTDETRv2", {**DN, "contrastive": True})
    write_run(root, "rt-off-s0", "rt-off", 0, 0.001, "RTDETRv2", None)
    return root


def test_first_crossing_on_known_curves():
    s = np.arange(100.0)
    c = first_crossing(s + 1, 1 - 0.01 * s, s + 1, 1 - 0.005 * s)
    assert c.target == pytest.approx(0.505) and c.off_steps == 100
    assert c.on_steps == 51 and c.ratio == pytest.approx(0.51)
    never = first_crossing(s + 1, 1 - 0.001 * s, s + 1, 1 - 0.005 * s)
    assert never.on_steps is None and never.ratio is None
    # order of the logged points does not matter
    shuffled = np.random.default_rng(0).permutation(100)
    again = first_crossing((s + 1)[shuffled], (1 - 0.01 * s)[shuffled], s + 1, 1 - 0.005 * s)
    assert again.on_steps == 51


def test_first_crossing_counts_from_the_peak():
    """A varifocal-like curve starts low, peaks, then falls: the early low values are not a
    crossing; the first point after the peak at or below the target is."""
    s = np.arange(100.0)
    rise_fall = np.where(s < 20, 0.05 + 0.05 * s, 1.0 - 0.01 * (s - 19))  # peak 1.0 at step 20
    c = first_crossing(s + 1, rise_fall, s + 1, np.full(100, 0.5))
    assert c.on_steps == 70 and c.ratio == pytest.approx(0.70)  # 1 - 0.01 * 50 = 0.5 at s = 69


def test_pairs_by_config_and_marker_on_seed_mean(runs_root):
    groups = group_runs(load_runs([runs_root]))
    assert sorted(denoising_pairs(groups)) == [("detr-on", "detr-off"), ("rt-on", "rt-off")]
    assert class_loss_kind(groups["detr-on"]) == "cross-entropy"
    assert class_loss_kind(groups["rt-off"]) == "varifocal"
    fig, found = plot_denoising_class_loss(groups, smooth=0.0)
    crossings = {on: c for on, _, c in found}
    assert crossings["detr-on"].on_steps == 63 and crossings["detr-on"].ratio == pytest.approx(0.63)
    assert crossings["rt-on"].on_steps is None
    axes = fig.axes
    assert len(axes) == 2  # one panel per variant: CE and VFL never share an axis
    assert all(ax.get_yscale() == "log" for ax in axes)
    titles = [ax.get_title() for ax in axes]
    assert any("cross-entropy" in t for t in titles) and any("varifocal" in t for t in titles)
    marker = [line for line in axes[0].lines if list(line.get_xdata()) == [63.0]]
    assert marker, "the crossing step is marked"
    assert any("0.63 x" in t.get_text() for t in axes[0].texts)
    assert any("never" in t.get_text() for t in axes[1].texts)


def test_compare_writes_the_dn_figure_and_lines(runs_root, tmp_path):
    result = compare_mod.compare([runs_root], tmp_path / "out", smooth=0.0)
    assert (tmp_path / "out" / "dn_class_loss.png").is_file()
    assert "detr-on vs detr-off: DN on reaches it at step 63 = 0.63 x" in result.markdown
    assert "![dn_class_loss](dn_class_loss.png)" in result.markdown


def test_class_losses_of_different_kinds_are_labelled_on_a_shared_axis(runs_root):
    groups = group_runs(load_runs([runs_root]))
    kinds = {g: class_loss_kind(rs) for g, rs in groups.items()}
    fig = plots.plot_metric(groups, "train/loss_class", 0.0, kinds=kinds)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "detr-on (n=2) [cross-entropy]" in legend and "rt-off (n=1) [varifocal]" in legend
    assert plots.KINDS_NOTE in fig._suptitle.get_text()


def test_runs_saved_before_the_net_argument_still_pair(tmp_path):
    """config.yaml of older runs holds model.init_args.denoising (no ``net``)."""
    from detr_lineage.analysis.dn_curves import _denoising_on, _without_denoising
    from detr_lineage.analysis.runs import Run

    def run(dn):
        config = {"model": {"class_path": "x.DETR", "init_args": {"denoising": dn, "lr": 1}}}
        return Run(name="r", path=str(tmp_path), frame=None, config=config, group="g")

    assert _denoising_on([run({"groups": 5})]) is True and _denoising_on([run(None)]) is False
    assert _without_denoising([run({"groups": 5})]) == _without_denoising([run(None)])


def test_denoising_speedups_pair_seeds_and_keep_the_spread(runs_root):
    """Known steps / seconds to each threshold: ratios off / on per seed, mean ± sample std."""
    nan = float("nan")
    rows = [  # group, seed, steps to 0.25, s to 0.25, steps to 0.5, s to 0.5
        ("detr-on", 0, 20, 40, 50, 100),
        ("detr-on", 1, nan, nan, 80, 160),
        ("detr-off", 0, 40, 40, 100, 150),
        ("detr-off", 1, 60, 60, 120, 180),
        ("rt-on", 0, nan, nan, nan, nan),
        ("rt-off", 0, 10, 10, 100, 100),
    ]
    cols = ["group", "seed", "steps_to_0.25", "wall_s_to_0.25", "steps_to_0.5", "wall_s_to_0.5"]
    per_run = pd.DataFrame(rows, columns=cols)
    groups = group_runs(load_runs([runs_root]))
    table = denoising_speedups(groups, per_run, [0.25, 0.5]).set_index(["on", "threshold"])
    detr = table.loc[("detr-on", 0.5)]
    assert detr["off"] == "detr-off" and detr["seeds"] == 2 and detr["both_reached"] == 2
    assert detr["steps_speedup"] == pytest.approx(1.75)  # 100/50 = 2, 120/80 = 1.5
    assert detr["steps_speedup_std"] == pytest.approx(np.std([2.0, 1.5], ddof=1))
    assert detr["wall_speedup"] == pytest.approx((1.5 + 1.125) / 2)  # 150/100, 180/160
    one = table.loc[("detr-on", 0.25)]  # seed 1's on run never reached 0.25: one pair left
    assert one["both_reached"] == 1 and one["steps_speedup"] == pytest.approx(2.0)
    assert np.isnan(one["steps_speedup_std"]) and one["wall_speedup"] == pytest.approx(1.0)
    never = table.loc[("rt-on", 0.5)]
    assert never["both_reached"] == 0 and np.isnan(never["steps_speedup"])
    text = speedups_markdown(table.reset_index())
    assert "| detr-on | detr-off | 0.5 | 2/2 | 1.75x ± 0.35 | 1.31x ± 0.27 |" in text
    assert "| rt-on | rt-off | 0.5 | 0/1 | – | – |" in text
