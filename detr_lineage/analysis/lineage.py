"""``detr-lineage lineage``: the course's comparison table, generated into ``docs/lineage.md``.

Paper columns come from ``docs/lineage_papers.yaml`` (each number with its source); our columns
are measured here: parameters and multiply-adds of our COCO config (built on the meta device,
one image of the paper's input size), CPU time of one training step of our toy config
(``--step-time N`` steps each, round-robin over the variants in one process), and the steps
each toy run group needed to reach each mAP@0.5 threshold (mean ± sample std over seeds, from
the runs under the ``--runs`` directories, e.g. ``runs/toy_main runs/toy_lineage``).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
PAPERS = ROOT / "docs" / "lineage_papers.yaml"
REQUIRED = ("name", "year", "venue", "trick", "results", "params_m", "gflops", "fps", "cite")
# the input our multiply-adds are counted at: the papers' 800-short-side average stand-in
COUNT_SIZE = {"dino_r50": (800, 1280), "rtdetrv2_r50": (640, 640)}
DEFAULT_SIZE = (800, 1066)
DEFAULT_RUNS = "runs/toy_lineage"


def load_papers(path: str | Path = PAPERS) -> list[dict]:
    """The paper rows, each checked for every field (the file and row are named on error)."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    rows = data.get("papers")
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{path}: expected a non-empty 'papers' list")
    for i, row in enumerate(rows):
        missing = [k for k in REQUIRED if k not in row]
        if missing:
            raise ValueError(f"{path}: papers[{i}] ({row.get('name', '?')}) lacks {missing}")
        for result in row["results"]:
            if "ap" not in result or "epochs" not in result:
                raise ValueError(f"{path}: {row['name']}: each result needs epochs and ap")
    return rows


def build_from_yaml(path: Path):
    """The LightningModule of a config file's ``model`` section, at random init."""
    from ..explain import build_model

    return build_model(yaml.safe_load(path.read_text()))


def coco_size(config: str) -> tuple[float, float]:
    """(parameters in M, forward GMACs) of ``experiments/coco/<config>.yaml``'s network."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    net = build_from_yaml(ROOT / "experiments" / "coco" / f"{config}.yaml").net.to("meta").eval()
    h, w = COUNT_SIZE.get(config, DEFAULT_SIZE)
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        net(torch.empty(1, 3, h, w), torch.zeros(1, h, w, dtype=torch.bool))
    return sum(p.numel() for p in net.parameters()) / 1e6, counter.get_total_flops() / 2e9


def toy_step_times(toys: Sequence[str], steps: int, rounds: int = 2) -> dict[str, float]:
    """Median seconds per training step (forward, loss, backward, AdamW) of each toy config on
    one fixed batch, measured round-robin (``rounds`` x ``steps`` each) so that load on the
    machine falls on every variant alike."""
    import torch

    from ..data.toy_shapes import ToyShapesDataModule

    models, batches, times = {}, {}, {t: [] for t in toys}
    for toy in toys:
        path = ROOT / "experiments" / "toy" / f"{toy}.yaml"
        torch.manual_seed(0)
        models[toy] = build_from_yaml(path).train()
        data = yaml.safe_load(path.read_text())["data"]["init_args"]
        dm = ToyShapesDataModule(**{**data, "num_workers": 0, "num_train": data["batch_size"]})
        dm.setup("fit")
        batches[toy] = next(iter(dm.train_dataloader()))
    optimizers = {t: torch.optim.AdamW(m.parameters(), lr=1e-4) for t, m in models.items()}
    for _ in range(rounds):
        for toy in toys:
            model, batch = models[toy], batches[toy]
            for _ in range(steps):
                t0 = time.perf_counter()
                out = model.net(batch["images"], batch["masks"], batch["targets"])
                loss = model.criterion(out, batch["targets"])["loss"]
                optimizers[toy].zero_grad()
                loss.backward()
                optimizers[toy].step()
                times[toy].append(time.perf_counter() - t0)
    return {t: sorted(v)[len(v) // 2] for t, v in times.items()}


def steps_to_thresholds(
    runs_dirs: str | Path | Sequence[str | Path],
    thresholds: Sequence[float],
    metric: str = "val/map_50",
) -> dict[str, dict[float, tuple[float, float, int, int]]]:
    """Per run group: threshold -> (mean steps, std steps, seeds that reached it, seeds).

    ``runs_dirs``: one or more directories of runs (e.g. the main job's and the lineage
    spec's); a directory that does not exist has no runs. A group found under two of them is
    an error (its seeds would count twice).
    """
    from .runs import group_runs, load_runs
    from .summary import first_reach

    dirs = [runs_dirs] if isinstance(runs_dirs, str | Path) else list(runs_dirs)
    groups: dict[str, list] = {}
    found_in: dict[str, Path] = {}
    for directory in map(Path, dirs):
        if not directory.is_dir():
            continue
        for group, runs in group_runs(load_runs([directory])).items():
            if group in found_in:
                raise ValueError(
                    f"run group {group} is under both {found_in[group]} and {directory}: "
                    "pass only one of them (or move one group's runs away)"
                )
            found_in[group], groups[group] = directory, runs
    out: dict[str, dict[float, tuple[float, float, int, int]]] = {}
    for group, runs in groups.items():
        per_t = {}
        for t in thresholds:
            steps = []
            for run in runs:
                hit = first_reach(run.series(metric), t)
                if hit is not None:
                    steps.append(float(hit["steps"]))
            mean = sum(steps) / len(steps) if steps else math.nan
            std = (
                math.sqrt(sum((s - mean) ** 2 for s in steps) / (len(steps) - 1))
                if len(steps) > 1
                else math.nan
            )
            per_t[t] = (mean, std, len(steps), len(runs))
        out[group] = per_t
    return out


def _fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _steps_cell(stat: tuple[float, float, int, int] | None) -> str:
    if stat is None:
        return "not run"
    mean, std, reached, n = stat
    if reached == 0:
        return f"not reached (0/{n})"
    spread = "" if math.isnan(std) else f" ± {std:.0f}"
    return f"{mean:.0f}{spread} ({reached}/{n})"


def render(
    papers: Sequence[dict],
    sizes: Mapping[str, tuple[float, float]],
    step_times: Mapping[str, float],
    steps: Mapping[str, Mapping[float, tuple[float, float, int, int]]],
    thresholds: Sequence[float],
    note: str = "",
) -> str:
    """The Markdown of docs/lineage.md."""
    lines = [
        "# The DETR lineage: papers and this project",
        "",
        "Generated by `detr-lineage lineage` from `docs/lineage_papers.yaml` (paper numbers, each "
        "with its source) and our own measurements. **Paper** columns are the papers' (COCO "
        "val2017, ResNet-50 unless noted); **ours** columns are measured by this project. "
        "Our GFLOPs are multiply-adds of our COCO config at random init for one image of "
        "800x1066 (the papers' average over COCO val at short side 800), 800x1280 for DINO "
        "(its benchmark's size) and 640x640 for RT-DETRv2, counted 2 per multiply-add as it "
        "does; the toy train step is the median CPU time of one fp32 step (forward, loss, "
        "backward, AdamW) of our toy config, batch 32 of 64 px images, measured round-robin.",
        "",
        "| model | year | key trick | paper: COCO AP (epochs) | paper: FPS (GPU) "
        "| paper: params / GFLOPs | ours: params / GFLOPs (COCO config) "
        "| ours: toy train step (CPU) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in papers:
        results = ", ".join(
            f"{r['ap']} ({r['epochs'] if r['epochs'] is not None else '?'} ep"
            + (f", {r['note']}" if r.get("note") else "")
            + ")"
            for r in p["results"]
        )
        paper_size = f"{_fmt(p['params_m'], 0)}M / {_fmt(p['gflops'], 0)}"
        if p.get("gflops_note"):
            paper_size += f" ({p['gflops_note']})"
        ours = p.get("ours") or {}
        size = sizes.get(ours.get("coco", ""))
        per_mac = ours.get("flops_per_mac", 1)  # the paper's counting (RT-DETR: 2 per MAC)
        our_size = f"{size[0]:.2f}M / {size[1] * per_mac:.1f}" if size else "-"
        step = step_times.get(ours.get("toy", ""))
        our_step = f"{step * 1000:.0f} ms" if step else "-"
        if not ours:
            our_size = our_step = "not implemented"
        lines.append(
            f"| {p['name']} | {p['year']} | {p['trick']} | {results} | {p['fps'] or '-'} "
            f"| {paper_size} | {our_size} | {our_step} |"
        )
    lines += ["", "Sources of the paper numbers:", ""]
    lines += [f"- {p['name']} ({p['venue']}): {p['cite']}" for p in papers]
    lines += [
        "",
        "## Ours: optimiser steps to val mAP@0.5 on toy shapes",
        "",
        "From the runs of `experiments/ablations/toy_main.yaml` and `toy_lineage.yaml` "
        "(`detr-lineage ablate`; same overrides and wall-time budget, same group names): the "
        "optimiser steps at the first evaluation where val mAP@0.5 >= the threshold, mean ± "
        "sample std over the seeds that reached it (reached / seeds).",
        "",
        "| run group | " + " | ".join(f">= {t:g}" for t in thresholds) + " |",
        "|---|" + "---:|" * len(thresholds),
    ]
    groups = [g for p in papers for g in ((p.get("ours") or {}).get("groups") or [])]
    for group in dict.fromkeys(groups):
        cells = [_steps_cell((steps.get(group) or {}).get(t)) for t in thresholds]
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="detr-lineage lineage", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--papers", default=str(PAPERS), help="the paper numbers (YAML)")
    parser.add_argument("--runs", nargs="+", default=None, metavar="DIR",
                        help="run directories, combined (default: runs/toy_lineage if it exists; "
                        "e.g. runs/toy_main runs/toy_lineage)")  # fmt: skip
    parser.add_argument("--out", default=str(ROOT / "docs" / "lineage.md"))
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.05, 0.1, 0.5])
    parser.add_argument("--step-time", type=int, default=0, metavar="N",
                        help="time N training steps per toy config (0: no column)")  # fmt: skip
    parser.add_argument("--no-sizes", action="store_true", help="skip the COCO size column")
    parser.add_argument("--note", default="", help="a line at the end (machine, load, seeds)")
    args = parser.parse_args(argv)
    try:
        papers = load_papers(args.papers)
    except (OSError, ValueError) as err:
        parser.exit(2, f"detr-lineage lineage: error: {err}\n")
    missing = [d for d in args.runs or [] if not Path(d).is_dir()]
    if missing:
        parser.exit(2, f"detr-lineage lineage: error: --runs: no directory {missing[0]}\n")
    try:
        steps = steps_to_thresholds(args.runs or [DEFAULT_RUNS], args.thresholds)
    except ValueError as err:
        parser.exit(2, f"detr-lineage lineage: error: {err}\n")
    ours = [p["ours"] for p in papers if p.get("ours")]
    sizes = {} if args.no_sizes else {o["coco"]: coco_size(o["coco"]) for o in ours}
    toys = list(dict.fromkeys(o["toy"] for o in ours if o.get("toy")))
    times = toy_step_times(toys, args.step_time) if args.step_time > 0 else {}
    text = render(papers, sizes, times, steps, args.thresholds, args.note)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")
