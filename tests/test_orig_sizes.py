"""Original sizes: images resized by the `detr` and `rtdetr` recipes come back as detections in
their original pixels, and ground truth fed back as predictions scores COCO AP 1.0 through the
module's own evaluation (post-processing, id mapping, official evaluator).

The images have different sizes, none equal to its resized size, and the category ids are not
contiguous, so scaling by the resized size, by another image's size, or a swapped (h, w), or a
label -> category id slip all fail.
"""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from detr_lineage.data.coco import CocoDataModule
from detr_lineage.lit import DETR, RTDETRv2
from detr_lineage.nn.backbone import BackboneConfig
from tests.helpers import make_module

SIZES = [(90, 140), (150, 70), (61, 61), (200, 123), (77, 190)]  # (h, w)
CATEGORY_IDS = [2, 5, 9]


def write_dataset(root) -> dict[int, list[tuple[list[float], int]]]:
    """A COCO-format val split; returns image id -> [(xyxy box in px, category id)]."""
    rng = np.random.default_rng(0)
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, annotations, truth = [], [], {}
    for image_id, (h, w) in enumerate(SIZES, start=1):
        name = f"{image_id:012d}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            root / "val2017" / name
        )
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
        truth[image_id] = []
        for k in range(1 + image_id % 3):
            bw, bh = int(rng.integers(12, w // 2)), int(rng.integers(12, h // 2))
            x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            cat = CATEGORY_IDS[(image_id + k) % 3]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": cat,
                    "bbox": [x, y, bw, bh],
                    "area": bw * bh,
                    "iscrowd": 0,
                }
            )
            truth[image_id].append(([x, y, x + bw, y + bh], cat))
    categories = [{"id": c, "name": f"c{c}"} for c in CATEGORY_IDS]
    data = {"images": images, "annotations": annotations, "categories": categories}
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    return truth


class OracleNet(nn.Module):
    """Predicts the batch's own targets (as the network would see them after resizing)."""

    def __init__(self, num_classes: int, num_queries: int, softmax: bool) -> None:
        super().__init__()
        self.num_classes, self.num_queries, self.softmax = num_classes, num_queries, softmax
        self.targets: list[dict] = []

    def forward(self, images: Tensor, masks: Tensor, targets=None) -> dict:
        b, q, c = len(self.targets), self.num_queries, self.num_classes
        logits = torch.full((b, q, c + self.softmax), -10.0)
        boxes = torch.full((b, q, 4), 0.5)
        if self.softmax:
            logits[..., -1] = 10.0  # no-object
        for i, t in enumerate(self.targets):
            n = len(t["labels"])
            logits[i, torch.arange(n), t["labels"]] = 10.0
            if self.softmax:
                logits[i, :n, -1] = -10.0
            boxes[i, :n] = t["boxes"]
        return {"pred_logits": logits, "pred_boxes": boxes}


RECIPES = {
    "detr": (DETR, dict(detr_val_size=48, detr_max_size=80)),
    "rtdetr": (RTDETRv2, dict(rtdetr_size=64)),
}


def oracle_module(recipe: str):
    cls, _ = RECIPES[recipe]
    bb = BackboneConfig("conv", channels=[8, 8, 8, 8], return_strides=[16])
    if cls is DETR:
        module = make_module(cls, 3, backbone=bb, d_model=16, nhead=2, num_encoder_layers=1,
                     num_decoder_layers=1, dim_feedforward=16, num_queries=6)  # fmt: skip
    else:
        bb.return_strides = [4, 8, 16]
        module = make_module(cls, 3, backbone=bb, hidden_dim=16, encoder_dim=16, nhead=2,
                     encoder_dim_feedforward=16, num_decoder_layers=1, num_queries=6,
                     num_select=18)  # fmt: skip
    net = OracleNet(3, 6, softmax=cls is DETR)

    class Oracle(cls):
        def validation_step(self, batch, batch_idx):
            net.targets = batch["targets"]
            return super().validation_step(batch, batch_idx)

    module.__class__ = Oracle
    module.net = net
    return module


def datamodule(root, recipe: str) -> CocoDataModule:
    dm = CocoDataModule(
        str(root),
        train_annotations=None,
        recipe=recipe,
        batch_size=2,
        num_workers=0,
        **RECIPES[recipe][1],
    )
    dm.setup("validate")
    return dm


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_detections_come_back_in_original_pixels(tmp_path, recipe):
    truth = write_dataset(tmp_path)
    dm = datamodule(tmp_path, recipe)
    module = oracle_module(recipe)
    seen = set()
    for batch in dm.val_dataloader():
        sizes = {tuple(t["size"].tolist()) for t in batch["targets"]}
        origs = [tuple(t["orig_size"].tolist()) for t in batch["targets"]]
        assert not sizes & set(origs)  # every image really was resized
        module.net.targets = batch["targets"]
        dets = module.detections(module.net(batch["images"], batch["masks"]), batch["targets"])
        for det, t in zip(dets, batch["targets"]):
            image_id = int(t["image_id"])
            seen.add(image_id)
            want = sorted(truth[image_id])
            keep = det["scores"] > 0.5
            got = sorted(
                (box, dm.label_to_category_id[int(label)])
                for box, label in zip(det["boxes"][keep].tolist(), det["labels"][keep])
            )
            assert [c for _, c in got] == [c for _, c in want]
            np.testing.assert_allclose([b for b, _ in got], [b for b, _ in want], atol=1e-3)
    assert seen == set(truth)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_ground_truth_as_predictions_scores_ap_one(tmp_path, recipe):
    write_dataset(tmp_path)
    dm = datamodule(tmp_path, recipe)
    module = oracle_module(recipe)
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    (metrics,) = trainer.validate(module, datamodule=dm, verbose=False)
    assert metrics["val/map"] == pytest.approx(1.0)
    assert metrics["val/map_75"] == pytest.approx(1.0)
