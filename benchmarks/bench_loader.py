"""Data-loader throughput of the COCO path (decode + augmentation + collate), per recipe.

Writes COCO-like JPEGs (640x480, a few filled shapes each, COCO-format JSON) to a temporary
directory, then times full passes of ``CocoDataModule.train_dataloader()`` at the official
recipe sizes (DETR: 480-800 short side / 1333; RT-DETRv2: 640x640 with zoom-out and IoU crop).
``none`` (decode + to-tensor only) is the floor. Prints a Markdown table.

    python benchmarks/bench_loader.py [--images 64] [--workers 2] [--batch-size 4] [--epochs 2]

``--toy [CONFIG]`` times the toy DataModule of a toy config instead (default
``experiments/toy/detr.yaml``), in the main process (``num_workers=0``), with and without
``cache_images``: per-batch loader time of the first (rendering) epoch, then of later epochs,
interleaved round-robin so that load changes hit both alike.

    python benchmarks/bench_loader.py --toy [--toy-images 8000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import yaml

from detr_lineage.data.coco import CocoDataModule
from detr_lineage.data.toy_shapes import ToyShapesDataModule


def write_fake_coco(root: Path, n: int, height: int = 480, width: int = 640, seed: int = 0) -> None:
    """n JPEGs (quality 90, like COCO) with 1-12 coloured shapes each, and their annotations."""
    rng = np.random.default_rng(seed)
    (root / "train2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, anns = [], []
    for image_id in range(1, n + 1):
        image = rng.integers(0, 255, (height // 8, width // 8, 3), dtype=np.uint8)
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_CUBIC)  # textured
        for _ in range(int(rng.integers(1, 13))):
            w, h = int(rng.integers(8, width // 2)), int(rng.integers(8, height // 2))
            x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
            colour = tuple(int(c) for c in rng.integers(0, 255, 3))
            cv2.rectangle(image, (x, y), (x + w - 1, y + h - 1), colour, -1)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": int(rng.integers(1, 4)),
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
        name = f"{image_id:012d}.jpg"
        cv2.imwrite(str(root / "train2017" / name), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
    categories = [{"id": i, "name": f"class{i}"} for i in (1, 2, 3)]
    data = {"images": images, "annotations": anns, "categories": categories}
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(data))


def time_recipe(root: Path, recipe: str, workers: int, batch_size: int, epochs: int) -> dict:
    """Images/s over ``epochs`` full passes, after one warm-up pass (worker start-up excluded)."""
    dm = CocoDataModule(
        str(root),
        val_annotations=None,
        recipe=recipe,  # type: ignore[arg-type]
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=False,
        seed=0,
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    for _ in loader:  # warm-up: starts the persistent workers
        pass
    count, pixels = 0, 0
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        dm.set_epoch(epoch)
        for batch in loader:
            count += batch["images"].shape[0]
            pixels += int((~batch["masks"]).sum())
    seconds = time.perf_counter() - start
    return {
        "recipe": recipe,
        "workers": workers,
        "images": count,
        "seconds": seconds,
        "images_per_s": count / seconds,
        "mean_pixels": pixels / max(count, 1),
    }


def _ms_per_batch(loader) -> float:
    start, batches = time.perf_counter(), 0
    for _ in loader:
        batches += 1
    return 1e3 * (time.perf_counter() - start) / max(batches, 1)


def time_toy(config: str, images: int | None, rounds: int) -> dict[str, list[float]]:
    """Per-batch loader time (ms) of ``config``'s toy DataModule, uncached and cached, at
    ``num_workers=0``: epoch 0 (both render; the cached one also fills its cache), then one
    value per round of later epochs."""
    init = yaml.safe_load(Path(config).read_text())["data"]["init_args"]
    init = {**init, "num_workers": 0} | ({"num_train": images} if images else {})
    loaders = {
        name: ToyShapesDataModule(**{**init, "cache_images": cache}).train_dataloader()
        for name, cache in (("uncached", False), ("cached", True))
    }
    times: dict[str, list[float]] = {
        f"{name} {part}": [] for name in loaders for part in ("epoch 0", "later")
    }
    for name, loader in loaders.items():
        loader.sampler.set_epoch(0)
        times[f"{name} epoch 0"].append(_ms_per_batch(loader))
    for epoch in range(1, rounds + 1):
        for name, loader in loaders.items():
            loader.sampler.set_epoch(epoch)  # a new order, as in training
            times[f"{name} later"].append(_ms_per_batch(loader))
    return times


def main_toy(config: str, images: int | None, rounds: int) -> None:
    times = time_toy(config, images, rounds)
    init = yaml.safe_load(Path(config).read_text())["data"]["init_args"]
    n = images or init["num_train"]
    print(
        f"\n{config}: {n} images at {init.get('image_size')} px, batch {init['batch_size']}, "
        f"num_workers 0, {rounds} rounds of later epochs (round-robin)\n"
    )
    print("| loader | epoch 0 ms/batch | later epochs ms/batch (median) | per round |")
    print("|---|---:|---:|---|")
    for name in ("uncached", "cached"):
        later = times[f"{name} later"]
        rounds_text = ", ".join(f"{t:.2f}" for t in later)
        print(
            f"| {name} | {times[f'{name} epoch 0'][0]:.2f} | {float(np.median(later)):.2f} | "
            f"{rounds_text} |"
        )
    ratios = [u / c for u, c in zip(times["uncached later"], times["cached later"], strict=True)]
    print(
        "\nlater epochs, uncached / cached per round: "
        + ", ".join(f"{r:.1f}x" for r in ratios)
        + "; cached epoch 0 / uncached epoch 0: "
        f"{times['cached epoch 0'][0] / times['uncached epoch 0'][0]:.2f}"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--recipes", nargs="+", default=["none", "detr", "rtdetr"])
    parser.add_argument(
        "--toy", nargs="?", const="experiments/toy/detr.yaml", default=None, metavar="CONFIG",
        help="time a toy config's DataModule, cached vs uncached, instead of COCO",
    )  # fmt: skip
    parser.add_argument("--toy-images", type=int, default=None, help="default: the config's")
    parser.add_argument("--rounds", type=int, default=3, help="--toy: later epochs per loader")
    args = parser.parse_args(argv)
    if args.toy:
        main_toy(args.toy, args.toy_images, args.rounds)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_fake_coco(root, args.images)
        rows = [
            time_recipe(root, recipe, args.workers, args.batch_size, args.epochs)
            for recipe in args.recipes
        ]
    print(
        f"\n{args.images} JPEGs 640x480, batch {args.batch_size}, {args.workers} workers, "
        f"{args.epochs} timed passes\n"
    )
    print("| recipe | workers | images | seconds | images/s | mean image (Mpx) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['recipe']} | {r['workers']} | {r['images']} | {r['seconds']:.2f} | "
            f"{r['images_per_s']:.1f} | {r['mean_pixels'] / 1e6:.2f} |"
        )


if __name__ == "__main__":
    main()
