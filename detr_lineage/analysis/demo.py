"""Runs for the notebooks to look at: ``$DETR_LINEAGE_RUNS``, else a tiny ablation trained now.

``DETR_LINEAGE_RUNS=runs/toy_main jupyter lab`` shows the main job; without it a notebook trains
``experiments/ablations/tiny.yaml`` (DETR and DN-DETR, a few steps, about a minute on a CPU)
into a temporary folder, so every notebook runs top to bottom on a fresh clone.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import detr_lineage

from .ablate import load_spec, run_spec

ENV_VAR = "DETR_LINEAGE_RUNS"
REPO = Path(detr_lineage.__file__).resolve().parents[1]
TINY_SPEC = REPO / "experiments" / "ablations" / "tiny.yaml"


def runs_dir(env_var: str = ENV_VAR, spec: str | Path = TINY_SPEC) -> Path:
    """``$DETR_LINEAGE_RUNS`` if set, else the runs of ``spec`` trained into a temporary folder."""
    given = os.environ.get(env_var)
    if given:
        path = Path(given)
        if not path.exists():
            raise FileNotFoundError(f"${env_var}={given} does not exist")
        return path
    out = Path(tempfile.mkdtemp(prefix="detr_lineage_demo_"))
    print(f"${env_var} is not set: training {Path(spec).name} into {out} (about a minute)")
    env = {"WANDB_MODE": "disabled", **os.environ}  # throwaway runs: no W&B unless asked
    _, failed = run_spec(load_spec(spec, root=REPO), out, compare_runs=False, env=env)
    if failed:
        raise RuntimeError(f"demo runs failed: {', '.join(failed)}")
    return out
