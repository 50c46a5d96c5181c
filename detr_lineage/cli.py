"""``detr-lineage``: LightningCLI (fit / validate / test / predict) plus the project's own commands.

Every run writes to ``<run.dir>/<run.name>/version_<n>/``: ``metrics.csv`` (CSVLogger, always),
``checkpoints/`` (best ``val/map`` and ``last.ckpt``, always the latest state), ``config.yaml``
and, unless disabled, an offline W&B run (``WANDB_MODE=online`` to sync live).
``fit --ckpt_path`` resumes the run in the checkpoint's own version directory, so its curves
continue in the same ``metrics.csv``. ``validate``, ``test`` and ``predict`` write into a new
directory of their own, ``<run.dir>/<run.name>/<stage>_<n>/``, and never touch a training run's
files. Under DDP only rank 0 chooses the directory (the others read it from the environment
its launcher passes on) and only rank 0 logs to W&B.
"""

from __future__ import annotations

import csv
import importlib
import os
import re
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from .lit import DetectionModule
from .lit.base import nest_net_hparams
from .precision import resolve_precision


@dataclass
class RunConfig:
    """Where a run is written and how it is named, grouped and tagged (CSV and W&B alike).

    name: run name (default: the model class); group: runs that differ only by seed share it;
    tags: free labels (variant, denoising on/off, ...); dir: root of all runs;
    version: fixed version number (default: next free one, or the resumed checkpoint's);
    wandb: also log to W&B (offline unless ``WANDB_MODE=online``);
    init_weights: ``fit`` starts from this checkpoint's weights (e.g. ``detr-lineage convert``
        output; class heads of another size are left at init), not from its training state.
    """

    name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    dir: str = "runs"
    version: int | None = None
    wandb: bool = True
    init_weights: str | None = None


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


RUN_VERSION_ENV = "DETR_LINEAGE_RUN_VERSION"  # rank 0's choice, inherited by DDP children


def next_index(parent: Path, prefix: str) -> int:
    """1 + the largest ``n`` of the ``<prefix><n>`` directories in ``parent`` (0 if none)."""
    found = [
        int(m.group(1))
        for p in (parent.iterdir() if parent.is_dir() else [])
        if (m := re.fullmatch(rf"{re.escape(prefix)}(\d+)", p.name))
    ]
    return max(found, default=-1) + 1


def run_version(run: RunConfig, name: str, ckpt_path: str | None, stage: str) -> int | str:
    """The run's directory under ``<run.dir>/<name>``: ``version_<n>`` (an int) for ``fit``,
    ``<stage>_<n>`` (a str) for validate/test/predict. Decided once, on rank 0; DDP processes
    of higher rank take rank 0's choice from the environment so that no stray directory
    appears."""
    if rank_zero_only.rank > 0 and RUN_VERSION_ENV in os.environ:
        value = os.environ[RUN_VERSION_ENV]
        return int(value) if value.isdigit() else value
    parent = Path(run.dir) / name
    version: int | str
    if stage != "fit":
        version = f"{stage}_{next_index(parent, stage + '_')}"
    elif run.version is not None:
        version = run.version
    else:
        resumed = version_of_checkpoint(ckpt_path)
        version = resumed if resumed is not None else next_index(parent, "version_")
    os.environ[RUN_VERSION_ENV] = str(version)
    return version


def make_loggers(
    run: RunConfig,
    model_name: str,
    ckpt_path: str | None,
    seed: int | None,
    stage: str = "fit",
) -> list[Logger]:
    name = run.name or model_name
    version = run_version(run, name, ckpt_path, stage)
    resume_step = None
    if ckpt_path and stage == "fit":
        resume_step = int(torch.load(ckpt_path, map_location="cpu", mmap=True)["global_step"])
    csv_logger = ContinuingCSVLogger(
        run.dir, name=name, version=version, resume_step=resume_step, flush_logs_every_n_steps=1
    )
    loggers: list[Logger] = [csv_logger]
    wandb_on = run.wandb and os.environ.get("WANDB_MODE") != "disabled"
    if wandb_on and rank_zero_only.rank == 0:
        from lightning.pytorch.loggers import WandbLogger

        log_dir = Path(csv_logger.log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        id_file = log_dir / "wandb_id.txt"
        if not id_file.exists():  # a W&B sweep agent chooses the id itself
            id_file.write_text(os.environ.get("WANDB_RUN_ID") or uuid.uuid4().hex[:12])
        run_name = name if seed is None else f"{name}-seed{seed}"
        loggers.append(
            WandbLogger(
                project=os.environ.get("WANDB_PROJECT", "detr-lineage"),
                name=run_name if stage == "fit" else f"{run_name}-{version}",
                group=run.group or name,
                tags=list(run.tags),
                save_dir=str(log_dir),
                id=id_file.read_text().strip(),
                resume="allow",
            )
        )
    return loggers


class LatestCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` is always the latest state.

    Lightning writes ``last.ckpt`` only when a top-k checkpoint is saved: on a plateau (a tie in
    ``val/map`` is no improvement) it stays at the first validation, and a run resumed from it
    silently redoes the steps since. Here it is also written after every validation and at the
    end of training, whatever the monitored metric did.
    """

    def _save_last_if_stale(self, trainer: Trainer) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: Trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        self._save_last_if_stale(trainer)

    def on_train_end(self, trainer: Trainer, pl_module) -> None:
        self._save_last_if_stale(trainer)


class CheckpointMismatchError(ValueError):
    """``--ckpt_path`` names a model other than the one the config and command line describe."""


def _plain(value):
    """Config values as plain Python: Namespaces and dataclasses -> dicts, tuples -> lists."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    elif hasattr(value, "__dataclass_fields__"):
        value = {k: getattr(value, k) for k in value.__dataclass_fields__}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _differences(saved, given, prefix: str = "") -> list[str]:
    """``key: checkpoint value != config value`` for every key both sides set differently."""
    if isinstance(saved, dict) and isinstance(given, dict):
        out = []
        for key in saved.keys() & given.keys():
            out += _differences(saved[key], given[key], f"{prefix}{key}.")
        return sorted(out)
    if saved != given:
        return [f"{prefix.rstrip('.')}: {saved!r} in the checkpoint, {given!r} in the config"]
    return []


def checkpoint_mismatch(hparams: dict, model_config) -> list[str]:
    """How a checkpoint's saved model (``hyper_parameters``) differs from the configured model
    (the ``model`` entry of the parsed config): the variant first, then each argument."""
    hparams = {k: v for k, v in hparams.items() if k != "_instantiator"}
    saved_class = hparams.pop("_class_path", None)
    config = _plain(model_config) or {}
    given_class = config.get("class_path")
    if saved_class and given_class and saved_class != given_class:
        return [f"variant: {saved_class} in the checkpoint, {given_class} in the config"]
    net_config = getattr(_import_class(saved_class or given_class), "net_config", None)
    if net_config is not None and "net" not in hparams:  # saved before `net` existed
        hparams = nest_net_hparams(hparams, net_config)
    return _differences(_plain(hparams), config.get("init_args") or {})


def _import_class(class_path: str | None):
    """``package.module.Class`` -> the class, or None."""
    module_name, _, name = (class_path or "").rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name, None) if module_name else None
    except ImportError:
        return None


_PARSER_NOISE = (
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "Expected a <class 'NoneType'>",
    "Given value",
)


def config_error_cause(message: str) -> str:
    """The cause of a jsonargparse error, with the key path that led to it, on one line:
    ``model > detr_lineage.lit.DETR > num_queries: Expected a <class 'int'>. Got value: abc``."""
    path: list[str] = []
    cause = message.strip().splitlines()[-1].strip() if message.strip() else message
    for line in message.splitlines():
        text = line.strip().removeprefix("- ").strip()
        if key := re.fullmatch(r'Parser key "([^"]+)":', text):
            path.append(key.group(1))
        elif class_path := re.fullmatch(r"Problem with given class_path '([^']+)':", text):
            path.append(class_path.group(1))
        elif text and not text.startswith(_PARSER_NOISE):
            cause = text
    return " > ".join(path) + (": " if path else "") + cause


class DetrLineageParser(LightningArgumentParser):
    """jsonargparse prints the usage (60+ lines) and then a nested report whose last lines are
    the alternatives it also tried; this one ends with the cause as the last line."""

    def error(self, message: str, ex: Exception | None = None):
        try:
            super().error(message, ex)
        except SystemExit:
            sys.stderr.write(f"error: {config_error_cause(message)}\n")
            raise


class ConfigError(ValueError):
    """A model or data module rejected its arguments; the message is the cause alone."""


class DetrLineageCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_class_arguments(RunConfig, "run")
        parser.add_argument(
            "--model_from_checkpoint",
            type=bool,
            default=False,
            help="With --ckpt_path: build the checkpoint's model (variant and hyper-parameters), "
            "replacing the config's model. Without it, any difference is an error.",
        )

    def _parse_ckpt_path(self) -> None:
        """Lightning replaces the configured model by the checkpoint's without a word; here a
        difference stops with the list of differences unless ``--model_from_checkpoint``."""
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else None
        ckpt_path = config.get("ckpt_path") if config else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
        if config.get("model_from_checkpoint"):
            hparams = dict(checkpoint.get("hyper_parameters") or {})
            net_config = getattr(_import_class(hparams.get("_class_path")), "net_config", None)
            if net_config is None or "net" in hparams:
                super()._parse_ckpt_path()
                return
            # saved before `net` existed: nest the network's keys, then parse as Lightning does
            hparams = nest_net_hparams({**hparams, "_instantiator": None}, net_config, ckpt_path)
            del hparams["_instantiator"]
            model = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
            self.config = self.parser.parse_object({subcommand: {"model": model}}, self.config)
            return
        differences = checkpoint_mismatch(checkpoint.get("hyper_parameters") or {}, config.model)
        if differences:
            raise CheckpointMismatchError(
                f"{ckpt_path} holds a different model than the config and command line (fix "
                "the config, or pass --model_from_checkpoint=true to use the checkpoint's "
                "model: its values replace the config's):\n  " + "\n  ".join(differences)
            )

    def instantiate_classes(self) -> None:
        """jsonargparse reports a constructor's ``ValueError`` inside a report on every Union
        alternative it tried; re-raise it with the cause as the message (the last line)."""
        try:
            super().instantiate_classes()
        except ValueError as e:
            if "Does not validate against any of the Union subtypes" not in str(e):
                raise
            raise ConfigError(config_error_cause(str(e))) from e

    def before_fit(self) -> None:
        path = self.config["fit"]["run"].get("init_weights")
        if path:
            from .convert import load_initial_weights

            kept = load_initial_weights(self.model, path)
            print(f"initial weights from {path}" + (f"; left at init: {kept}" if kept else ""))

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
                run,
                model_name,
                config.get("ckpt_path"),
                config.get("seed_everything"),
                self.subcommand or "fit",
            )
        callbacks = list(trainer_cfg.get("callbacks") or [])
        checkpointing = trainer_cfg.get("enable_checkpointing") is not False
        if checkpointing and not any(isinstance(c, ModelCheckpoint) for c in callbacks):
            callbacks.append(
                LatestCheckpoint(
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
        if trainer_cfg.get("precision") is not None:  # bf16 only where the CPU has it
            kwargs["precision"] = resolve_precision(
                trainer_cfg["precision"], trainer_cfg.get("accelerator", "auto")
            )
        return super().instantiate_trainer(**kwargs)


EXTRA_COMMANDS = {
    "toy-to-coco": "detr_lineage.data.toy_to_coco",
    "compare": "detr_lineage.analysis.compare",
    "ablate": "detr_lineage.analysis.ablate",
    "explain": "detr_lineage.explain",
    "convert": "detr_lineage.convert",
    "export": "detr_lineage.export",
    "lineage": "detr_lineage.analysis.lineage",
}


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``detr-lineage`` and ``python -m detr_lineage``."""
    args = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    if args[:1] == ["predict"] and any(a.split("=")[0] == "--images" for a in args):
        from .predict import main as predict_main  # on image files; else LightningCLI's

        predict_main(args[1:])
        return
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
        parser_class=DetrLineageParser,
    )


if __name__ == "__main__":
    main()
