"""Read training runs into one tidy shape: Lightning CSV logs first, W&B (offline file or API) else.

Every run becomes a ``Run`` whose ``frame`` is long-form, one row per logged value::

    metric  step  steps  epoch  wall_s  value

``step`` is the logger's step (0-based, as in ``metrics.csv`` and W&B's ``trainer/global_step``),
``steps = step + 1`` the optimiser steps done when the value was logged (a validation after the
first 100 batches reads 100, not 99), ``epoch = steps / steps_per_epoch`` (fractional, so the
epoch axis is as smooth as the step axis) and ``wall_s`` the run's wall-clock seconds at that
step (``time/wall_s``, continued across resumes, interpolated between logged points). A value
logged twice at one step (a resumed run that repeated a few steps) keeps the later one.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from .run_frame import (  # noqa: F401  (re-exported: the analysis modules read them here)
    FRAME_COLUMNS,
    WALL_METRIC,
    Run,
    read_metrics_csv,
    steps_per_epoch,
    tidy_metrics,
)

METRICS_FILE = "metrics.csv"
CONFIG_FILE = "config.yaml"
VERSION_RE = re.compile(r"^version_(\d+)$")
WANDB_PATH_RE = re.compile(r"^[\w.-]+/[\w.-]+/[\w-]+$")
SEED_SUFFIX_RE = re.compile(r"[-_.]?(?:s|seed)\d+$")
#: config keys that say where/how a run was written, not what was trained (ignored for grouping)
NON_EXPERIMENT_KEYS = ("seed_everything", "run.name", "run.version", "run.dir", "run.tags")
NON_EXPERIMENT_PREFIXES = ("ckpt_path", "run.wandb")


# -- configs and grouping ---------------------------------------------------------------------
def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists stay values)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def experiment_config(config: dict[str, Any]) -> dict[str, Any]:
    """The flat config minus what only names, places or seeds a run (what grouping compares)."""
    return {
        k: v
        for k, v in flatten(config).items()
        if k not in NON_EXPERIMENT_KEYS and not k.startswith(NON_EXPERIMENT_PREFIXES)
    }


def config_key(config: dict[str, Any]) -> str:
    """Short stable hash of ``experiment_config``: equal for runs that differ only by seed."""
    text = json.dumps(experiment_config(config), sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def config_differences(runs: Sequence[Run]) -> list[str]:
    """Experiment keys whose values differ between the runs (a group should have none)."""
    flats = [experiment_config(r.config) for r in runs if r.config]
    keys = sorted(set().union(*flats)) if flats else []
    return [k for k in keys if len({json.dumps(f.get(k), default=str) for f in flats}) > 1]


def strip_seed(name: str) -> str:
    """``dn_detr-dn_on-s1`` -> ``dn_detr-dn_on`` (also ``-seed1``, ``_s1``)."""
    return SEED_SUFFIX_RE.sub("", name) or name


def group_runs(runs: Iterable[Run]) -> dict[str, list[Run]]:
    """Runs that differ only by seed share a group, in order of first appearance.

    The group is ``run.group`` when it was set (the CLI and the ablation runner set it), else
    runs with equal ``experiment_config`` (the config without seed, name, version, directory,
    tags and checkpoint path) are grouped under their name without its seed suffix.
    """
    runs = list(runs)
    keys: list[str] = []
    for run in runs:
        keys.append(f"group:{run.group}" if run.group else f"config:{config_key(run.config)}")
    labels: dict[str, str] = {}
    for run, key in zip(runs, keys):
        if key not in labels:
            labels[key] = run.group if run.group else strip_seed(run.name)
    counts: dict[str, int] = {}
    for label in labels.values():
        counts[label] = counts.get(label, 0) + 1
    for key, label in labels.items():  # two configs, one name: tell them apart
        if counts[label] > 1 and key.startswith("config:"):
            labels[key] = f"{label}@{key.split(':', 1)[1]}"
    groups: dict[str, list[Run]] = {}
    for run, key in zip(runs, keys):
        groups.setdefault(labels[key], []).append(run)
    return groups


# -- finding and loading runs -----------------------------------------------------------------
def _latest_version(path: Path) -> Path | None:
    versions = []
    for child in path.iterdir():
        match = VERSION_RE.match(child.name)
        if match and child.is_dir() and _has_log(child):
            versions.append((int(match.group(1)), child))
    return max(versions)[1] if versions else None


def _wandb_files(path: Path) -> list[Path]:
    if path.is_file() and path.suffix == ".wandb":
        return [path]
    if not path.is_dir():
        return []
    direct = sorted(path.glob("*.wandb"))
    return direct or sorted(path.glob("wandb/*run-*/*.wandb"))


def _has_log(path: Path) -> bool:
    return (path / METRICS_FILE).is_file() or bool(_wandb_files(path))


def is_run_dir(path: str | Path) -> bool:
    """A directory with a run's own log (a version dir), not a folder of runs."""
    path = Path(path)
    return (path / METRICS_FILE).is_file() or bool(list(path.glob("*.wandb")))


def find_run_dirs(path: str | Path, max_depth: int = 4) -> list[Path]:
    """A version dir, a run-name dir (its latest version) or a parent of many runs -> run dirs.

    A run dir holds ``metrics.csv`` (or only an offline W&B run). Below a parent directory,
    children are searched in name order, up to ``max_depth`` levels.
    """
    path = Path(path)
    if path.is_file() or (path / METRICS_FILE).is_file() or list(path.glob("*.wandb")):
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such run directory")
    latest = _latest_version(path)
    if latest is not None:
        return [latest]
    if _wandb_files(path):
        return [path]
    found: list[Path] = []
    if max_depth > 0:
        for child in sorted(p for p in path.iterdir() if p.is_dir()):
            if child.name in ("checkpoints", "wandb", "comparison"):
                continue
            found += find_run_dirs(child, max_depth - 1)
    return found


def _read_config(path: Path) -> dict[str, Any]:
    file = path / CONFIG_FILE
    if not file.is_file():
        return {}
    with open(file) as f:
        return yaml.safe_load(f) or {}


def _seed_from_name(name: str) -> int | None:
    match = re.search(r"(?:seed|-s|_s)(\d+)$", name)
    return int(match.group(1)) if match else None


def load_run(path: str | Path) -> Run:
    """One run directory (``.../<name>/version_<n>/``) -> ``Run`` (CSV, or offline W&B if none)."""
    path = Path(path)
    if path.is_dir() and (path / METRICS_FILE).is_file():
        config = _read_config(path)
        run_cfg = config.get("run") or {}
        name = run_cfg.get("name") or (path.parent.name if VERSION_RE.match(path.name) else None)
        name = name or path.name
        seed = config.get("seed_everything")
        return Run(
            name=str(name),
            path=str(path),
            frame=read_metrics_csv(path / METRICS_FILE),
            config=config,
            group=run_cfg.get("group"),
            seed=int(seed) if seed is not None else _seed_from_name(str(name)),
            tags=[str(t) for t in run_cfg.get("tags") or []],
        )
    files = _wandb_files(path)
    if not files:
        raise FileNotFoundError(f"{path}: neither {METRICS_FILE} nor an offline W&B run")
    from .wandb_io import load_wandb_file

    return load_wandb_file(files[-1])


def is_wandb_path(source: str) -> bool:
    """``entity/project/run_id`` that is not a local path."""
    return bool(WANDB_PATH_RE.match(source)) and not Path(source).exists()


def load_runs(
    sources: Sequence[str | Path],
    wandb_group: str | None = None,
    wandb_project: str | None = None,
) -> list[Run]:
    """Local run/parent dirs and W&B run paths -> runs (each local run dir once, in order).

    Two runs with one name (two versions, or equal names under different parents) are told
    apart by their version directory / parent.
    """
    runs: list[Run] = []
    seen: set[Path] = set()
    for source in sources:
        if is_wandb_path(str(source)):
            from .wandb_io import load_wandb_api_run

            runs.append(load_wandb_api_run(str(source)))
            continue
        for run_dir in find_run_dirs(source):
            resolved = run_dir.resolve()
            if resolved not in seen:
                seen.add(resolved)
                runs.append(load_run(run_dir))
    if wandb_group:
        from .wandb_io import load_wandb_group

        runs += load_wandb_group(wandb_group, wandb_project)
    names: dict[str, int] = {}
    for run in runs:
        names[run.name] = names.get(run.name, 0) + 1
    for run in runs:
        if names[run.name] > 1:
            run.name = f"{run.name}/{Path(run.path).name}"
    return runs
