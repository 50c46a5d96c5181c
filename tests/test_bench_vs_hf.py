"""benchmarks/bench_vs_hf.py: the contenders are set up alike; the official DETR loads cleanly.

The official facebookresearch/detr code is not part of this repository: the tests that need it
run when ``DETR_OFFICIAL_DIR`` names a checkout of it, and are skipped otherwise (as in CI).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from detr_lineage.convert import convert_detr

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL_DIR = os.environ.get("DETR_OFFICIAL_DIR")
needs_official = pytest.mark.skipif(
    not OFFICIAL_DIR, reason="set DETR_OFFICIAL_DIR to a checkout of facebookresearch/detr"
)


@pytest.fixture(scope="module")
def bench() -> Iterator[types.ModuleType]:
    """The script as a module (registered while the tests run: its dataclasses need it)."""
    spec = importlib.util.spec_from_file_location("bench_vs_hf", ROOT / "benchmarks/bench_vs_hf.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_official_dir_without_detr_code_is_a_clear_error(bench, tmp_path):
    with pytest.raises(SystemExit, match=f"--official-detr {tmp_path}: no models/detr.py"):
        bench.import_official_detr(tmp_path)


TIMES = {"ours train": 0.2, "HF train": 0.3, "ours fwd": 0.1, "HF fwd": 0.125}
OFFICIAL_TIMES = {"official train": 0.26, "official fwd": 0.08}


def test_table_without_the_official_code_is_unchanged(bench):
    rows = [(bench.CASES["toy_detr"], (12_670_000, 12_510_000), 1, TIMES)]
    assert bench.table(rows, official=False)[1:] == [
        "| model, shapes | params (total / trainable) | threads | train step: ours / HF ms "
        "| speed-up | forward: ours / HF ms | speed-up |",
        "|---|---|---:|---:|---:|---:|---:|",
        f"| {bench.CASES['toy_detr'].name} | 12.67M / 12.51M | 1 | 200 / 300 | 1.50x "
        "| 100 / 125 | 1.25x |",
    ]


def test_table_with_the_official_code_has_its_columns_and_dashes_where_it_has_no_case(bench):
    rows = [
        (bench.CASES["toy_detr"], (12_670_000, 12_510_000), 2, TIMES | OFFICIAL_TIMES),
        (bench.CASES["toy_rtdetr"], (13_550_000, 13_550_000), 2, TIMES),
    ]
    lines = bench.table(rows, official=True)
    assert lines[1].count("|") == lines[2].count("|") == lines[3].count("|") == 10
    row = "| 2 | 200 / 300 / 260 | 1.50x | 1.30x | 100 / 125 / 80 | 1.25x | 0.80x |"
    assert lines[3].endswith(row)
    assert lines[4].endswith("| 2 | 200 / 300 / - | 1.50x | - | 100 / 125 / - | 1.25x | - |")


@needs_official
def test_official_import_leaves_sys_path_and_modules_as_they_were(bench, monkeypatch):
    placeholder = types.ModuleType("util")  # a same-named module loaded before: set aside, back
    monkeypatch.setitem(sys.modules, "util", placeholder)
    path, modules = list(sys.path), dict(sys.modules)
    off = bench.import_official_detr(Path(OFFICIAL_DIR))
    assert sys.path == path
    assert {k: v for k, v in sys.modules.items() if bench._official_name(k)} == {
        k: v for k, v in modules.items() if bench._official_name(k)
    }
    assert sys.modules["util"] is placeholder
    assert off.misc is not placeholder and Path(off.misc.__file__).parent.parent == Path(
        OFFICIAL_DIR
    )
    assert Path(off.detr.__file__) == Path(OFFICIAL_DIR) / "models/detr.py"
    assert Path(sys.modules["detr_lineage.models"].__file__).is_relative_to(ROOT)


@needs_official
@pytest.mark.slow
def test_official_toy_detr_is_ours_at_the_same_weights_and_times(bench):
    """The official model built by the bench has our parameter counts (build_case asserts it),
    and with its weights loaded into ours both give the same outputs and the same total loss
    (aux losses, eos weight, loss weights, class semantics alike); then one timed round."""
    pytest.importorskip("transformers")
    off = bench.import_official_detr(Path(OFFICIAL_DIR))
    ours, hf, official, _ = bench.build_case("toy_detr", off)
    missing, unexpected = ours.net.load_state_dict(
        convert_detr(official.model.state_dict(), "official"), strict=False
    )
    assert not unexpected and all("num_batches_tracked" in k for k in missing), missing
    case = bench.CASES["toy_detr"]
    images, masks, targets = bench.make_batch(case)
    ours.train(), official.model.train()  # dropout 0 in the toy case: deterministic
    out_ours = ours.net(images, masks, targets)
    out_off = official.model(official.NestedTensor(official.normalise(images), masks))
    assert out_off["pred_logits"].shape == (case.batch, 100, case.num_classes + 1)
    torch.testing.assert_close(out_off["pred_logits"], out_ours["pred_logits"])
    torch.testing.assert_close(out_off["pred_boxes"], out_ours["pred_boxes"])
    loss_off = official.loss(out_off, targets)
    loss_ours = ours.criterion(out_ours, targets)["loss"]
    torch.testing.assert_close(loss_off, loss_ours, rtol=1e-5, atol=1e-5)

    times = bench.time_round_robin(
        bench.step_fns(ours, hf, case, official), rounds=1, warmup=0, bf16=False
    )
    assert list(times) == [
        "ours train",
        "HF train",
        "official train",
        "ours fwd",
        "HF fwd",
        "official fwd",
    ]
    assert all(t > 0 for t in times.values())
    # its train step back-propagated into every trainable parameter, the frozen ones untouched
    for name, p in official.model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
    assert official.model.backbone[0].body.layer4[0].conv1.weight.grad.abs().sum() > 0
