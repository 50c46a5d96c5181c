"""Train-step throughput and peak memory of the toy configs (a measurement, not a test).

    .venv/bin/python benchmarks/bench_train_step.py [--threads 2] [--steps 10]

Each configuration runs in its own process (so peak RSS is its own): one fixed batch of the
config's toy data, forward + loss + backward + AdamW step, median over ``--steps`` after 2
warm-up steps. Data loading is excluded (it runs in loader workers during training).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = [
    ("DETR", "experiments/toy/detr.yaml", True),
    ("DN-DETR", "experiments/toy/dn_detr.yaml", True),
    ("DN-DETR, denoising off (DAB-DETR)", "experiments/toy/dn_detr.yaml", False),
    ("RT-DETRv2", "experiments/toy/rtdetr_v2.yaml", True),
    ("RT-DETRv2, denoising off", "experiments/toy/rtdetr_v2.yaml", False),
]


def measure(config: str, denoising: bool, threads: int, steps: int, queue: mp.Queue) -> None:
    import torch
    import yaml
    from jsonargparse import ArgumentParser

    from detr_lineage.lit import DetectionModule

    torch.set_num_threads(threads)
    cfg = yaml.safe_load((ROOT / config).read_text())
    if not denoising:
        cfg["model"]["init_args"]["net"]["denoising"] = None
    parser = ArgumentParser()
    parser.add_subclass_arguments(DetectionModule, "model")
    parser.add_argument("--data", type=dict)
    init = parser.instantiate_classes(parser.parse_object({"model": cfg["model"]}))
    model = init.model
    from detr_lineage.data.toy_shapes import ToyShapesDataModule

    dm = ToyShapesDataModule(**{**cfg["data"]["init_args"], "num_workers": 0})
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        out = model.net(batch["images"], batch["masks"], batch["targets"])
        model.criterion(out, batch["targets"])["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    params = sum(p.numel() for p in model.parameters())
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put((step, len(batch["targets"]) / step, params, peak_mb))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    print(f"torch threads: {args.threads}; median of {args.steps} steps; batch of the config\n")
    print("| config | params | ms / step | images / s | peak RSS (MB) |")
    print("|---|---:|---:|---:|---:|")
    ctx = mp.get_context("spawn")
    for name, config, dn in CASES:
        queue = ctx.Queue()
        proc = ctx.Process(target=measure, args=(config, dn, args.threads, args.steps, queue))
        proc.start()
        step, ips, params, peak = queue.get()
        proc.join()
        print(f"| {name} | {params / 1e6:.2f}M | {1000 * step:.0f} | {ips:.0f} | {peak:.0f} |")


if __name__ == "__main__":
    main()
