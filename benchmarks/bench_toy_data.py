"""Toy shapes generation speed per preset, on one CPU core; prints a Markdown table.

Why: the generator runs inside every training step of the toy experiments, so it must stay far
from being the bottleneck (target: > 1000 images/s at 128 px without noise). Times full
dataset items (numpy rendering + tensor conversion), not the DataLoader.

    .venv/bin/python benchmarks/bench_toy_data.py [--images 300] [--sizes 64 128]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402

import torch  # noqa: E402

from detr_lineage.data.toy_shapes import PRESETS, ToyShapesConfig, ToyShapesDataset  # noqa: E402


def images_per_second(
    config: ToyShapesConfig, n_images: int, seed: int = 0
) -> tuple[float, float, float]:
    """(wall images/s, CPU-time images/s, mean objects per image) over ``n_images`` items.

    Wall time (``perf_counter``) is what a DataLoader worker delivers; CPU time
    (``process_time``) is what the same code would deliver on an unshared core.
    """
    dataset = ToyShapesDataset(config, "train", n_images + 10, seed=seed)
    for i in range(10):  # warm-up: first calls pay for lazy imports and allocator growth
        dataset[n_images + i]
    n_objects = 0
    start, start_cpu = time.perf_counter(), time.process_time()
    for i in range(n_images):
        n_objects += len(dataset[i][1]["labels"])
    elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    return n_images / elapsed, n_images / elapsed_cpu, n_objects / n_images


def python_speed() -> float:
    """CPU seconds for ``sum(range(10**7))`` (~0.2 s on a typical core): scales the table."""
    start = time.process_time()
    sum(range(10**7))
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300, help="images timed per cell")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    args = parser.parse_args()

    if hasattr(os, "sched_setaffinity"):  # one core, as in a single DataLoader worker
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    torch.set_num_threads(1)

    rows = {name: config for name, config in PRESETS.items()}
    for name, config in PRESETS.items():
        if config.noise > 0:
            rows[f"{name} (noise=0)"] = replace(config, noise=0.0)

    print(
        f"{args.images} images per cell, one core; calibration: sum(range(10**7)) took "
        f"{python_speed():.2f} CPU s on this machine (~0.2 s on a typical core)\n"
    )
    header = ["preset"]
    for size in args.sizes:
        header += [f"{size} px img/s (wall)", f"{size} px img/s (CPU)"]
    header.append(f"objects/img ({args.sizes[-1]} px)")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for name, config in rows.items():
        cells, mean_objects = [], float("nan")
        for size in args.sizes:
            rate, rate_cpu, mean_objects = images_per_second(
                replace(config, image_size=size), args.images
            )
            cells += [f"{rate:,.0f}", f"{rate_cpu:,.0f}"]
        print(f"| {name} | " + " | ".join(cells) + f" | {mean_objects:.1f} |")


if __name__ == "__main__":
    main()
