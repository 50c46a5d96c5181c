"""Shared by the glue tests: experiment YAMLs read by the real CLI parser, built without running.

``parse`` reads configs exactly as ``detr-lineage fit --config ...`` does (same parser, same
composition of several ``--config``), ``build`` instantiates the module (optionally on the meta
device, for COCO sizes) and the data module, without a trainer.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from unittest import mock

import torch
import yaml
from lightning.pytorch import LightningDataModule

from detr_lineage.cli import DetrLineageCLI
from detr_lineage.lit import DetectionModule, base

ROOT = Path(__file__).resolve().parents[1]
NO_DENOISING = ROOT / "experiments/ablations/no_denoising.yaml"
CLI_CONFIGS = sorted(
    p
    for p in (ROOT / "experiments").rglob("*.yaml")
    if p.parent.name != "ablations"  # ablations/ holds runner specs and one overlay
)


class _ParseOnly(DetrLineageCLI):
    def instantiate_classes(self) -> None:  # parse and validate, build nothing
        pass


def parse(*configs: str | Path, args: tuple[str, ...] = ()):
    """The CLI's parsed ``fit`` namespace of ``--config c1 --config c2 ... args``."""
    argv = [a for c in configs for a in ("--config", str(c))] + list(args)
    with mock.patch.object(sys, "argv", ["detr-lineage"]):  # args only, not pytest's
        cli = _ParseOnly(
            DetectionModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            run=False,
            args=argv,
            auto_configure_optimizers=False,
        )
    return cli.parser, cli.config


def model_class(config) -> type:
    """The LightningModule class of a parsed config, or of a YAML file (read without the
    parser, so that collecting the tests never fails on a bad config)."""
    import importlib

    if isinstance(config, Path):
        class_path = yaml.safe_load(config.read_text())["model"]["class_path"]
    else:
        class_path = config.model.class_path
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def takes_denoising(config) -> bool:
    """Whether ``no_denoising.yaml`` applies: the variant's network has a ``denoising`` field."""
    return "denoising" in {f.name for f in dataclasses.fields(model_class(config).net_config)}


def build(parser, config, meta: bool = False):
    """(LightningModule, LightningDataModule, instantiated trainer namespace) of a config.

    ``meta``: the module's tensors live on the meta device (no memory, no init cost); the
    metric object, which needs real tensors, is left out then.
    """
    model_cfg, data_cfg = config.clone(), config.clone()
    model_cfg.data = None
    data_cfg.model = None
    if meta:
        with torch.device("meta"), mock.patch.object(base, "MeanAveragePrecision", _no_metric):
            built = parser.instantiate_classes(model_cfg)
    else:
        built = parser.instantiate_classes(model_cfg)
    data = parser.instantiate_classes(data_cfg).data
    return built.model, data, built.trainer


def _no_metric(**kwargs):
    return None


def make_module(
    cls: type[DetectionModule], num_classes: int, backbone=None, **flat
) -> DetectionModule:
    """``cls`` from one flat list of arguments: the network's go into ``net`` (its
    ``cls.net_config``), the rest to the module, as for a checkpoint saved flat."""
    flat = {"num_classes": num_classes, "backbone": backbone, **flat}
    return cls(**base.nest_net_hparams(flat, cls.net_config))
