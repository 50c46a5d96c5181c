"""The notebooks execute top to bottom on the tiny ablation (trained once, shared by all three)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_notebooks_are_committed_without_outputs():
    assert {p.name for p in NOTEBOOKS} >= {
        "compare_convergence.ipynb",
        "inspect_predictions.ipynb",
        "query_specialization.ipynb",
    }
    for path in NOTEBOOKS:
        cells = json.loads(path.read_text())["cells"]
        code = [c for c in cells if c["cell_type"] == "code"]
        assert all(not c["outputs"] and c["execution_count"] is None for c in code), path.name


@pytest.mark.slow
def test_notebooks_execute(tmp_path, monkeypatch):
    """One test for the three, so that under ``pytest -n 2`` the runs are trained once."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    runs = tmp_path / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    spec = "experiments/ablations/tiny.yaml"
    cmd = [sys.executable, "-m", "detr_lineage", "ablate", spec, "--out", str(runs)]
    res = subprocess.run(
        [*cmd, "--no-compare"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    monkeypatch.setenv("DETR_LINEAGE_RUNS", str(runs))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        client = nbclient.NotebookClient(
            nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
        )
        client.execute()  # raises CellExecutionError, naming the cell, on any error
        images = [
            o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})
        ]
        assert images, f"{path.name} drew nothing"
