"""Speed of multi-scale deformable attention at RT-DETRv2-S decoder sizes.

Times ``ms_deform_attn`` (with the value stored as ``[B,S,H,Dh]`` tokens and heads-major, the
layout ``MSDeformableAttention`` produces) and the whole module, forward (no grad) and
forward+backward, for both sampling methods. Cases are interleaved round by round so that load
from other processes hits them alike; the table shows the median over rounds. On a shared
machine ``--threads 1 --clock cpu`` (CPU time of the timing thread) is far less noisy than
wall-clock time.

    .venv/bin/python benchmarks/bench_deformable.py [--repeats 10] [--threads 2] [--clock wall]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from detr_lineage.nn.deformable import MSDeformableAttention, ms_deform_attn

SHAPES = [(80, 80), (40, 40), (20, 20)]  # strides 8/16/32 of a 640x640 image


def make_cases(
    batch: int, queries: int, heads: int, d_model: int, points: int
) -> dict[tuple[str, str, str], tuple[Callable[[], torch.Tensor], list[torch.Tensor]]]:
    """(what, method, value layout) -> (forward closure, tensors to differentiate)."""
    g = torch.Generator().manual_seed(0)
    s, p, dh = sum(h * w for h, w in SHAPES), points * len(SHAPES), d_model // heads
    num_points = [points] * len(SHAPES)
    tokens = torch.randn(batch, s, heads, dh, generator=g)  # [B,S,H,Dh]
    heads_major = tokens.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # [B,H,Dh,S] memory
    locations = torch.rand(batch, queries, heads, p, 2, generator=g) * 1.1 - 0.05
    weights = torch.randn(batch, queries, heads, p, generator=g).softmax(-1)
    query = torch.randn(batch, queries, d_model, generator=g)
    boxes = torch.cat(
        [torch.rand(batch, queries, 2), 0.05 + 0.3 * torch.rand(batch, queries, 2)], -1
    )
    memory = torch.randn(batch, s, d_model, generator=g)
    for t in (tokens, heads_major, locations, weights, query, memory):
        t.requires_grad_()

    cases = {}
    for method in ("default", "discrete"):
        grads = [locations, weights] if method == "default" else [weights]
        for layout, value in (("heads-major", heads_major), ("tokens", tokens)):
            cases["ms_deform_attn", method, layout] = (
                lambda v=value, m=method: ms_deform_attn(
                    v, SHAPES, locations, weights, num_points, m
                ),
                [value, *grads],
            )
        module = MSDeformableAttention(d_model, heads, len(SHAPES), points, method=method)
        cases["MSDeformableAttention", method, "tokens"] = (
            lambda m=module: m(query, boxes, memory, SHAPES),
            [query, memory, *(p for p in module.parameters() if p.requires_grad)],
        )
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--points", type=int, default=4, help="points per level")
    parser.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall", help="cpu needs --threads 1"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and torch.get_num_threads() != 1:
        parser.error("--clock cpu measures one thread: add --threads 1")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter

    cases = make_cases(args.batch, args.queries, args.heads, args.d_model, args.points)
    times: dict[tuple[str, str, str], tuple[list[float], list[float]]] = {
        k: ([], []) for k in cases
    }
    for rnd in range(args.warmup + args.repeats):
        for key, (forward, inputs) in cases.items():
            t0 = clock()
            with torch.no_grad():
                forward()
            t1 = clock()
            out = forward()
            torch.autograd.grad(out, inputs, torch.ones_like(out))
            t2 = clock()
            if rnd >= args.warmup:
                times[key][0].append(1e3 * (t1 - t0))
                times[key][1].append(1e3 * (t2 - t1))

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
        f"{args.queries} queries, {args.heads} heads, d {args.d_model}, levels "
        f"{'/'.join(f'{h}x{w}' for h, w in SHAPES)}, {args.points} points/level, "
        f"median of {args.repeats}, {args.clock} clock\n"
    )
    print("| op | method | value layout | forward ms | forward+backward ms |")
    print("|---|---|---|---:|---:|")
    for (what, method, layout), (fwd, fwd_bwd) in times.items():
        print(
            f"| {what} | {method} | {layout} | {statistics.median(fwd):.1f} "
            f"| {statistics.median(fwd_bwd):.1f} |"
        )


if __name__ == "__main__":
    main()
