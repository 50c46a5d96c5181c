"""``detr-lineage export --format onnx``: onnxruntime gives the PyTorch outputs (1e-4)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from detr_lineage.cli import main
from detr_lineage.lit import DETR, RTDETRv2
from detr_lineage.nn.backbone import BackboneConfig
from tests.helpers import make_module

from .test_predict import save

ort = pytest.importorskip("onnxruntime")


def toy(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "detr":
        backbone = BackboneConfig(name="conv", channels=[8, 16, 32], return_strides=[8])
        return make_module(DETR, 3, backbone, d_model=32, nhead=4, num_encoder_layers=1,
                    num_decoder_layers=2, dim_feedforward=32, num_queries=8)  # fmt: skip
    backbone = BackboneConfig(name="conv", channels=[8, 16, 32], return_strides=[2, 4, 8])
    sizes = dict(hidden_dim=32, encoder_dim=32, encoder_dim_feedforward=32, dim_feedforward=32)
    return make_module(
        RTDETRv2, 3, backbone, num_queries=8, num_decoder_layers=2, eval_idx=0, **sizes
    )


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["detr", "rtdetr"])
def test_onnx_export_matches_onnxruntime(tmp_path: Path, kind: str) -> None:
    model = toy(kind)
    with torch.no_grad():  # non-trivial BN statistics, so the RepVGG fusion matters
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    ckpt = save(model, tmp_path / "m.ckpt")
    onnx_path = tmp_path / "m.onnx"
    main(["export", "--format", "onnx", "--ckpt_path", str(ckpt), "--out", str(onnx_path),
          "--height", "64", "--width", "48"])  # fmt: skip
    images = torch.rand(3, 3, 64, 48)  # exported with batch 1: the batch is dynamic
    model.eval()
    with torch.no_grad():
        expected = model(images, torch.zeros(3, 64, 48, dtype=torch.bool))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    logits, boxes = session.run(None, {"images": images.numpy()})
    assert logits.shape == tuple(expected["pred_logits"].shape)
    if kind == "rtdetr":  # deploy() cut the decoder at eval_idx: one layer, as in eval mode
        assert logits.shape[1] == 8
    torch.testing.assert_close(torch.from_numpy(logits), expected["pred_logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.from_numpy(boxes), expected["pred_boxes"], atol=1e-4, rtol=0)


def test_export_errors_name_the_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["export", "--ckpt_path", str(tmp_path / "x.ckpt"), "--out", str(tmp_path / "o")])
    assert str(tmp_path / "x.ckpt") in capsys.readouterr().err
