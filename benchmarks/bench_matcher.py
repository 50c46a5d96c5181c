"""Time per HungarianMatcher call, split into building the cost matrix and scipy's assignment.

Two settings: DETR (batch 8, 100 queries, 91 classes + no-object, softmax cost) and RT-DETR /
DN-DETR (batch 8, 300 queries, 80 classes, focal cost), 10 targets per image. The cases are
interleaved call by call so that load from other processes hits them alike; the table shows the
median over calls of wall time and of this thread's CPU time (a wall time far above the CPU time
means the process waited for a core).

    .venv/bin/python benchmarks/bench_matcher.py [--calls 50] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from scipy.optimize import linear_sum_assignment

from detr_lineage.matcher import HungarianMatcher

# name, batch, queries, logits, class cost, targets per image, matcher weights
CASES = [
    ("DETR", 8, 100, 92, "softmax", 10, (1.0, 5.0, 2.0)),
    ("RT-DETR", 8, 300, 80, "focal", 10, (2.0, 5.0, 2.0)),
]


def make_inputs(batch: int, queries: int, logits: int, mode: str, targets: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pred_logits = torch.randn(batch, queries, logits, generator=g)
    pred_boxes = torch.cat(
        [torch.rand(batch, queries, 2, generator=g), 0.05 + 0.3 * torch.rand(batch, queries, 2)],
        -1,
    )
    num_classes = logits - 1 if mode == "softmax" else logits
    tgts = [
        {
            "labels": torch.randint(0, num_classes, (targets,), generator=g),
            "boxes": torch.cat(
                [torch.rand(targets, 2, generator=g), 0.05 + 0.3 * torch.rand(targets, 2)], -1
            ),
        }
        for _ in range(batch)
    ]
    return pred_logits, pred_boxes, tgts


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall, thread CPU) seconds of one call."""
    wall, cpu = time.perf_counter(), time.thread_time()
    fn()
    return time.perf_counter() - wall, time.thread_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    setups = {}
    for name, b, q, c, mode, t, weights in CASES:
        matcher = HungarianMatcher(*weights, class_cost=mode)
        logits, boxes, targets = make_inputs(b, q, c, mode, t)
        sizes = [len(x["boxes"]) for x in targets]
        cost = matcher.cost_matrix(logits, boxes, targets).cpu()

        def assign(cost=cost, sizes=sizes) -> None:  # what forward does after the cost matrix
            for i, n in enumerate(sizes):
                linear_sum_assignment(cost[i, :, :n].numpy())

        setups[name] = {
            "call": lambda m=matcher, a=(logits, boxes, targets): m(*a),
            "cost matrix": lambda m=matcher, a=(logits, boxes, targets): m.cost_matrix(*a).cpu(),
            "assignment": assign,
        }

    parts = ("call", "cost matrix", "assignment")
    times = {(n, p): ([], []) for n in setups for p in parts}
    for step in range(args.warmup + args.calls):
        for name, fns in setups.items():
            for part in parts:
                wall, cpu = timed(fns[part])
                if step >= args.warmup:
                    times[name, part][0].append(wall)
                    times[name, part][1].append(cpu)

    def ms(values: list[float]) -> str:
        return f"{1e3 * statistics.median(values):.2f}"

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    _, reference = timed(lambda: sum(range(10**6)))  # machine-speed yardstick for comparisons
    print(
        f"HungarianMatcher, median of {args.calls} calls, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch thread(s), {os.cpu_count()} CPUs, load average {load}; "
        f"yardstick: pure-Python sum(range(10**6)) took {1e3 * reference:.0f} CPU ms\n"
    )
    print(
        "| case | B x Q x C, targets/image | class cost | call ms (CPU ms) "
        "| cost matrix ms (CPU ms) | assignment ms (CPU ms) |"
    )
    print("|---|---|---|---|---|---|")
    for name, b, q, c, mode, t, _ in CASES:
        cells = [f"{ms(times[name, p][0])} ({ms(times[name, p][1])})" for p in parts]
        print(f"| {name} | {b} x {q} x {c}, {t} | {mode} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
