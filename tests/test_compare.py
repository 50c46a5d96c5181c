"""``detr-lineage compare`` on synthetic logs whose table is known by hand.

Every synthetic run has 10 steps per epoch, validates at each epoch's end (steps 10, 20, 30, 40
done), logs ``time/wall_s = 2 * steps`` and ``val/map = val/map_50 / 2``. Two groups:

- ``base`` (seeds 0, 1): map_50 = [.1 .3 .5 .7] and [.2 .25 .4 .65]
  -> reaches 0.3 at 20 and 30 steps (mean 25), 0.6 at 40 and 40 (mean 40).
- ``fast`` (seeds 0, 1, 2): [.35 .6 .7 .8], [.2 .5 .62 .7], [.1 .2 .25 .28]
  -> 0.3 at 10 and 20 (mean 15, 2/3), 0.6 at 20 and 30 (mean 25, 2/3), seed 2 never.
  Speed-up vs base: 25/15 and 40/25.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from detr_lineage.analysis import compare as compare_mod
from detr_lineage.analysis.runs import (
    find_run_dirs,
    group_runs,
    load_run,
    load_runs,
    steps_per_epoch,
    strip_seed,
    tidy_metrics,
)
from detr_lineage.analysis.summary import first_reach, mean_std
from detr_lineage.analysis.wandb_io import history_to_frame

ROOT = Path(__file__).resolve().parents[1]
SPE = 10  # steps per epoch of the synthetic runs
MAP50 = {
    ("base", 0): [0.1, 0.3, 0.5, 0.7],
    ("base", 1): [0.2, 0.25, 0.4, 0.65],
    ("fast", 0): [0.35, 0.6, 0.7, 0.8],
    ("fast", 1): [0.2, 0.5, 0.62, 0.7],
    ("fast", 2): [0.1, 0.2, 0.25, 0.28],
}


def write_run(
    root: Path,
    name: str,
    seed: int,
    map50: list[float],
    group: str | None,
    lr: float = 1e-4,
    version: int = 0,
    repeat_from: int | None = None,
) -> Path:
    """A run directory as the CLI writes it: metrics.csv (Lightning's row layout) + config.yaml.

    ``repeat_from``: also append rows re-logging the train steps from there on (as an old
    resume would), with loss + 100 in the first copy so the test sees which one is kept.
    """
    directory = root / name / f"version_{version}"
    directory.mkdir(parents=True)
    keys = ["epoch", "lr-AdamW/detector", "step", "time/wall_s", "train/loss", "train/loss_bbox"]
    keys += ["val/map", "val/map_50"]
    rows = []

    def train_row(step: int, bump: float = 0.0) -> dict:
        loss = 10.0 / (step + 1) + bump
        row = {"epoch": step // SPE, "step": step, "time/wall_s": 2.0 * (step + 1)}
        return row | {"train/loss": loss, "train/loss_bbox": loss / 2}

    for step in range(len(map50) * SPE):
        rows.append({"lr-AdamW/detector": lr, "step": step})
        rows.append(
            train_row(step, 100.0 if repeat_from is not None and step >= repeat_from else 0)
        )
        if (step + 1) % SPE == 0:
            v = map50[(step + 1) // SPE - 1]
            rows.append({"epoch": step // SPE, "step": step, "val/map": v / 2, "val/map_50": v})
    if repeat_from is not None:
        rows += [train_row(step) for step in range(repeat_from, len(map50) * SPE)]
    with open(directory / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    config = {
        "seed_everything": seed,
        "trainer": {"max_steps": len(map50) * SPE},
        "model": {"class_path": "detr_lineage.lit.DETR", "init_args": {"lr": lr}},
        "run": {"name": name, "group": group, "tags": [f"seed{seed}"], "dir": str(root)},
        "ckpt_path": None,
    }
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    return directory


@pytest.fixture
def runs_root(tmp_path: Path) -> Path:
    for (group, seed), values in MAP50.items():
        write_run(tmp_path / "runs", f"{group}-s{seed}", seed, values, group)
    return tmp_path / "runs"


# -- loading --------------------------------------------------------------------------------
def test_tidy_frame_axes(runs_root):
    run = load_run(runs_root / "base-s0" / "version_0")
    assert run.group == "base" and run.seed == 0 and run.name == "base-s0"
    val = run.series("val/map_50")
    assert val["steps"].tolist() == [10, 20, 30, 40]
    assert val["epoch"].tolist() == [1.0, 2.0, 3.0, 4.0]
    assert val["wall_s"].tolist() == [20.0, 40.0, 60.0, 80.0]
    assert val["value"].tolist() == [0.1, 0.3, 0.5, 0.7]
    loss = run.series("train/loss")
    assert loss["step"].tolist() == list(range(40))
    assert "time/wall_s" not in run.metrics and "lr-AdamW/detector" in run.metrics


def test_repeated_steps_keep_the_later_value(tmp_path):
    d = write_run(tmp_path, "r-s0", 0, [0.1, 0.2], "r", repeat_from=13)
    loss = load_run(d).series("train/loss")
    assert loss["step"].tolist() == list(range(20))  # no repeats
    assert loss["value"].tolist() == pytest.approx([10.0 / (s + 1) for s in range(20)])


def test_steps_per_epoch_from_boundaries_and_single_validation():
    # Logged every 5 steps, 12 steps per epoch, epoch 0 -> 1 boundary seen: last logged step 9
    # (+1 = 10) underestimates within log_every_n_steps; with a validation row at step 11 exact.
    wide = pd.DataFrame({"step": [4, 9, 14, 19], "epoch": [0, 0, 1, 1], "train/loss": 1.0})
    assert steps_per_epoch(wide) == 10.0
    with_val = pd.concat([wide, pd.DataFrame({"step": [11], "epoch": [0], "val/map": [0.1]})])
    assert steps_per_epoch(with_val) == 12.0
    # One epoch only: known from a single validation at its last step; unknown mid-epoch.
    one = pd.DataFrame({"step": [0, 1, 2, 2], "epoch": 0, "train/loss": [1, 1, 1, None]})
    one["val/map"] = [None, None, None, 0.5]
    assert steps_per_epoch(one) == 3.0
    assert steps_per_epoch(one.iloc[:3].drop(columns="val/map")) is None
    assert tidy_metrics(one.iloc[:3])["epoch"].isna().all()


def test_find_run_dirs_takes_latest_version_and_walks_parents(tmp_path):
    write_run(tmp_path, "a-s0", 0, [0.1], "a", version=0)
    newest = write_run(tmp_path, "a-s0", 0, [0.2], "a", version=3)
    other = write_run(tmp_path / "nested", "b-s1", 1, [0.1], "b")
    (tmp_path / "comparison").mkdir()
    assert find_run_dirs(tmp_path / "a-s0") == [newest]
    assert find_run_dirs(newest) == [newest]
    assert find_run_dirs(tmp_path) == [newest, other]
    # the same run given twice is loaded once; equal names are told apart
    write_run(tmp_path / "other", "a-s0", 0, [0.1], "a")
    runs = load_runs([tmp_path / "a-s0", newest, tmp_path / "other"])
    assert [r.name for r in runs] == ["a-s0/version_3", "a-s0/version_0"]


# -- grouping -------------------------------------------------------------------------------
def test_grouping_by_run_group_then_by_config_without_seed(tmp_path):
    write_run(tmp_path, "x-s0", 0, [0.1], group="x")
    write_run(tmp_path, "x-s1", 1, [0.1], group="x")
    write_run(tmp_path, "free_seed1", 1, [0.1], group=None)
    write_run(tmp_path, "free_seed2", 2, [0.1], group=None)
    write_run(tmp_path, "free_seed3", 3, [0.1], group=None, lr=1e-3)  # another config
    groups = group_runs(load_runs([tmp_path]))
    named = {g: sorted(r.seed for r in rs) for g, rs in groups.items()}
    assert named["x"] == [0, 1]
    assert sorted(named.values()) == [[0, 1], [1, 2], [3]]
    free = [g for g in named if g.startswith("free")]
    assert len(free) == 2 and all("@" in g for g in free)  # same name stem, two configs
    assert strip_seed("dn_detr-dn_on-crowded-s12") == "dn_detr-dn_on-crowded"


def test_group_notes_flag_mixed_configs(tmp_path):
    write_run(tmp_path, "g-s0", 0, [0.1], group="g")
    write_run(tmp_path, "g-s1", 1, [0.1], group="g", lr=5e-4)
    notes = compare_mod.group_notes(group_runs(load_runs([tmp_path])))
    assert len(notes) == 1 and "model.init_args.lr" in notes[0]


# -- the table ------------------------------------------------------------------------------
def test_known_table(runs_root, tmp_path):
    out = tmp_path / "cmp"
    result = compare_mod.compare(
        [runs_root], out, baseline="base", thresholds=[0.3, 0.6], metric="val/map_50"
    )
    table = result.table.set_index("group")
    assert list(table.index) == ["base", "fast"]
    assert table.loc["base", "n_seeds"] == 2 and table.loc["fast", "n_seeds"] == 3
    assert table.loc["fast", "seeds"] == "0,1,2"

    assert table.loc["base", "steps_to_0.3"] == 25 and table.loc["base", "reached_0.3"] == 2
    assert table.loc["base", "steps_to_0.6"] == 40 and table.loc["base", "reached_0.6"] == 2
    assert table.loc["fast", "steps_to_0.3"] == 15 and table.loc["fast", "reached_0.3"] == 2
    assert table.loc["fast", "steps_to_0.6"] == 25 and table.loc["fast", "reached_0.6"] == 2
    assert table.loc["base", "epochs_to_0.3"] == 2.5 and table.loc["fast", "epochs_to_0.6"] == 2.5
    assert table.loc["base", "wall_s_to_0.6"] == 80 and table.loc["fast", "wall_s_to_0.3"] == 30
    assert table.loc["base", "speedup_0.3"] == 1.0
    assert table.loc["fast", "speedup_0.3"] == pytest.approx(25 / 15)
    assert table.loc["fast", "speedup_0.6"] == pytest.approx(40 / 25)

    # best / final map_50 and map (= map_50 / 2): mean and sample std over seeds
    assert table.loc["base", "best_map_50_mean"] == pytest.approx((0.7 + 0.65) / 2)
    assert table.loc["base", "best_map_50_std"] == pytest.approx(0.05 / math.sqrt(2))
    assert table.loc["fast", "final_map_50_mean"] == pytest.approx((0.8 + 0.7 + 0.28) / 3)
    assert table.loc["fast", "final_map_50_std"] == pytest.approx(np.std([0.8, 0.7, 0.28], ddof=1))
    assert table.loc["base", "best_map_mean"] == pytest.approx(0.3375)
    assert table.loc["fast", "best_map_std"] == pytest.approx(np.std([0.4, 0.35, 0.14], ddof=1))

    per_run = result.per_run.set_index("run")
    assert per_run.loc["fast-s2", "steps_to_0.3"] != per_run.loc["fast-s2", "steps_to_0.3"]  # NaN
    assert per_run.loc["base-s1", "steps_to_0.3"] == 30

    # files: tables and the images
    written = pd.read_csv(out / "summary.csv").set_index("group")
    assert written.loc["fast", "steps_to_0.3"] == 15
    assert written.loc["fast", "speedup_0.6"] == pytest.approx(1.6)
    assert len(pd.read_csv(out / "runs.csv")) == 5
    md = (out / "summary.md").read_text()
    assert "| fast | 0.3 | 2/3 | 15 | 1.50 | 30s | 1.67× |" in md
    assert "| base | 2 (0,1) | 0.338 ± 0.018 |" in md
    for name in ["overview", "train__loss", "train__loss_bbox", "val__map", "val__map_50"]:
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert not (out / "lr-AdamW__detector.png").exists()


def test_one_seed_has_no_std_and_baseline_must_exist(tmp_path):
    write_run(tmp_path, "solo-s0", 0, [0.5], group="solo")
    result = compare_mod.compare([tmp_path], None, thresholds=[0.4])
    row = result.table.iloc[0]
    assert row["best_map_50_mean"] == 0.5 and math.isnan(row["best_map_50_std"])
    assert "| solo | 1 (0) | 0.250 | 0.250 | 0.500 | 0.500 |" in result.markdown
    with pytest.raises(ValueError, match="baseline"):
        compare_mod.compare([tmp_path], None, baseline="nope")


def test_mean_std_and_first_reach():
    assert mean_std([1.0, 3.0, float("nan")]) == (2.0, pytest.approx(math.sqrt(2)))
    s = pd.DataFrame({"step": [3, 1, 2], "steps": [4, 2, 3], "value": [0.9, 0.1, 0.5]})
    assert first_reach(s, 0.5)["steps"] == 3 and first_reach(s, 0.95) is None


def test_wandb_history_rows_to_frame():
    rows = [
        {"trainer/global_step": 0, "epoch": 0, "train/loss": 2.0, "_step": 0, "_runtime": 1.0},
        {"trainer/global_step": 1, "epoch": 0, "train/loss": 1.0, "_step": 1},
        {"trainer/global_step": 1, "epoch": 0, "val/map": 0.25, "_step": 2},
        {"_step": 3, "note": "no step: skipped"},
    ]
    frame = history_to_frame(rows)
    assert sorted(frame["metric"].unique()) == ["train/loss", "val/map"]
    assert frame.loc[frame["metric"] == "val/map", "steps"].tolist() == [2]
    assert frame.loc[frame["metric"] == "val/map", "epoch"].tolist() == [1.0]


@pytest.mark.slow
def test_offline_wandb_run_reads_without_network(tmp_path):
    script = (
        "import wandb\n"
        f"run = wandb.init(mode='offline', dir={str(tmp_path)!r}, project='p', group='g1', "
        "name='x-seed3', config={'lr': 0.001})\n"
        "for s in range(3):\n"
        "    run.log({'train/loss': 1.0 / (s + 1), 'trainer/global_step': s, 'epoch': 0})\n"
        "run.log({'val/map': 0.3, 'trainer/global_step': 2, 'epoch': 0})\n"
        "run.finish()\n"
    )
    env = {**os.environ, "WANDB_SILENT": "true", "WANDB_MODE": "offline"}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    (offline,) = (tmp_path / "wandb").glob("offline-run-*")
    runs = load_runs([offline])
    assert len(runs) == 1
    run = runs[0]
    assert (run.name, run.group, run.seed, run.source) == ("x-seed3", "g1", 3, "wandb-offline")
    assert run.config["lr"] == 0.001
    assert run.series("train/loss")["value"].tolist() == pytest.approx([1.0, 0.5, 1 / 3])
    assert run.series("val/map")["steps"].tolist() == [3]


def test_cli_entry_writes_default_out(runs_root, capsys):
    compare_mod.main([str(runs_root), "--thresholds", "0.3", "--no-plots", "--baseline", "fast"])
    assert (runs_root / "comparison" / "summary.md").is_file()
    assert "5 runs in 2 groups" in capsys.readouterr().out
    # the comparison folder is not mistaken for a run on the next call
    assert len(load_runs([runs_root])) == 5
