"""``detr-lineage``: LightningCLI (fit / validate / test / predict) plus the project's own commands.

Every run writes to ``<run.dir>/<run.name>/version_<n>/``: ``metrics.csv`` (CSVLogger, always),
``checkpoints/`` (best ``val/map`` and ``last.ckpt``), ``config.yaml`` and, unless disabled, an
offline W&B run (``WANDB_MODE=online`` to sync live). ``--ckpt_path`` resumes the run in the
checkpoint's own version directory, so its curves continue in the same ``metrics.csv``.
"""

from __future__ import annotations

import csv
import os
import re
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from .lit import DetectionModule


@dataclass
class RunConfig:
    """Where a run is written and how it is named, grouped and tagged (CSV and W&B alike).

    name: run name (default: the model class); group: runs that differ only by seed share it;
    tags: free labels (variant, denoising on/off, ...); dir: root of all runs;
    version: fixed version number (default: next free one, or the resumed checkpoint's);
    wandb: also log to W&B (offline unless ``WANDB_MODE=online``).
    """

    name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    dir: str = "runs"
    version: int | None = None
    wandb: bool = True


def version_of_checkpoint(ckpt_path: str | None) -> int | None:
    """``.../version_3/checkpoints/last.ckpt`` -> 3, so a resumed run continues its own logs."""
    if not ckpt_path:
        return None
    match = re.search(r"version_(\d+)", str(Path(ckpt_path).resolve()))
    return int(match.group(1)) if match else None


class ContinuingCSVWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing ``metrics.csv``; on resume this one keeps the
    rows logged before the checkpoint's step (and drops any after it, so nothing repeats)."""

    def __init__(self, log_dir: str, resume_step: int | None) -> None:
        super().__init__(log_dir)
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        if resume_step is None:  # a new run in an existing directory starts a new file
            path.unlink()
            return
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            keys = list(reader.fieldnames or [])
            rows = [r for r in reader if r.get("step") and int(float(r["step"])) < resume_step]
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics_keys = keys

    def _check_log_dir_exists(self) -> None:  # the parent's version deletes metrics.csv
        pass


class ContinuingCSVLogger(CSVLogger):
    """CSVLogger whose curves continue across ``--ckpt_path`` resumes."""

    def __init__(self, *args, resume_step: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ContinuingCSVWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ContinuingCSVWriter(self.log_dir, self._resume_step)
        return self._experiment


def make_loggers(
    run: RunConfig, model_name: str, ckpt_path: str | None, seed: int | None
) -> list[Logger]:
    name = run.name or model_name
    version = run.version if run.version is not None else version_of_checkpoint(ckpt_path)
    resume_step = None
    if ckpt_path:
        resume_step = int(torch.load(ckpt_path, map_location="cpu", mmap=True)["global_step"])
    csv_logger = ContinuingCSVLogger(
        run.dir, name=name, version=version, resume_step=resume_step, flush_logs_every_n_steps=1
    )
    loggers: list[Logger] = [csv_logger]
    if run.wandb and os.environ.get("WANDB_MODE") != "disabled":
        from lightning.pytorch.loggers import WandbLogger

        log_dir = Path(csv_logger.log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        id_file = log_dir / "wandb_id.txt"
        if not id_file.exists():  # a W&B sweep agent chooses the id itself
            id_file.write_text(os.environ.get("WANDB_RUN_ID") or uuid.uuid4().hex[:12])
        loggers.append(
            WandbLogger(
                project=os.environ.get("WANDB_PROJECT", "detr-lineage"),
                name=name if seed is None else f"{name}-seed{seed}",
                group=run.group or name,
                tags=list(run.tags),
                save_dir=str(log_dir),
                id=id_file.read_text().strip(),
                resume="allow",
            )
        )
    return loggers


class DetrLineageCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_class_arguments(RunConfig, "run")

    def instantiate_trainer(self, **kwargs) -> Trainer:
        config = self.config[self.subcommand] if self.subcommand else self.config
        config_init = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer_cfg = config_init.get("trainer", {})
        run = RunConfig(**{k: v for k, v in config["run"].items()})
        run.tags = list(run.tags or [])
        model_name = type(config_init["model"]).__name__.lower()
        has_logger = trainer_cfg.get("logger") in (None, True)
        if has_logger and not trainer_cfg.get("fast_dev_run"):
            kwargs["logger"] = make_loggers(
                run, model_name, config.get("ckpt_path"), config.get("seed_everything")
            )
        callbacks = list(trainer_cfg.get("callbacks") or [])
        checkpointing = trainer_cfg.get("enable_checkpointing") is not False
        if checkpointing and not any(isinstance(c, ModelCheckpoint) for c in callbacks):
            callbacks.append(
                ModelCheckpoint(
                    monitor="val/map",
                    mode="max",
                    save_last=True,
                    filename="best-{epoch}-{step}",
                    auto_insert_metric_name=False,
                )
            )
        if has_logger and not any(isinstance(c, LearningRateMonitor) for c in callbacks):
            callbacks.append(LearningRateMonitor(logging_interval="step"))
        kwargs["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)


EXTRA_COMMANDS = {
    "toy-to-coco": "detr_lineage.data.toy_to_coco",
    "compare": "detr_lineage.analysis.compare",
    "ablate": "detr_lineage.analysis.ablate",
}


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``detr-lineage`` and ``python -m detr_lineage``."""
    args = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    if args and args[0] in EXTRA_COMMANDS:
        import importlib

        importlib.import_module(EXTRA_COMMANDS[args[0]]).main(args[1:])
        return
    DetrLineageCLI(
        DetectionModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=argv,  # None: sys.argv
        auto_configure_optimizers=False,
    )


if __name__ == "__main__":
    main()
