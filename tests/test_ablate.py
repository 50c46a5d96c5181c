"""The ablation runner: the grid, the commands, skipping finished runs, resuming a killed one."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from detr_lineage.analysis import ablate
from detr_lineage.analysis.ablate import (
    cli_value,
    expand,
    load_spec,
    parse_spec,
    run_state,
    select,
    sweep_config,
)
from detr_lineage.analysis.resume import latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DETR = str(ROOT / "experiments/toy/detr.yaml")
DN_DETR = str(ROOT / "experiments/toy/dn_detr.yaml")
OFF = str(ROOT / "experiments/ablations/no_denoising.yaml")


def grid_spec(**extra) -> dict:
    return {
        "name": "t",
        "variants": {"detr": {"config": DETR, "denoising": "none"}, "dn_detr": DN_DETR},
        "denoising": [True, False],  # YAML's on / off
        "denoising_off_config": OFF,
        "seeds": [0, 1],
        "axes": {
            "preset": {
                "easy": {"data.init_args.preset": "easy"},
                "crowded": {
                    "data.init_args.preset": "crowded",
                    "model.init_args.net.num_queries": 40,
                },
            },
            "noise": {
                "when": {"denoising": "on"},
                "values": {"bn8": {"x.denoising.box_noise": 0.8}},
            },
        },
        "exclude": [{"variant": "detr", "preset": "crowded"}],
        "overrides": {"trainer.max_steps": 10, "model.init_args.net.num_queries": 20},
        **extra,
    }


def test_grid_names_groups_tags_configs_and_overrides():
    runs = expand(parse_spec(grid_spec()))
    names = [r.name for r in runs]
    assert names == [  # seeds outermost; single-valued axes (noise) stay out of the names
        "detr-dn_off-easy-s0",
        "dn_detr-dn_on-easy-s0",
        "dn_detr-dn_on-crowded-s0",
        "dn_detr-dn_off-easy-s0",
        "dn_detr-dn_off-crowded-s0",
        "detr-dn_off-easy-s1",
        "dn_detr-dn_on-easy-s1",
        "dn_detr-dn_on-crowded-s1",
        "dn_detr-dn_off-easy-s1",
        "dn_detr-dn_off-crowded-s1",
    ]
    by = {r.name: r for r in runs}
    on, off = by["dn_detr-dn_on-crowded-s1"], by["dn_detr-dn_off-crowded-s1"]
    assert on.group == "dn_detr-dn_on-crowded" and on.seed == 1
    assert on.tags == ["t", "dn_detr", "dn_on", "seed1", "crowded"]
    assert on.configs == [DN_DETR] and off.configs == [DN_DETR, OFF]
    assert by["detr-dn_off-easy-s0"].configs == [DETR]  # DETR: nothing to switch off
    # later wins: spec overrides, then the axes'; the `when` axis only where denoising is on
    assert dict(on.overrides) == {
        "trainer.max_steps": 10,
        "model.init_args.net.num_queries": 40,
        "data.init_args.preset": "crowded",
        "x.denoising.box_noise": 0.8,
    }
    assert "x.denoising.box_noise" not in dict(off.overrides)


def test_list_axis_labels_and_selection():
    spec = parse_spec({"variants": {"d": DETR}, "denoising": ["off"], "seeds": [3],
                       "axes": {"model.init_args.net.num_queries": [10, 30]},
                       "denoising_off_config": OFF})  # fmt: skip
    runs = expand(spec)
    assert [r.name for r in runs] == ["d-dn_off-num_queries10-s3", "d-dn_off-num_queries30-s3"]
    assert [r.name for r in select(runs, ["model.init_args.net.num_queries=num_queries30"])] == [
        "d-dn_off-num_queries30-s3"
    ]
    assert select(runs, ["seed=4"]) == []
    # a repeated key matches any of its values; other keys still all must match
    both = ["model.init_args.net.num_queries=num_queries30", "model.init_args.net.num_queries="
            "num_queries10"]  # fmt: skip
    assert [r.name for r in select(runs, both)] == [r.name for r in runs]
    assert select(runs, [*both, "seed=4"]) == []
    with pytest.raises(ValueError, match="key=value"):
        select(runs, ["seed"])


def test_spec_errors_and_optional_variants(tmp_path):
    bad = grid_spec()
    bad["axes"]["noise"] = {"bn8": {"model.init_args.net.denoising.box_noise": 0.8}}  # no `when`
    with pytest.raises(ValueError, match="turn denoising back on"):
        expand(parse_spec(bad))
    with pytest.raises(ValueError, match="unknown spec keys"):
        parse_spec({"variants": {"d": DETR}, "sedes": [1]})
    missing = {"variants": {"d": DETR, "r": {"config": "nope.yaml", "optional": True}}}
    spec = parse_spec(missing)
    assert [v.name for v in spec.variants] == ["d"] and "nope.yaml" in spec.notes[0]
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        parse_spec({"variants": {"r": "nope.yaml"}})
    assert load_spec(ROOT / "experiments/ablations/toy_main.yaml", ROOT).name == "toy_main"


def test_command_line():
    (run,) = select(expand(parse_spec(grid_spec())), ["name=dn_detr-dn_off-easy-s1"])
    cmd = run.command("out", checkpoint_every_n_steps=25, ckpt_path="out/x/last.ckpt")
    assert cmd[1:4] == ["-m", "detr_lineage", "fit"]
    assert cmd[4:8] == ["--config", DN_DETR, "--config", OFF]
    joined = " ".join(cmd)
    assert "--run.name dn_detr-dn_off-easy-s1 --run.group dn_detr-dn_off-easy" in joined
    assert '--run.tags ["t", "dn_detr", "dn_off", "seed1", "easy"]' in joined
    assert "--run.version 0 --seed_everything 1 --trainer.max_steps=10" in joined
    callback = json.loads(cmd[-3].split("=", 1)[1])
    assert callback == {
        "class_path": "detr_lineage.analysis.resume.ResumeCheckpoint",
        "init_args": {"every_n_steps": 25},
    }
    assert cmd[-2:] == ["--ckpt_path", "out/x/last.ckpt"]
    assert [cli_value(v) for v in (None, True, 0.5, "easy", [1, 2])] == [
        "null", "true", "0.5", "easy", "[1, 2]"
    ]  # fmt: skip


def test_sweep_covers_the_groups():
    sweep = sweep_config(parse_spec(grid_spec()), "spec.yaml")
    assert sweep["parameters"]["seed"]["values"] == [0, 1]
    assert sweep["parameters"]["group"]["values"][0] == "detr-dn_off-easy"
    assert len(sweep["parameters"]["group"]["values"]) == 5
    assert sweep["command"][-2:] == ["--only", "${args_no_hyphens}"]


def fake_checkpoint(path: Path, step: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step}, path)


def test_run_states(tmp_path):
    (run,) = expand(parse_spec({"variants": {"d": {"config": DETR, "denoising": "none"}}}))
    directory = run.version_dir(tmp_path)
    assert run_state(run, tmp_path).status == "new"
    directory.mkdir(parents=True)
    (directory / "metrics.csv").write_text("step\n0\n")
    assert run_state(run, tmp_path).status == "restart"
    (directory / "checkpoints").mkdir()
    (directory / "checkpoints" / "last.ckpt").write_bytes(b"truncated by a kill")
    assert run_state(run, tmp_path).status == "restart"  # unreadable checkpoints do not count
    fake_checkpoint(directory / "checkpoints" / "resume.ckpt", 8)
    fake_checkpoint(directory / "checkpoints" / "best-0-4.ckpt", 4)
    state = run_state(run, tmp_path)
    assert (state.status, state.checkpoint.name, state.step) == ("resume", "resume.ckpt", 8)
    fake_checkpoint(directory / "checkpoints" / "last.ckpt", 8)  # a tie: last.ckpt preferred
    assert latest_checkpoint(directory)[0].name == "last.ckpt"
    (directory / "DONE").write_text("{}")
    assert run_state(run, tmp_path).status == "done"


def test_execute_skips_done_resumes_and_restarts(tmp_path, monkeypatch):
    runs = expand(parse_spec({"variants": {"d": {"config": DETR, "denoising": "none"}},
                              "seeds": [0, 1, 2, 3]}))  # fmt: skip
    calls = []

    def fake_child(cmd, env=None):
        name = cmd[cmd.index("--run.name") + 1]
        calls.append((name, cmd[-1] if "--ckpt_path" in cmd else None))
        directory = tmp_path / name / "version_0"
        directory.mkdir(parents=True, exist_ok=True)
        return 3 if name.endswith("s3") else 0

    monkeypatch.setattr(ablate, "_run_child", fake_child)
    done, resumed, partial = (r.version_dir(tmp_path) for r in runs[:3])
    done.mkdir(parents=True)
    (done / "DONE").write_text(json.dumps({"command": ["python", "--other"]}))
    fake_checkpoint(resumed / "checkpoints" / "resume.ckpt", 6)
    partial.mkdir(parents=True)
    (partial / "metrics.csv").write_text("step\n0\n")
    lines = []
    failed = ablate.execute(runs, tmp_path, 4, log=lines.append)

    assert failed == ["d-dn_off-s3"]
    assert calls == [
        ("d-dn_off-s1", str(resumed / "checkpoints" / "resume.ckpt")),
        ("d-dn_off-s2", None),
        ("d-dn_off-s3", None),
    ]
    text = "\n".join(lines)
    assert "[1/4] d-dn_off-s0: finished earlier, skipped" in text
    assert "trained with other arguments" in text
    assert "[2/4] d-dn_off-s1: resuming from step 6 (resume.ckpt)" in text
    assert "[3/4] d-dn_off-s2: the earlier attempt left no checkpoint; starting over" in text
    assert "[4/4] d-dn_off-s3 FAILED with exit code 3" in text
    assert not (partial / "metrics.csv").exists()  # the partial attempt was cleared
    recorded = json.loads((resumed / "DONE").read_text())
    assert "--ckpt_path" in recorded["command"]
    assert not (runs[3].version_dir(tmp_path) / "DONE").exists()

    calls.clear()
    lines.clear()
    assert ablate.execute(runs, tmp_path, 4, log=lines.append) == ["d-dn_off-s3"]
    assert [c[0] for c in calls] == ["d-dn_off-s3"]
    assert sum("finished earlier, skipped" in line for line in lines) == 3
    notes = [line for line in lines if "other arguments" in line]
    assert len(notes) == 1 and "d-dn_off-s0" in notes[0]  # resumed runs count as the same


def test_parallel_jobs_share_the_cpu_and_finish_every_run(tmp_path, monkeypatch):
    runs = expand(parse_spec({"variants": {"d": {"config": DETR, "denoising": "none"}},
                              "seeds": [0, 1, 2]}))  # fmt: skip
    active, peak, threads = [0], [0], []
    lock = threading.Lock()

    def fake_child(cmd, env=None):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        threads.append(env["OMP_NUM_THREADS"])
        time.sleep(0.2)
        (tmp_path / cmd[cmd.index("--run.name") + 1] / "version_0").mkdir(parents=True)
        with lock:
            active[0] -= 1
        return 1 if "s1" in cmd[cmd.index("--run.name") + 1] else 0

    monkeypatch.setattr(ablate, "_run_child", fake_child)
    monkeypatch.setattr(ablate.os, "cpu_count", lambda: 4)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    lines = []
    assert ablate.execute(runs, tmp_path, 4, log=lines.append, jobs=2) == ["d-dn_off-s1"]
    assert peak[0] == 2 and threads == ["2", "2", "2"]
    assert [(r.version_dir(tmp_path) / "DONE").exists() for r in runs] == [True, False, True]


def test_dry_run_touches_nothing(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"variants": {"d": {"config": DETR, "denoising": "none"}}}))
    ablate.main([str(spec), "--dry-run", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "[1/1] d-dn_off-s0: to train" in out and "--run.name d-dn_off-s0" in out
    assert not (tmp_path / "out").exists()


# -- a real run, killed and resumed --------------------------------------------------------
def train_steps(csv_path: Path) -> list[int]:
    try:
        with open(csv_path, newline="") as f:
            return [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
    except (OSError, KeyError, ValueError):
        return []  # not written yet, or caught mid-write


@pytest.mark.slow
def test_killed_run_resumes_without_gap_or_repeat(tmp_path, monkeypatch, capsys):
    max_steps = 40
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "resume_test",
                "variants": {"detr": {"config": DETR, "denoising": "none"}},
                "seeds": [0],
                "overrides": {
                    "trainer.max_steps": max_steps,
                    "trainer.log_every_n_steps": 1,
                    "trainer.enable_progress_bar": False,
                    "trainer.enable_model_summary": False,
                    "data.init_args.num_train": 64,  # 16 steps per epoch: validations at 16, 32
                    "data.init_args.num_val": 8,
                    "data.init_args.batch_size": 4,
                    "data.init_args.num_workers": 0,
                    "model.init_args.net.d_model": 32,
                    "model.init_args.net.nhead": 4,
                    "model.init_args.net.dim_feedforward": 64,
                    "model.init_args.net.num_encoder_layers": 1,
                    "model.init_args.net.num_decoder_layers": 2,
                },
                "checkpoint_every_n_steps": 4,
            }
        )
    )
    out = tmp_path / "out"
    run_dir = out / "detr-dn_off-s0" / "version_0"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "detr_lineage", "ablate", str(spec), "--out", str(out)]
    first = subprocess.Popen(
        cmd, cwd=ROOT, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and first.poll() is None:
            steps = train_steps(run_dir / "metrics.csv")
            if (run_dir / "checkpoints" / "resume.ckpt").exists() and steps and max(steps) >= 5:
                break
            time.sleep(0.05)
        assert first.poll() is None, "the run ended before it could be interrupted"
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the runner and its training, like a power cut
        first.wait()
    killed_at = max(train_steps(run_dir / "metrics.csv"))
    assert not (run_dir / "DONE").exists()
    assert 5 <= killed_at < max_steps - 1

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ablate.main([str(spec), "--out", str(out)])
    log = capsys.readouterr().out
    assert "[1/1] detr-dn_off-s0: resuming from step" in log and "done (elapsed" in log
    steps = train_steps(run_dir / "metrics.csv")
    assert steps == list(range(max_steps)), f"killed at step {killed_at}: {steps}"
    assert json.loads((run_dir / "DONE").read_text())["command"][-2] == "--ckpt_path"
    with open(run_dir / "metrics.csv", newline="") as f:
        val_steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("val/map")]
    assert val_steps == [15, 31]  # one validation per epoch end, none repeated
    assert (out / "comparison" / "summary.md").is_file()

    before = (run_dir / "metrics.csv").read_bytes()
    ablate.main([str(spec), "--out", str(out), "--no-compare"])
    assert "[1/1] detr-dn_off-s0: finished earlier, skipped" in capsys.readouterr().out
    assert (run_dir / "metrics.csv").read_bytes() == before


def test_ablate_from_any_directory(tmp_path, monkeypatch, capsys):
    """Spec configs resolve next to the spec, then in the repository, never against the cwd."""
    spec_dir, elsewhere = tmp_path / "specs", tmp_path / "elsewhere"
    spec_dir.mkdir()
    elsewhere.mkdir()
    (spec_dir / "my_detr.yaml").write_text((ROOT / "experiments/toy/detr.yaml").read_text())
    spec = spec_dir / "grid.yaml"
    spec.write_text(
        "variants:\n"
        "  mine: {config: my_detr.yaml, denoising: none}\n"  # next to the spec
        "  dn_detr: {config: experiments/toy/dn_detr.yaml, denoising: [off]}\n"  # repository
        "seeds: [0]\n"
    )
    monkeypatch.chdir(elsewhere)
    ablate.main([str(spec), "--dry-run", "--out", "out"])
    log = capsys.readouterr().out
    mine = str(spec_dir / "my_detr.yaml")
    dn_detr, off = (str(ROOT / p) for p in ("experiments/toy/dn_detr.yaml", OFF))
    assert f"--config {mine} --run.name mine-dn_off-s0" in log
    assert f"--config {dn_detr} --config {off} --run.name dn_detr-dn_off-s0" in log
    assert not (elsewhere / "out").exists()  # a dry run writes nothing
