"""bf16 where the CPU computes it natively, fp32 (with one log line) where it does not."""

from __future__ import annotations

import logging

import pytest
import yaml

import detr_lineage.precision as precision
from detr_lineage.cli import DetrLineageCLI, main
from detr_lineage.precision import resolve_precision

from .test_cli import ROOT, TINY


@pytest.mark.parametrize("native", [True, False])
def test_resolve_precision(monkeypatch, caplog, native: bool) -> None:
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    with caplog.at_level(logging.WARNING, logger="detr_lineage.precision"):
        assert resolve_precision("bf16-mixed", "cpu") == ("bf16-mixed" if native else "32-true")
        assert resolve_precision("32-true", "cpu") == "32-true"
        assert resolve_precision("16-mixed", "cpu") == "16-mixed"
        assert resolve_precision("bf16-mixed", "gpu") == "bf16-mixed"  # not the CPU's business
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == (0 if native else 1)
    if not native:
        assert "no native bf16" in messages[0] and "32-true" in messages[0]


def test_cpu_detection_reads_torch(monkeypatch) -> None:
    monkeypatch.setattr(precision.torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(precision.torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not precision.cpu_has_native_bf16()
    monkeypatch.setattr(precision.torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert precision.cpu_has_native_bf16()


@pytest.mark.parametrize("config", ["detr", "dn_detr", "rtdetr_v2"])
def test_toy_configs_ask_for_bf16(config: str) -> None:
    cfg = yaml.safe_load((ROOT / f"experiments/toy/{config}.yaml").read_text())
    assert cfg["trainer"]["precision"] == "bf16-mixed"


@pytest.mark.parametrize("native", [True, False])
def test_toy_fit_falls_back_to_fp32_without_bf16(tmp_path, monkeypatch, caplog, native) -> None:
    """The toy config on a CPU without bf16 trains in fp32 and says so once; with bf16 it
    trains under bf16 autocast."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    trainers = []
    original = DetrLineageCLI.instantiate_trainer

    def keep(self, **kwargs):
        trainers.append(original(self, **kwargs))
        return trainers[-1]

    monkeypatch.setattr(DetrLineageCLI, "instantiate_trainer", keep)
    args = ["fit", "--config", str(ROOT / "experiments/toy/detr.yaml"), *TINY]
    args += ["--trainer.max_steps=1", "--trainer.limit_val_batches=0", f"--run.dir={tmp_path}"]
    args += ["--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu"]
    with caplog.at_level(logging.WARNING, logger="detr_lineage.precision"):
        main(args)
    (trainer,) = trainers
    assert trainer.global_step == 1
    assert trainer.precision == ("bf16-mixed" if native else "32-true")
    fallback = [r for r in caplog.records if "no native bf16" in r.getMessage()]
    assert len(fallback) == (0 if native else 1)
