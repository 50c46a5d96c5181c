"""Impossible settings stop before any training, with the cause as the last line (issue 11)."""

from __future__ import annotations

import pytest

from detr_lineage.cli import ConfigError, config_error_cause, main
from detr_lineage.lit import DETR, DNDETR, RTDETRv2
from detr_lineage.nn.backbone import BackboneConfig
from tests.helpers import make_module
from tests.test_cli import ROOT, TINY

TOY_DETR = ["--config", str(ROOT / "experiments/toy/detr.yaml")]
SMALL = dict(backbone=BackboneConfig(name="conv", channels=[8, 8, 8, 8], return_strides=[16]))


@pytest.mark.parametrize("cls", [DETR, DNDETR, RTDETRv2])
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_queries=0), "num_queries must be >= 1, got 0"),
        (dict(num_decoder_layers=0), "num_decoder_layers must be >= 1, got 0"),
        (dict(nhead=0), "nhead must be >= 1, got 0"),
        (dict(dropout=1.0), "dropout must be in [0, 1), got 1.0"),
        (dict(lr=-1e-4), "lr must be >= 0, got -0.0001"),
    ],
)
def test_impossible_sizes_are_named_at_construction(cls, kwargs, message):
    with pytest.raises(ValueError) as error:
        make_module(cls, 3, **SMALL, **kwargs)
    assert str(error.value) == message


@pytest.mark.parametrize("cls, width", [(DETR, "d_model"), (RTDETRv2, "hidden_dim")])
def test_width_not_divisible_by_heads_is_named(cls, width):
    with pytest.raises(ValueError, match=f"^{width}=36 must be divisible by nhead=8$"):
        make_module(cls, 3, **SMALL, **{width: 36}, nhead=8)


def test_constructor_error_is_the_last_line_of_the_cli(capsys):
    with pytest.raises(ConfigError) as error:
        main(["fit", *TOY_DETR, *TINY, "--model.init_args.net.num_queries=0"])
    assert str(error.value) == "num_queries must be >= 1, got 0"


@pytest.mark.parametrize(
    "arg, last_line",
    [
        (
            "--model.init_args.net.num_queries=abc",
            "error: model > detr_lineage.lit.DETR > net.num_queries: "
            "Expected a <class 'int'>. Got value: abc",
        ),
        (
            "--model.init_args.num_querys=3",
            "error: model > detr_lineage.lit.DETR: Option 'num_querys' is not accepted",
        ),
        (
            "--data.init_args.presett=easy",
            "error: data > detr_lineage.data.toy_shapes.ToyShapesDataModule: "
            "Option 'presett' is not accepted",
        ),
    ],
)
def test_parser_error_ends_with_its_cause(capsys, arg, last_line):
    with pytest.raises(SystemExit):
        main(["fit", *TOY_DETR, arg])
    assert capsys.readouterr().err.strip().splitlines()[-1] == last_line


def test_config_error_cause_of_a_plain_message():
    assert config_error_cause("unrecognized arguments: --x") == "unrecognized arguments: --x"


def test_num_classes_larger_than_the_data_stops_at_set_up(tmp_path):
    with pytest.raises(ValueError) as error:
        main(
            ["fit", *TOY_DETR, *TINY, "--model.init_args.net.num_classes=8"]
            + [f"--run.dir={tmp_path}", "--run.name=r", "--trainer.enable_progress_bar=false"]
        )
    assert str(error.value) == (
        "model.net.num_classes=8 but the data has 6 classes (labels are contiguous from 0): "
        "pass --model.init_args.net.num_classes=6"
    )
    assert not list(tmp_path.rglob("*.ckpt"))  # stopped before any step
    assert not list(tmp_path.rglob("metrics.csv"))
