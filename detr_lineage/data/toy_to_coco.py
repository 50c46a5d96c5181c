"""Write toy shapes as a COCO-format dataset on disk (PNG images + instances JSON).

This is how the COCO path is exercised without downloading COCO: the toy generator's exact
boxes go through the same files, loader, augmentation and evaluation as real COCO would.
Category ids are deliberately non-contiguous (1, 3, 5, ...) so the label <-> category-id
mapping is tested too, and image ids start at 1 as in COCO. ``area`` is the object's visible
pixel count (COCO's area is the mask area, which decides small/medium/large).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from detr_lineage.data.toy_shapes import CLASS_NAMES, ToyShapesDataset, get_preset

__all__ = ["category_id_of_label", "export_toy_to_coco", "main"]


def category_id_of_label(label: int) -> int:
    """COCO category id written for toy class ``label`` (1, 3, 5, ...)."""
    return 2 * label + 1


def export_toy_to_coco(
    out_dir: str | os.PathLike[str],
    n: int,
    preset: str = "easy",
    seed: int = 0,
    split: str = "train",
    image_size: int | None = None,
) -> Path:
    """Render ``n`` toy images of ``split`` into ``out_dir`` in the COCO 2017 layout.

    Writes ``{split}2017/{image_id:012d}.png`` and ``annotations/instances_{split}2017.json``;
    returns the path of the JSON. Image ``image_id`` is toy image ``image_id - 1``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    config = get_preset(preset)
    if image_size is not None:
        config = replace(config, image_size=image_size)
    toy = ToyShapesDataset(config, split=split, length=n, seed=seed)
    out = Path(out_dir)
    image_dir = out / f"{split}2017"
    ann_path = out / "annotations" / f"instances_{split}2017.json"
    image_dir.mkdir(parents=True, exist_ok=True)
    ann_path.parent.mkdir(parents=True, exist_ok=True)

    images, annotations = [], []
    for index in range(n):
        scene = toy.scene(index, return_masks=True)
        image_id = index + 1
        file_name = f"{image_id:012d}.png"
        pixels = np.round(scene.image.transpose(1, 2, 0) * 255).astype(np.uint8)  # [H,W,3]
        Image.fromarray(pixels).save(image_dir / file_name)
        height, width = pixels.shape[:2]
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        assert scene.masks is not None
        for box, label, mask in zip(scene.boxes, scene.labels, scene.masks, strict=True):
            x0, y0, x1, y1 = (float(v) for v in box)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_id_of_label(int(label)),
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": float(mask.sum()),
                    "iscrowd": 0,
                }
            )
    categories = [
        {"id": category_id_of_label(label), "name": name, "supercategory": "shape"}
        for label, name in enumerate(CLASS_NAMES[: config.num_classes])
    ]
    dataset = {
        "info": {"description": f"detr_lineage toy shapes, preset {preset}, seed {seed}"},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    with ann_path.open("w") as f:
        json.dump(dataset, f)
    return ann_path


def main(argv: Sequence[str] | None = None) -> Path:
    """``detr-lineage toy-to-coco --out DIR --n N [--preset P --seed S --split train ...]``."""
    parser = argparse.ArgumentParser(
        prog="detr-lineage toy-to-coco",
        description="Write toy shapes as a COCO-format dataset (PNG + instances JSON).",
    )
    parser.add_argument("--out", required=True, help="output directory (COCO 2017 layout)")
    parser.add_argument("--n", type=int, required=True, help="number of images")
    parser.add_argument("--preset", default="easy", help="toy shapes preset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="train", help="train, val, test or predict")
    parser.add_argument("--image-size", type=int, default=None, help="square side in pixels")
    args = parser.parse_args(argv)
    path = export_toy_to_coco(args.out, args.n, args.preset, args.seed, args.split, args.image_size)
    print(f"wrote {args.n} images and {path}")
    return path


if __name__ == "__main__":
    main()
