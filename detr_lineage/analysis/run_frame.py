"""A run's metrics in one tidy long frame, and the ``Run`` that holds them (``runs.py`` reads
runs from disk or W&B, ``wandb_io.py`` from W&B; both build on this module)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

WALL_METRIC = "time/wall_s"
FRAME_COLUMNS = ["metric", "step", "steps", "epoch", "wall_s", "value"]


@dataclass
class Run:
    """One run: where it came from, how it is grouped, and its metrics (see module docstring)."""

    name: str
    path: str
    frame: pd.DataFrame
    config: dict[str, Any] = field(default_factory=dict)
    group: str | None = None  # run.group (CLI) or W&B group; None = group by config
    seed: int | None = None
    tags: list[str] = field(default_factory=list)
    source: str = "csv"

    @property
    def metrics(self) -> list[str]:
        return sorted(self.frame["metric"].unique())

    def series(self, metric: str) -> pd.DataFrame:
        """Rows of one metric, in step order."""
        rows = self.frame[self.frame["metric"] == metric]
        return rows.sort_values("step", kind="stable").reset_index(drop=True)


# -- tidy metrics ----------------------------------------------------------------------------
def steps_per_epoch(wide: pd.DataFrame) -> float | None:
    """Optimiser steps per epoch, read from the epoch boundaries in a wide log.

    An epoch ``e`` is known to be complete when a later epoch was logged, or when it has a single
    validation, at its last logged step (validation at the epoch's end); then its last logged
    step + 1 is its end. The latest complete epoch gives ``(last step + 1) / (e + 1)``: exact
    when the log has a row at each epoch's end (validation rows do), within
    ``log_every_n_steps`` else.
    """
    if "epoch" not in wide or "step" not in wide:
        return None
    rows = wide.dropna(subset=["epoch", "step"])
    if rows.empty:
        return None
    epochs = rows["epoch"].astype(int)
    last_step = rows.groupby(epochs)["step"].max()
    val_cols = [c for c in rows.columns if str(c).startswith("val/")]
    seen = set(last_step.index)
    for e in sorted(seen, reverse=True):
        complete = (e + 1) in seen
        if not complete and val_cols:  # one validation, at the epoch's last step: its end
            in_epoch = rows[epochs == e]
            val_steps = in_epoch.loc[in_epoch[val_cols].notna().any(axis=1), "step"].unique()
            complete = len(val_steps) == 1 and val_steps[0] == last_step[e]
        if complete:
            return (float(last_step[e]) + 1.0) / (e + 1)
    return None


def tidy_metrics(wide: pd.DataFrame) -> pd.DataFrame:
    """A wide log (one column per metric, ``step``, optional ``epoch``) -> long frame."""
    if "step" not in wide:
        raise ValueError("a metrics log needs a 'step' column")
    wide = wide.reset_index(drop=True)
    value_cols = [c for c in wide.columns if c not in ("step", "epoch")]
    long = wide[["step", *value_cols]].melt(
        id_vars="step", var_name="metric", value_name="value", ignore_index=False
    )
    long = long.dropna(subset=["value", "step"])
    long["order"] = long.index
    long = long.sort_values(["metric", "order"], kind="stable")
    long = long.drop_duplicates(["metric", "step"], keep="last")  # resumed runs: keep the later
    long["step"] = long["step"].astype(np.int64)
    long["value"] = long["value"].astype(float)
    long["steps"] = long["step"] + 1
    spe = steps_per_epoch(wide)
    long["epoch"] = long["steps"] / spe if spe else np.nan
    wall = long[long["metric"] == WALL_METRIC].sort_values("step")
    if len(wall):
        long["wall_s"] = np.interp(long["step"], wall["step"], wall["value"])
    else:
        long["wall_s"] = np.nan
    long = long[long["metric"] != WALL_METRIC]
    long = long.sort_values(["metric", "step"], kind="stable").reset_index(drop=True)
    return long[FRAME_COLUMNS]


def read_metrics_csv(path: str | Path) -> pd.DataFrame:
    """A Lightning ``metrics.csv`` -> long frame (``tidy_metrics``)."""
    return tidy_metrics(pd.read_csv(path))
