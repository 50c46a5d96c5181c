"""Resuming interrupted runs: frequent, atomic checkpoints and finding the newest one.

``ResumeCheckpoint`` writes ``checkpoints/resume.ckpt`` every ``every_n_steps`` optimiser steps
(to a temporary file, then renamed: a kill never leaves a half-written checkpoint). It is a
plain ``Callback``, not a ``ModelCheckpoint``, so the CLI still adds its default best/last ones.
The CLI's ``--ckpt_path`` does the rest: the run continues in its version directory and its
``metrics.csv`` keeps the rows logged before the checkpoint's step (later ones would repeat).
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch

RESUME_NAME = "resume.ckpt"


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
        trainer.save_checkpoint(tmp, weights_only=False)  # full state: resumable
        if trainer.is_global_zero:
            os.replace(tmp, directory / RESUME_NAME)


class SnapshotCheckpoint(L.Callback):
    """Keep ``<log_dir>/checkpoints/step_<n>.ckpt`` after each of ``steps`` optimiser steps
    (the early-step model of the query-specialisation notebook)."""

    def __init__(self, steps: list[int]) -> None:
        if any(s < 1 for s in steps):
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.steps = set(steps)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step not in self.steps or not trainer.loggers:
            return
        path = Path(trainer.loggers[0].log_dir) / "checkpoints" / snapshot_name(step)
        path.parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(path, weights_only=False)


def snapshot_name(step: int) -> str:
    return f"step_{step}.ckpt"


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
