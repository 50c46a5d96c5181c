"""Train-step throughput and peak memory of the toy configs (a measurement, not a test).

    .venv/bin/python benchmarks/bench_train_step.py [--threads 2] [--steps 10]
    .venv/bin/python benchmarks/bench_train_step.py --precision 32-true bf16-mixed
    .venv/bin/python benchmarks/bench_train_step.py --fit --cases DETR RT-DETRv2 --rounds 2

Each configuration runs in its own process (so peak RSS is its own): one fixed batch of the
config's toy data, forward + loss + backward + AdamW step, median over ``--steps`` after 2
warm-up steps. Data loading is excluded (it runs in loader workers during training). With
several ``--precision`` values the precisions alternate step by step in that process (ratios
are robust to load from other processes). ``bf16-mixed`` is what Lightning does on a CPU: the
step under ``torch.autocast("cpu", torch.bfloat16)`` (the loss turns it off itself).

``--fit`` also times the real thing: ``detr-lineage fit`` on the config (same precision, its
loggers, loader, gradient clipping and schedule; validation off) for ``--fit-steps`` steps,
time per step read from the logged ``time/wall_s``; bare steps and fit runs alternate for
``--rounds`` rounds, and the table gives fit's time per step / the bare step's. The fit runs
use a training set of ``--fit-epoch-steps`` batches and skip its first epoch: the toy configs
cache rendered images, so a long run's steady state (every epoch after the first) is timed.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import multiprocessing as mp
import resource
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# name: (config, denoising): True = as the config, False = turned off, None = the variant has none
CASES: dict[str, tuple[str, bool | None]] = {
    "DETR": ("experiments/toy/detr.yaml", True),
    "DN-DETR": ("experiments/toy/dn_detr.yaml", True),
    "DAB-DETR": ("experiments/toy/dn_detr.yaml", False),
    "RT-DETRv2": ("experiments/toy/rtdetr_v2.yaml", True),
    "RT-DETRv2, DN off": ("experiments/toy/rtdetr_v2.yaml", False),
    "Conditional DETR": ("experiments/toy/conditional_detr.yaml", None),
    "Deformable DETR": ("experiments/toy/deformable_detr.yaml", None),
    "DINO": ("experiments/toy/dino.yaml", True),
    "DINO, DN off": ("experiments/toy/dino.yaml", False),
}


def fit_time_per_step(
    config: str,
    denoising: bool | None,
    precision: str,
    steps: int,
    epoch_steps: int,
    batch_size: int,
) -> float:
    """Seconds per training step of ``detr-lineage fit`` (validation off) after its first epoch
    of ``epoch_steps`` batches, from the logged ``time/wall_s``."""
    from detr_lineage.cli import main as cli_main

    with tempfile.TemporaryDirectory() as tmp:
        args = ["fit", "--config", str(ROOT / config), "--trainer.max_steps", str(steps)]
        args += ["--trainer.limit_val_batches", "0", "--trainer.precision", precision]
        args += ["--trainer.log_every_n_steps", "5", "--run.dir", tmp]
        args += ["--trainer.enable_progress_bar", "false", "--trainer.max_epochs", "null"]
        args += ["--data.init_args.num_train", str(epoch_steps * batch_size)]
        if denoising is False:
            args += ["--model.init_args.net.denoising", "null"]
        cli_main(args)
        (metrics,) = Path(tmp).glob("*/version_*/metrics.csv")
        rows = [r for r in csv.DictReader(metrics.open()) if r.get("time/wall_s")]
    # logged steps are 0-based: the first epoch ends at step epoch_steps - 1
    points = [(int(r["step"]), float(r["time/wall_s"])) for r in rows]
    points = [(s, t) for s, t in points if s >= epoch_steps - 1]
    if len(points) < 2:
        raise ValueError(f"--fit-steps {steps} leaves no logged interval after the first epoch")
    (s0, t0), (s1, t1) = points[0], points[-1]
    return (t1 - t0) / (s1 - s0)


def measure(
    config: str,
    denoising: bool | None,
    threads: int,
    steps: int,
    precisions: list[str],
    fit: bool,
    fit_steps: int,
    fit_epoch_steps: int,
    rounds: int,
    queue: mp.Queue,
) -> None:
    import torch
    import yaml
    from jsonargparse import ArgumentParser

    from detr_lineage.data.toy_shapes import ToyShapesDataModule
    from detr_lineage.lit import DetectionModule

    torch.set_num_threads(threads)
    cfg = yaml.safe_load((ROOT / config).read_text())
    if denoising is False:
        cfg["model"]["init_args"]["net"]["denoising"] = None
    parser = ArgumentParser()
    parser.add_subclass_arguments(DetectionModule, "model")
    parser.add_argument("--data", type=dict)
    init = parser.instantiate_classes(parser.parse_object({"model": cfg["model"]}))
    model = init.model
    dm = ToyShapesDataModule(**{**cfg["data"]["init_args"], "num_workers": 0})
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    optimizer = torch.optim.AdamW(model.parameter_groups(), lr=1e-4, fused=True)  # as in fit
    model.train()

    def step(precision: str) -> float:
        bf16 = precision.startswith("bf16")
        autocast = torch.autocast("cpu", torch.bfloat16) if bf16 else contextlib.nullcontext()
        t0 = time.perf_counter()
        with autocast:
            out = model.net(batch["images"], batch["masks"], batch["targets"])
            loss = model.criterion(out, batch["targets"])["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {p: [] for p in precisions}
    fit_ratios: dict[str, list[float]] = {p: [] for p in precisions}
    for _ in range(rounds if fit else 1):
        round_times: dict[str, list[float]] = {p: [] for p in precisions}
        for i in range(steps + 2):
            for p in precisions:
                t = step(p)
                if i >= 2:
                    round_times[p].append(t)
        for p in precisions:
            times[p] += round_times[p]
            if fit:
                per_step = fit_time_per_step(
                    config, denoising, p, fit_steps, fit_epoch_steps, len(batch["targets"])
                )
                fit_ratios[p].append(per_step / statistics.median(round_times[p]))
    params = sum(p.numel() for p in model.parameters())
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        p: (statistics.median(times[p]), fit_ratios[p], len(batch["targets"])) for p in precisions
    }
    queue.put((result, params, peak_mb))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument(
        "--precision", nargs="+", default=["32-true"], choices=["32-true", "bf16-mixed"]
    )
    parser.add_argument("--fit", action="store_true", help="also time `fit` per step")
    parser.add_argument("--fit-steps", type=int, default=80)
    parser.add_argument(
        "--fit-epoch-steps", type=int, default=20, help="batches per epoch in the fit runs"
    )
    parser.add_argument("--rounds", type=int, default=2, help="bare/fit alternations (--fit)")
    args = parser.parse_args()
    print(f"torch threads: {args.threads}; median of {args.steps} steps; batch of the config\n")
    header = "| config | params | precision | ms / step | images / s | peak RSS (MB) |"
    line = "|---|---:|---|---:|---:|---:|"
    if args.fit:
        header += " fit / bare step |"
        line += "---:|"
    print(header)
    print(line)
    ctx = mp.get_context("spawn")
    for name in args.cases:
        config, dn = CASES[name]
        queue = ctx.Queue()
        proc = ctx.Process(
            target=measure,
            args=(
                config,
                dn,
                args.threads,
                args.steps,
                args.precision,
                args.fit,
                args.fit_steps,
                args.fit_epoch_steps,
                args.rounds,
                queue,
            ),
        )
        proc.start()
        result, params, peak = queue.get()
        proc.join()
        for p, (step, ratios, bs) in result.items():
            row = f"| {name} | {params / 1e6:.2f}M | {p} | {1000 * step:.0f} | {bs / step:.0f} "
            row += f"| {peak:.0f} |"
            if args.fit:
                row += " " + ", ".join(f"{r:.2f}" for r in ratios) + " |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
