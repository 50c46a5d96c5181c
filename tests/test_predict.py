"""``detr-lineage predict`` on a folder of images: COCO results JSON and drawn images."""

from __future__ import annotations

import json
from pathlib import Path

import lightning
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from detr_lineage.cli import main
from detr_lineage.lit import DETR, RTDETRv2
from detr_lineage.nn.backbone import BackboneConfig
from tests.helpers import make_module

BACKBONE = BackboneConfig(name="conv", channels=[8, 16, 32], return_strides=[8])


def save(module: torch.nn.Module, path: Path, **extra) -> Path:
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "model_class": f"{type(module).__module__}.{type(module).__qualname__}",
            "pytorch-lightning_version": lightning.__version__,
            **extra,
        },
        path,
    )
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    d = tmp_path / "imgs"
    d.mkdir()
    gen = torch.Generator().manual_seed(0)
    for name, (h, w) in {"a.png": (50, 70), "b.jpg": (64, 48)}.items():
        pixels = (torch.rand(h, w, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(d / name)
    (d / "notes.txt").write_text("not an image")
    return d


def test_predict_on_a_folder_of_two_images(tmp_path: Path, folder: Path) -> None:
    torch.manual_seed(0)
    model = make_module(DETR, 3, BACKBONE, d_model=32, nhead=4, num_encoder_layers=1,
                        num_decoder_layers=1, dim_feedforward=32, num_queries=8)  # fmt: skip
    ckpt = save(model, tmp_path / "m.ckpt", label_to_category_id=[5, 7, 9],
                class_names=["cat", "dog", "owl"])  # fmt: skip
    out = tmp_path / "out"
    main(["predict", "--ckpt_path", str(ckpt), "--images", str(folder), "--out", str(out),
          "--score_threshold", "0", "--top_k", "5", "--size", "0"])  # fmt: skip
    results = json.loads((out / "detections.json").read_text())
    assert len(results) == 10  # 8 queries, top 5 of each image
    assert {r["category_id"] for r in results} <= {5, 7, 9}
    gt = COCO(str(out / "images.json"))
    dt = gt.loadRes(str(out / "detections.json"))  # validates ids and boxes
    assert len(dt.getAnnIds()) == 10
    sizes = {im["file_name"]: (im["height"], im["width"]) for im in gt.dataset["images"]}
    assert sizes == {"a.png": (50, 70), "b.jpg": (64, 48)}
    for r in results:
        h, w = next(
            (im["height"], im["width"]) for im in gt.dataset["images"] if im["id"] == r["image_id"]
        )
        x, y, bw, bh = r["bbox"]
        assert min(x, y) >= -1e-3 and x + bw <= w + 1e-3 and y + bh <= h + 1e-3
    scores = [r["score"] for r in results if r["image_id"] == 1]
    assert scores == sorted(scores, reverse=True)
    for stem, (h, w) in {"a": (50, 70), "b": (64, 48)}.items():
        with Image.open(out / f"{stem}.png") as drawn:
            assert drawn.size == (w, h)
    with Image.open(out / "a.png") as drawn, Image.open(folder / "a.png") as original:
        assert (np.asarray(drawn.convert("RGB")) != np.asarray(original)).any()  # boxes drawn


def test_predict_threshold_resize_and_errors(
    tmp_path: Path, folder: Path, capsys: pytest.CaptureFixture
) -> None:
    torch.manual_seed(0)
    backbone = BackboneConfig(name="conv", channels=[8, 16, 32], return_strides=[2, 4, 8])
    sizes = dict(hidden_dim=32, encoder_dim=32, encoder_dim_feedforward=32, dim_feedforward=32)
    model = make_module(
        RTDETRv2, 2, backbone, num_queries=6, num_decoder_layers=1, num_select=6, **sizes
    )
    ckpt = save(model, tmp_path / "r.ckpt")
    out = tmp_path / "out"
    main(["predict", "--ckpt_path", str(ckpt), "--images", str(folder / "a.png"),
          "--out", str(out), "--score_threshold", "0.999", "--size", "64"])  # fmt: skip
    assert json.loads((out / "detections.json").read_text()) == []  # nothing that confident
    assert (out / "a.png").is_file()
    with pytest.raises(SystemExit):
        main(["predict", "--ckpt_path", str(ckpt), "--images", str(tmp_path / "none"),
              "--out", str(out)])  # fmt: skip
    assert str(tmp_path / "none") in capsys.readouterr().err
    bad = folder / "c.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(SystemExit):
        main(["predict", "--ckpt_path", str(ckpt), "--images", str(folder), "--out", str(out)])
    assert str(bad) in capsys.readouterr().err
