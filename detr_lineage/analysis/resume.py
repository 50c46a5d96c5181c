"""Resuming interrupted runs: frequent atomic checkpoints, and one unbroken ``metrics.csv``.

``ResumeCheckpoint`` writes ``checkpoints/resume.ckpt`` every ``every_n_steps`` optimiser steps
(write to a temporary file, then rename: a kill never leaves a half-written checkpoint). It is a
plain ``Callback``, not a ``ModelCheckpoint``, so the CLI still adds its default best/last ones.

A resumed session logs from the checkpoint's step on, so rows an interrupted session logged
after its last checkpoint would repeat; and Lightning's ``CSVLogger`` deletes an existing
``metrics.csv`` when it reopens a version directory. ``prepare_resume`` / ``finish_resume`` keep
the history whole either way: before resuming from step ``k`` the rows at ``step < k`` are kept
aside, afterwards they are merged with the new session's rows at ``step >= k``.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import lightning as L
import torch

RESUME_NAME = "resume.ckpt"
PREFIX_RE = re.compile(r"^metrics\.before_step_(\d+)\.csv$")


class ResumeCheckpoint(L.Callback):
    """Save ``<log_dir>/checkpoints/resume.ckpt`` every ``every_n_steps`` steps, atomically."""

    def __init__(self, every_n_steps: int = 50) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps or not trainer.loggers:
            return
        directory = Path(trainer.loggers[0].log_dir) / "checkpoints"
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{RESUME_NAME}.tmp"
        trainer.save_checkpoint(tmp)
        if trainer.is_global_zero:
            os.replace(tmp, directory / RESUME_NAME)


def checkpoint_step(path: str | Path) -> int | None:
    """Optimiser steps done in a checkpoint, or None if it cannot be read (e.g. truncated)."""
    for mmap in (True, False):  # mmap: only the small loop state is read from disk
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
            return int(ckpt["global_step"])
        except Exception:
            continue
    return None


def latest_checkpoint(version_dir: str | Path) -> tuple[Path, int] | None:
    """The readable checkpoint with the most steps (``resume.ckpt``, ``last.ckpt``, ...)."""
    directory = Path(version_dir) / "checkpoints"
    preference = {"last.ckpt": 0, RESUME_NAME: 1}  # on ties: saved at the end of a train step
    best: tuple[Path, int] | None = None
    for path in sorted(directory.glob("*.ckpt"), key=lambda p: (preference.get(p.name, 2), p)):
        step = checkpoint_step(path)
        if step is not None and (best is None or step > best[1]):
            best = (path, step)
    return best


def _read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    if not path.is_file():
        return [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _step_of(row: dict[str, str]) -> float | None:
    value = row.get("step")
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


def _write_rows(path: Path, keys: list[str], rows: list[dict[str, str]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, restval="")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def truncate_metrics(csv_path: str | Path, before_step: int) -> int:
    """Keep the rows of a ``metrics.csv`` logged at ``step < before_step``; returns rows dropped.

    The validation that ends an epoch is logged at the epoch's last step (``k - 1`` for a
    checkpoint after ``k`` steps), so it is kept. Values are copied as text, unchanged.
    """
    path = Path(csv_path)
    keys, rows = _read_rows(path)
    kept = [r for r in rows if (_step_of(r) is None or _step_of(r) < before_step)]
    if len(kept) != len(rows):
        _write_rows(path, keys, kept)
    return len(rows) - len(kept)


def merge_metrics(prefix_csv: str | Path, csv_path: str | Path, from_step: int) -> None:
    """``csv_path`` := rows of ``prefix_csv`` at ``step < from_step`` + rows of ``csv_path`` at
    ``step >= from_step`` (whether the resumed logger appended to or replaced the file)."""
    prefix_keys, prefix_rows = _read_rows(Path(prefix_csv))
    keys, rows = _read_rows(Path(csv_path))
    before = [r for r in prefix_rows if (_step_of(r) is None or _step_of(r) < from_step)]
    after = [r for r in rows if _step_of(r) is not None and _step_of(r) >= from_step]
    _write_rows(Path(csv_path), sorted(set(prefix_keys) | set(keys)), before + after)


def finish_resume(version_dir: str | Path) -> None:
    """Merge a kept-aside prefix back into ``metrics.csv`` (after the session, or after a crash
    of the runner itself: it is safe to call at any time)."""
    directory = Path(version_dir)
    for prefix in sorted(directory.glob("metrics.before_step_*.csv")):
        match = PREFIX_RE.match(prefix.name)
        if match:
            merge_metrics(prefix, directory / "metrics.csv", int(match.group(1)))
            prefix.unlink()


def prepare_resume(version_dir: str | Path, step: int) -> int:
    """Before resuming at ``step``: finish any earlier merge, drop the rows logged after the
    checkpoint and keep the history aside for ``finish_resume``. Returns the rows dropped."""
    directory = Path(version_dir)
    finish_resume(directory)
    csv_path = directory / "metrics.csv"
    dropped = truncate_metrics(csv_path, step)
    if csv_path.is_file():
        keys, rows = _read_rows(csv_path)
        _write_rows(directory / f"metrics.before_step_{step}.csv", keys, rows)
    return dropped
