"""Checkpoints written before the ``net`` argument (network hyper-parameters flat beside the
module's) still load, and the CLI's checkpoint-vs-config check still compares them."""

from __future__ import annotations

import dataclasses

import lightning
import pytest
import torch

from detr_lineage.cli import _plain, checkpoint_mismatch
from detr_lineage.denoising import DenoisingConfig
from detr_lineage.lit import DETR, DNDETR, RTDETRv2, load_detector
from detr_lineage.nn.backbone import BackboneConfig
from tests.helpers import make_module

CONV = BackboneConfig("conv", channels=[8, 8, 8, 8], return_strides=[16])
FLAT = {
    DETR: dict(backbone=CONV, d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=1,
               dim_feedforward=16, num_queries=5, eos_coef=0.2, lr=3e-4),
    DNDETR: dict(backbone=CONV, d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=1,
                 dim_feedforward=16, num_queries=5, denoising=DenoisingConfig(groups=2),
                 num_select=7),
    RTDETRv2: dict(backbone=BackboneConfig("conv", channels=[8] * 4, return_strides=[4, 8, 16]),
                   hidden_dim=16, encoder_dim=16, nhead=2, encoder_dim_feedforward=16,
                   num_decoder_layers=1, num_queries=5, num_select=7, num_points=None),
}  # fmt: skip


def write_flat_checkpoint(path, cls, cli: bool) -> DETR:
    """A checkpoint as the code before ``net`` wrote it: Python-built (dataclass values) or
    CLI-built (plain values, ``_class_path`` and ``_instantiator``)."""
    torch.manual_seed(0)
    module = make_module(cls, 3, **FLAT[cls])
    hparams = {"num_classes": 3, **FLAT[cls]}
    if cli:
        hparams = {"_class_path": f"detr_lineage.lit.{cls.__name__}", **_plain(hparams)}
        hparams["_instantiator"] = "lightning.pytorch.cli.instantiate_module"
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": hparams,
            "pytorch-lightning_version": lightning.__version__,
            "model_class": f"{cls.__module__}.{cls.__qualname__}",
        },
        path,
    )
    return module


@pytest.mark.parametrize("cli", [False, True], ids=["python", "cli"])
@pytest.mark.parametrize("cls", list(FLAT), ids=lambda c: c.__name__)
def test_flat_checkpoint_loads_with_its_hyper_parameters_and_weights(tmp_path, cls, cli):
    original = write_flat_checkpoint(tmp_path / "old.ckpt", cls, cli)
    loaded = load_detector(str(tmp_path / "old.ckpt"))
    assert type(loaded) is cls
    net = loaded.hparams.net
    net = net if isinstance(net, dict) else dataclasses.asdict(net)
    for key, value in FLAT[cls].items():
        if key in net and value is not None:
            want = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
            assert net[key] == want, key
    if cls is RTDETRv2:  # num_points=None meant the default
        assert net["num_points"] == [4, 4, 4]
    assert net["num_classes"] == 3 and loaded.num_classes == 3
    module_args = {k: v for k, v in FLAT[cls].items() if k not in net}
    assert module_args and all(loaded.hparams[k] == v for k, v in module_args.items())
    state = loaded.state_dict()
    assert state.keys() == original.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in original.state_dict().items())


def test_flat_checkpoint_that_cannot_be_nested_says_how_to_convert(tmp_path):
    write_flat_checkpoint(tmp_path / "old.ckpt", DETR, cli=False)
    checkpoint = torch.load(tmp_path / "old.ckpt", weights_only=False)
    del checkpoint["hyper_parameters"]["num_classes"]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    with pytest.raises(ValueError, match=r"old\.ckpt: .*DETRConfig.*hyper_parameters\['net'\]"):
        DETR.load_from_checkpoint(str(tmp_path / "old.ckpt"))


def test_cli_mismatch_check_compares_a_flat_checkpoint_to_the_nested_config():
    flat = {"_class_path": "detr_lineage.lit.DETR", "num_classes": 3, "d_model": 16, "lr": 1e-4}
    config = {
        "class_path": "detr_lineage.lit.DETR",
        "init_args": {"net": {"num_classes": 3, "d_model": 16}, "lr": 1e-4},
    }
    assert checkpoint_mismatch(dict(flat), config) == []
    config["init_args"]["net"]["d_model"] = 32
    assert checkpoint_mismatch(dict(flat), config) == [
        "net.d_model: 16 in the checkpoint, 32 in the config"
    ]
    nested = {"_class_path": "detr_lineage.lit.DETR", "net": {"num_classes": 3, "d_model": 16}}
    assert checkpoint_mismatch(nested, config) == [
        "net.d_model: 16 in the checkpoint, 32 in the config"
    ]


@pytest.mark.slow
def test_cli_builds_a_flat_checkpoints_model_when_asked(tmp_path):
    """``validate --ckpt_path old.ckpt --model_from_checkpoint=true``: the flat checkpoint's
    model (its sizes, not the config's) is built and its weights evaluated."""
    from detr_lineage.cli import main
    from tests.test_cli import ROOT, TINY

    torch.manual_seed(0)
    flat = {**FLAT[DETR], "num_classes": 6}
    module = make_module(DETR, **flat)
    hparams = {"_class_path": "detr_lineage.lit.DETR", **_plain(flat)}
    hparams["_instantiator"] = "lightning.pytorch.cli.instantiate_module"
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": hparams,
            "pytorch-lightning_version": lightning.__version__,
            "model_class": "detr_lineage.lit.detr.DETR",
        },
        tmp_path / "old.ckpt",
    )
    args = ["validate", "--config", str(ROOT / "experiments/toy/detr.yaml"), *TINY]
    args += [f"--ckpt_path={tmp_path / 'old.ckpt'}", f"--run.dir={tmp_path}", "--run.name=r"]
    with pytest.raises(Exception, match="net.d_model: 16 in the checkpoint, 128 in the config"):
        main(args)
    main([*args, "--model_from_checkpoint=true", "--trainer.enable_progress_bar=false"])
    recorded = next(tmp_path.glob("r/**/validate_*/config.yaml")).read_text()
    assert "d_model: 16" in recorded and "num_queries: 5" in recorded
