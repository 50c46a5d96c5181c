"""``detr-lineage ablate SPEC.yaml``: a grid of training runs, one after another, then compare.

A spec (see ``experiments/ablations/toy_main.yaml``) lists variants (base configs) x denoising
on/off x further axes x seeds. Each grid point is one ``python -m detr_lineage fit`` subprocess,
named from its axes (``dn_detr-dn_on-crowded-s1``), grouped without the seed
(``dn_detr-dn_on-crowded``), tagged, and written to ``<out>/<name>/version_0/``.

Re-running the same command continues the ablation: a run with a ``DONE`` marker (written after
a successful exit) is skipped; a run without one resumes (``--ckpt_path``) from its newest
readable checkpoint (``ResumeCheckpoint`` saves one every ``checkpoint_every_n_steps``), its
``metrics.csv`` continuing; a run that died before its first checkpoint starts over.
``snapshot_steps: [n, ...]`` keeps ``checkpoints/step_<n>.ckpt`` of every run
(``SnapshotCheckpoint``; the query-specialisation notebook's early model).
Seeds are the outer loop, so an ablation stopped half-way has every configuration once.

Works from any directory: a relative config path in a spec (``config``,
``denoising_off_config``) is looked for next to the spec, then in the repository
(``experiments/...``), then in the current directory; ``out`` (and ``--out``) is relative to
the current directory.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .resume import ResumeCheckpoint, SnapshotCheckpoint, latest_checkpoint
from .summary import format_duration

DONE_FILE = "DONE"
SPEC_KEYS = {
    "name",
    "out",
    "variants",
    "denoising",
    "denoising_off_config",
    "seeds",
    "axes",
    "exclude",
    "overrides",
    "checkpoint_every_n_steps",
    "snapshot_steps",
    "compare",
}
VARIANT_KEYS = {"config", "denoising", "overrides", "optional"}
DEFAULT_OFF_CONFIG = "experiments/ablations/no_denoising.yaml"


# -- the spec -------------------------------------------------------------------------------
def _onoff(value: Any) -> str:
    """YAML ``on``/``off`` are booleans; accept those, the strings and ``dn_on``/``dn_off``."""
    if value is True or str(value).lower() in ("on", "dn_on", "true"):
        return "on"
    if value is False or str(value).lower() in ("off", "dn_off", "false"):
        return "off"
    raise ValueError(f"denoising must be on or off, got {value!r}")


@dataclass
class Axis:
    """One further axis: label -> overrides; ``when`` restricts it to matching runs."""

    name: str
    values: dict[str, dict[str, Any]]
    when: dict[str, str] = field(default_factory=dict)


def _label(key: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    return f"{key.rsplit('.', 1)[-1]}{value}"


def parse_axis(name: str, body: Any) -> Axis:
    """``key: [v1, v2]`` (labels from the values) or ``name: {label: {key: value}}``, optionally
    ``name: {when: {denoising: on}, values: {label: {...}}}``."""
    when: dict[str, str] = {}
    if isinstance(body, dict) and "values" in body:
        when = {str(k): str(v) for k, v in (body.get("when") or {}).items()}
        if "denoising" in when:
            when["denoising"] = _onoff(body["when"]["denoising"])
        body = body["values"]
    if isinstance(body, list):
        values = {_label(name, v): {name: v} for v in body}
    elif isinstance(body, dict):
        values = {}
        for label, overrides in body.items():
            if not isinstance(overrides, dict):
                raise ValueError(f"axis {name!r}: {label!r} must map to overrides {{key: value}}")
            values[str(label)] = dict(overrides)
    else:
        raise ValueError(f"axis {name!r} must be a list of values or a mapping of labels")
    if not values:
        raise ValueError(f"axis {name!r} has no values")
    return Axis(name, values, when)


@dataclass
class Variant:
    name: str
    configs: list[str]
    denoising: list[str] | None  # None: the variant has no denoising (one setting, dn_off)
    overrides: dict[str, Any] = field(default_factory=dict)
    optional: bool = False


@dataclass
class Spec:
    name: str
    out: str
    variants: list[Variant]
    seeds: list[int]
    axes: list[Axis]
    exclude: list[dict[str, str]]
    overrides: dict[str, Any]
    denoising_off_config: str
    checkpoint_every_n_steps: int | None
    compare: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    snapshot_steps: list[int] = field(default_factory=list)  # keep checkpoints/step_<n>.ckpt


REPO_ROOT = Path(__file__).resolve().parents[2]  # the checkout holding experiments/


def spec_roots(spec_path: str | Path) -> list[Path]:
    """Where a spec's relative config paths are looked for, in order: the spec's own directory,
    the repository this package runs from (``experiments/...`` paths), the current directory."""
    roots = [Path(spec_path).resolve().parent]
    if (REPO_ROOT / "experiments").is_dir():
        roots.append(REPO_ROOT)
    return [*roots, Path.cwd()]


def _under(roots: Sequence[Path], path: str) -> str:
    """A relative config path -> the first root that has it (kept as given for root ``.``)."""
    path = str(path)
    if Path(path).is_absolute():
        return path
    for root in roots:
        if (root / path).is_file():
            return path if root == Path(".") else str(root / path)
    return path if roots[0] == Path(".") else str(roots[0] / path)


def parse_spec(
    raw: dict[str, Any], name: str = "ablation", root: str | Path | Sequence[Path] = "."
) -> Spec:
    """A spec mapping (a YAML file's content) -> ``Spec``; config paths are relative to ``root``
    (a directory, or directories searched in order; see ``spec_roots``).

    Variants whose config is missing are an error, unless marked ``optional`` (then dropped with
    a note: how the RT-DETRv2 entry waits for its config).
    """
    unknown = set(raw) - SPEC_KEYS
    if unknown:
        raise ValueError(f"unknown spec keys {sorted(unknown)}; valid: {sorted(SPEC_KEYS)}")
    roots = [Path(root)] if isinstance(root, str | Path) else [Path(r) for r in root]
    default_dn = [_onoff(v) for v in raw.get("denoising", ["on", "off"])]
    variants, notes = [], []
    for vname, body in (raw.get("variants") or {}).items():
        body = {"config": body} if isinstance(body, (str, list)) else dict(body or {})
        bad = set(body) - VARIANT_KEYS
        if bad:
            raise ValueError(
                f"variant {vname!r}: unknown keys {sorted(bad)}; valid: {VARIANT_KEYS}"
            )
        configs = body.get("config")
        configs = [configs] if isinstance(configs, str) else list(configs or [])
        if not configs:
            raise ValueError(f"variant {vname!r} needs a config")
        configs = [_under(roots, c) for c in configs]
        missing = [c for c in configs if not Path(c).is_file()]
        if missing and body.get("optional"):
            notes.append(f"variant {vname} skipped: {', '.join(missing)} does not exist yet")
            continue
        if missing:
            raise FileNotFoundError(f"variant {vname!r}: config {', '.join(missing)} not found")
        dn = body.get("denoising", default_dn)
        dn_list = None if dn in ("none", None) else [_onoff(v) for v in dn]
        variants.append(
            Variant(
                str(vname),
                configs,
                dn_list,
                dict(body.get("overrides") or {}),
                bool(body.get("optional")),
            )
        )
    if not variants:
        raise ValueError("the spec has no variants (or only optional ones whose config is missing)")
    axes = [parse_axis(str(k), v) for k, v in (raw.get("axes") or {}).items()]
    every = raw.get("checkpoint_every_n_steps", 50)
    return Spec(
        name=str(raw.get("name") or name),
        out=str(raw.get("out") or f"runs/{raw.get('name') or name}"),
        variants=variants,
        seeds=[int(s) for s in raw.get("seeds", [0])],
        axes=axes,
        exclude=[{str(k): str(v) for k, v in e.items()} for e in raw.get("exclude") or []],
        overrides=dict(raw.get("overrides") or {}),
        denoising_off_config=_under(roots, raw.get("denoising_off_config", DEFAULT_OFF_CONFIG)),
        checkpoint_every_n_steps=int(every) if every else None,
        compare=dict(raw.get("compare") or {}),
        notes=notes,
        snapshot_steps=[int(s) for s in raw.get("snapshot_steps") or []],
    )


def load_spec(path: str | Path, root: str | Path | None = None) -> Spec:
    """Read a spec file; relative config paths resolve against ``root`` if given, else against
    the spec's directory, the repository, the current directory (first match)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"ablation spec not found: {path}")
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    return parse_spec(raw, Path(path).stem, spec_roots(path) if root is None else root)


# -- the grid -------------------------------------------------------------------------------
def cli_value(value: Any) -> str:
    """A Python value as LightningCLI (jsonargparse, YAML) reads it back."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


@dataclass
class PlannedRun:
    """One grid point and the ``fit`` command that trains it."""

    name: str
    group: str
    variant: str
    denoising: str  # "on" | "off"
    seed: int
    labels: dict[str, str]  # axis -> label (only axes with more than one value)
    configs: list[str]
    overrides: list[tuple[str, Any]]
    tags: list[str]
    snapshot_steps: list[int] = field(default_factory=list)

    def axes(self) -> dict[str, str]:
        """Every coordinate, as ``--only`` and ``exclude`` match them."""
        return {
            "variant": self.variant,
            "denoising": self.denoising,
            "seed": str(self.seed),
            "group": self.group,
            "name": self.name,
            **self.labels,
        }

    def version_dir(self, out: str | Path) -> Path:
        return Path(out) / self.name / "version_0"

    def command(
        self,
        out: str | Path,
        checkpoint_every_n_steps: int | None = None,
        ckpt_path: str | Path | None = None,
        python: str = sys.executable,
    ) -> list[str]:
        cmd = [python, "-m", "detr_lineage", "fit"]
        for config in self.configs:
            cmd += ["--config", config]
        cmd += [
            "--run.name",
            self.name,
            "--run.group",
            self.group,
            "--run.tags",
            json.dumps(self.tags),
            "--run.dir",
            str(out),
            "--run.version",
            "0",
            "--seed_everything",
            str(self.seed),
        ]
        cmd += [f"--{key}={cli_value(value)}" for key, value in self.overrides]
        if checkpoint_every_n_steps:
            callback = {
                "class_path": f"{ResumeCheckpoint.__module__}.{ResumeCheckpoint.__name__}",
                "init_args": {"every_n_steps": checkpoint_every_n_steps},
            }
            cmd.append(f"--trainer.callbacks+={json.dumps(callback)}")
        if self.snapshot_steps:
            callback = {
                "class_path": f"{SnapshotCheckpoint.__module__}.{SnapshotCheckpoint.__name__}",
                "init_args": {"steps": list(self.snapshot_steps)},
            }
            cmd.append(f"--trainer.callbacks+={json.dumps(callback)}")
        if ckpt_path is not None:
            cmd += ["--ckpt_path", str(ckpt_path)]
        return cmd


def _matches(coords: dict[str, str], rule: dict[str, Any]) -> bool:
    """Whether ``coords`` has, for every key of ``rule``, its value (or one of its set)."""
    for key, value in rule.items():
        values = value if isinstance(value, set) else {value}
        wants = {_onoff(v) if key == "denoising" else str(v) for v in values}
        if coords.get(key) not in wants:
            return False
    return True


def expand(spec: Spec) -> list[PlannedRun]:
    """The grid, seeds outermost (a half-finished ablation covers every configuration once)."""
    runs: list[PlannedRun] = []
    multi = {a.name for a in spec.axes if len(a.values) > 1}
    for seed in spec.seeds:
        for variant in spec.variants:
            for dn in variant.denoising or ["off"]:
                coords = {"variant": variant.name, "denoising": dn, "seed": str(seed)}
                active = [a for a in spec.axes if _matches(coords, a.when)]
                for combo in itertools.product(*(list(a.values.items()) for a in active)):
                    labels = {a.name: label for a, (label, _) in zip(active, combo)}
                    named = [labels[a.name] for a in active if a.name in multi]
                    group = "-".join([variant.name, f"dn_{dn}", *named])
                    run = PlannedRun(
                        name=f"{group}-s{seed}",
                        group=group,
                        variant=variant.name,
                        denoising=dn,
                        seed=seed,
                        labels={a.name: labels[a.name] for a in active if a.name in multi},
                        configs=list(variant.configs),
                        overrides=[],
                        tags=[spec.name, variant.name, f"dn_{dn}", f"seed{seed}", *named],
                        snapshot_steps=list(spec.snapshot_steps),
                    )
                    if any(_matches({**run.axes(), **labels}, e) for e in spec.exclude):
                        continue
                    if dn == "off" and variant.denoising is not None:
                        run.configs.append(spec.denoising_off_config)
                    overrides = {**spec.overrides, **variant.overrides}
                    for _, values in combo:
                        overrides.update(values)
                    clash = [
                        k
                        for k, v in overrides.items()
                        if dn == "off" and (".denoising." in k or (k.endswith(".denoising") and v))
                    ]
                    if clash and variant.denoising is not None:
                        raise ValueError(
                            f"{run.name}: override {clash[0]} would turn denoising back on in a "
                            "dn_off run; restrict its axis with `when: {denoising: on}`"
                        )
                    run.overrides = list(overrides.items())
                    runs.append(run)
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError("two grid points got the same name; give the axes distinct labels")
    return runs


def select(runs: Sequence[PlannedRun], only: Sequence[str]) -> list[PlannedRun]:
    """Keep the runs matching every key of ``key=value`` (keys: variant, denoising, seed, group,
    name, or an axis name); a key given more than once matches any of its values
    (``variant=dino variant=deformable_detr``)."""
    rule: dict[str, set[str]] = {}
    for item in only:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--only takes key=value, got {item!r}")
        rule.setdefault(key.lstrip("-"), set()).add(value)
    return [r for r in runs if _matches(r.axes(), rule)]


# -- state of a run on disk -----------------------------------------------------------------
@dataclass
class RunState:
    status: str  # "done" | "resume" | "restart" | "new"
    checkpoint: Path | None = None
    step: int | None = None
    done: dict[str, Any] | None = None


def run_state(run: PlannedRun, out: str | Path) -> RunState:
    """Done (``DONE`` marker), resumable (a readable checkpoint), restart (a partial run without
    one) or new."""
    directory = run.version_dir(out)
    marker = directory / DONE_FILE
    if marker.is_file():
        try:
            info = json.loads(marker.read_text() or "{}")
        except json.JSONDecodeError:
            info = {}
        return RunState("done", done=info)
    if not directory.exists():
        return RunState("new")
    latest = latest_checkpoint(directory)
    if latest is None:
        return RunState("restart")
    return RunState("resume", checkpoint=latest[0], step=latest[1])


def _comparable(cmd: Sequence[str]) -> list[str]:
    """A command without the interpreter and ``--ckpt_path`` (to compare a DONE's command)."""
    out, skip = [], False
    for arg in list(cmd)[1:]:
        if skip:
            skip = False
            continue
        if arg == "--ckpt_path":
            skip = True
            continue
        out.append(arg)
    return out


# -- running --------------------------------------------------------------------------------
class _Terminated(Exception):
    pass


def _raise_terminated(signum, frame) -> None:
    raise _Terminated


_children: set[subprocess.Popen] = set()  # trainings in flight, stopped together on Ctrl-C


def _stop_children() -> None:
    """SIGINT every training in flight (Lightning then stops gracefully; checkpoints stay)."""
    procs = [p for p in list(_children) if p.poll() is None]
    for proc in procs:
        proc.send_signal(signal.SIGINT)
    for proc in procs:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _run_child(cmd: list[str], env: dict[str, str] | None = None) -> int:
    """Run one training; Ctrl-C / SIGTERM stop it gracefully (its last checkpoint stays)."""
    proc = subprocess.Popen(cmd, env=env)
    _children.add(proc)
    try:
        return proc.wait()
    except (KeyboardInterrupt, _Terminated):
        _stop_children()
        raise
    finally:
        _children.discard(proc)


def child_env(jobs: int, env: dict[str, str] | None = None) -> dict[str, str] | None:
    """With ``jobs`` trainings at once, give each ``cpu_count // jobs`` torch threads
    (oversubscribed CPU threads make every step several times slower)."""
    if jobs <= 1:
        return env
    env = dict(os.environ if env is None else env)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    return env


def execute(
    runs: Sequence[PlannedRun],
    out: str | Path,
    checkpoint_every_n_steps: int | None = None,
    dry_run: bool = False,
    log=print,
    env: dict[str, str] | None = None,
    jobs: int = 1,
) -> list[str]:
    """Train the runs not finished yet, in order, ``jobs`` at a time; returns the failed names.

    ``jobs > 1`` trains several runs at once (each with a share of the CPU threads): more
    throughput on a CPU, but each run's wall-time axis is then measured under contention.
    """
    start, failed, durations = time.monotonic(), [], []
    total = len(runs)
    width = len(str(total))
    todo = []
    for i, run in enumerate(runs, 1):
        head = f"[{i:>{width}}/{total}] {run.name}"
        state = run_state(run, out)
        directory = run.version_dir(out)
        if state.status == "done":
            log(f"{head}: finished earlier, skipped")
            recorded = (state.done or {}).get("command")
            now = run.command(out, checkpoint_every_n_steps)
            if recorded and _comparable(recorded) != _comparable(now):
                log(
                    f"{head}: note: it was trained with other arguments; delete {directory} to redo"
                )
            continue
        ckpt = state.checkpoint if state.status == "resume" else None
        cmd = run.command(out, checkpoint_every_n_steps, ckpt)
        if dry_run:
            what = {"new": "to train", "restart": "to restart (no checkpoint)"}.get(state.status)
            what = what or f"to resume from step {state.step} ({ckpt.name})"
            log(f"{head}: {what}\n    {shlex.join(cmd)}")
            continue
        todo.append((head, run, state, cmd))

    lock, stopping = threading.Lock(), threading.Event()
    env = child_env(jobs, env)

    def train(item: tuple, position: int) -> None:
        head, run, state, cmd = item
        directory = run.version_dir(out)
        if stopping.is_set():
            return
        with lock:
            if state.status == "resume":
                log(f"{head}: resuming from step {state.step} ({state.checkpoint.name})")
            elif state.status == "restart":
                log(f"{head}: the earlier attempt left no checkpoint; starting over")
                shutil.rmtree(directory)
            eta = ""
            if durations:
                left = sum(durations) / len(durations) * (len(todo) - position) / jobs
                eta = f", ~{format_duration(left)} left"
            log(f"{head} ... (elapsed {format_duration(time.monotonic() - start)}{eta})")
            log(f"    {shlex.join(cmd)}")
        t0 = time.monotonic()
        code = _run_child(cmd, env)
        took = time.monotonic() - t0
        if stopping.is_set():
            return  # stopped by Ctrl-C / SIGTERM: not finished, whatever its exit code
        with lock:
            elapsed = format_duration(time.monotonic() - start)
            if code == 0:
                durations.append(took)
                info = {"command": cmd, "duration_s": round(took, 1), "finished": time.ctime()}
                (directory / DONE_FILE).write_text(json.dumps(info, indent=1) + "\n")
                log(f"{head} done (elapsed {elapsed}, run {format_duration(took)})")
            else:
                failed.append(run.name)
                log(
                    f"{head} FAILED with exit code {code} (elapsed {elapsed}, run "
                    f"{format_duration(took)}); the same command resumes it"
                )

    if jobs <= 1:
        for position, item in enumerate(todo):
            train(item, position)
        return failed
    pool = ThreadPoolExecutor(jobs)
    try:
        for future in [pool.submit(train, item, k) for k, item in enumerate(todo)]:
            future.result()
    except (KeyboardInterrupt, _Terminated):
        stopping.set()
        pool.shutdown(wait=False, cancel_futures=True)
        _stop_children()
        raise
    pool.shutdown()
    return sorted(failed, key=[r.name for r in runs].index)


def run_spec(
    spec: Spec,
    out: str | Path | None = None,
    only: Sequence[str] = (),
    dry_run: bool = False,
    compare_runs: bool = True,
    log=print,
    env: dict[str, str] | None = None,
    jobs: int = 1,
) -> tuple[list[PlannedRun], list[str]]:
    """Expand, train what is missing, compare into ``<out>/comparison``; -> (runs, failed)."""
    out = Path(out or spec.out)
    runs = expand(spec)
    if only:
        runs = select(runs, only)
        if not runs:
            log(f"no grid point matches {' '.join(only)}")
            return [], []
    for note in spec.notes:
        log(f"note: {note}")
    log(f"{spec.name}: {len(runs)} runs into {out}")
    try:  # SIGTERM (a scheduler, `kill`): stop the training gracefully, like Ctrl-C
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        failed = execute(runs, out, spec.checkpoint_every_n_steps, dry_run, log, env, jobs)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if dry_run or not compare_runs:
        return runs, failed
    existing = [str(out / r.name) for r in runs if (r.version_dir(out) / "metrics.csv").is_file()]
    if existing:
        from .compare import compare

        opts = dict(spec.compare)
        baseline = opts.get("baseline")
        if baseline is not None and baseline not in {r.group for r in runs}:
            log(f"note: baseline {baseline} is not in this grid; using the first group")
            baseline = None
        result = compare(
            existing,
            out / "comparison",
            baseline=baseline,
            thresholds=opts.get("thresholds", (0.25, 0.5)),
            metric=opts.get("metric", "val/map_50"),
        )
        log(result.markdown)
        log(f"comparison of {len(existing)} runs -> {out / 'comparison'}")
    if failed:
        log(f"{len(failed)} run(s) failed: {', '.join(failed)}")
    return runs, failed


# -- W&B sweep ------------------------------------------------------------------------------
def sweep_config(spec: Spec, spec_path: str) -> dict[str, Any]:
    """A W&B grid sweep over the same runs: each agent call trains one grid point through
    ``detr-lineage ablate SPEC --only group=... seed=...`` (the same ``fit`` command, names,
    groups and tags as a local ablation). Groups, not raw axes, are swept: a grid of
    variant x denoising would include points that do not exist (DETR has no denoising)."""
    groups = list(dict.fromkeys(r.group for r in expand(spec)))
    return {
        "program": "detr-lineage",
        "method": "grid",
        "metric": {"name": "val/map", "goal": "maximize"},
        "parameters": {"group": {"values": groups}, "seed": {"values": list(spec.seeds)}},
        "command": [
            "${env}",
            "WANDB_MODE=online",
            "${program}",
            "ablate",
            spec_path,
            "--no-compare",
            "--only",
            "${args_no_hyphens}",
        ],
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="detr-lineage ablate",
        description="Train a grid of runs (skipping finished ones, resuming interrupted ones), "
        "then compare them.",
    )
    parser.add_argument("spec", help="ablation spec YAML (experiments/ablations/*.yaml)")
    parser.add_argument("--out", default=None, help="root of the runs (default: the spec's out)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and commands")
    parser.add_argument(
        "--only",
        nargs="+",
        default=(),
        metavar="KEY=VALUE",
        help="train only matching grid points (variant, denoising, seed, group, name, axis)",
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="seeds to run instead of the spec's"
    )
    parser.add_argument("--no-compare", action="store_true", help="skip the comparison")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="trainings at once, each with cpu_count/jobs torch threads (default 1; wall-time "
        "curves of concurrent runs are measured under contention)",
    )
    parser.add_argument(
        "--write-sweep",
        metavar="PATH",
        default=None,
        help="write the W&B sweep file of this grid and exit",
    )
    return parser


def main(argv: list[str]) -> None:
    """Entry point of ``detr-lineage ablate``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    spec = load_spec(args.spec)
    if args.seeds:
        spec.seeds = list(args.seeds)
    if args.write_sweep:
        header = (
            f"# W&B grid sweep over the runs of {args.spec}, one agent call per run, each the\n"
            "# same `fit` command (names, groups, tags) as a local `detr-lineage ablate`.\n"
            f"# Written by: detr-lineage ablate {args.spec} --write-sweep {args.write_sweep}\n"
            "# (re-run it when the spec changes). Use: wandb sweep <this file>; wandb agent <id>\n"
        )
        body = yaml.safe_dump(sweep_config(spec, args.spec), sort_keys=False)
        Path(args.write_sweep).write_text(header + body)
        print(f"wrote {args.write_sweep}")
        return
    os.environ.setdefault("WANDB_MODE", "offline")
    try:
        _, failed = run_spec(
            spec, args.out, args.only, args.dry_run, not args.no_compare, jobs=args.jobs
        )
    except (KeyboardInterrupt, _Terminated):
        print("\ninterrupted; run the same command again to resume", file=sys.stderr)
        sys.exit(130)
    if failed:
        sys.exit(1)
