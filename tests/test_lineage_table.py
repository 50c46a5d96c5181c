"""``detr-lineage lineage``: the paper data file, and the generated table on synthetic runs with
known numbers."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from detr_lineage.analysis import lineage
from detr_lineage.cli import main

ROOT = Path(__file__).resolve().parents[1]


def write_run(root: Path, group: str, seed: int, map50: dict[int, float]) -> None:
    """A run whose val/map_50 is ``map50[step]`` at each evaluation (0-based logger steps)."""
    directory = root / f"{group}-s{seed}" / "version_0"
    directory.mkdir(parents=True)
    with open(directory / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["epoch", "step", "val/map_50", "time/wall_s"])
        writer.writeheader()
        for step, value in map50.items():
            writer.writerow({"epoch": 0, "step": step, "val/map_50": value, "time/wall_s": step})
    config = {"seed_everything": seed, "run": {"name": f"{group}-s{seed}", "group": group}}
    (directory / "config.yaml").write_text(yaml.safe_dump(config))


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    # DINO, DN on: seed 0 reaches 0.1 at step 100 and 0.5 at 200; seed 1: 0.1 at 300, 0.5 never
    write_run(root, "dino-dn_on", 0, {99: 0.2, 199: 0.6, 299: 0.7})
    write_run(root, "dino-dn_on", 1, {99: 0.05, 199: 0.08, 299: 0.3})
    write_run(root, "detr-dn_off", 0, {99: 0.0, 199: 0.01, 299: 0.02})
    return root


def test_paper_file_has_every_field_and_our_configs_exist():
    papers = lineage.load_papers()
    names = [p["name"] for p in papers]
    assert names[:6] == [
        "DETR", "Deformable DETR", "Conditional DETR", "DAB-DETR", "DN-DETR", "DINO",
    ]  # fmt: skip
    for p in papers:
        ours = p.get("ours")
        if ours:
            assert (ROOT / "experiments/coco" / f"{ours['coco']}.yaml").is_file(), p["name"]
            toy = ours.get("toy")
            assert toy is None or (ROOT / "experiments/toy" / f"{toy}.yaml").is_file(), p["name"]
    spec = yaml.safe_load((ROOT / "experiments/ablations/toy_lineage.yaml").read_text())
    groups = {f"{v}-dn_{d}" for v in spec["variants"] for d in ("on", "off")}
    for p in papers:
        assert set((p.get("ours") or {}).get("groups") or []) <= groups, p["name"]


def test_bad_paper_file_is_named(tmp_path: Path):
    bad = tmp_path / "p.yaml"
    bad.write_text("papers:\n  - name: X\n    year: 2020\n")
    with pytest.raises(ValueError, match=r"p\.yaml: papers\[0\] \(X\) lacks \['venue'"):
        lineage.load_papers(bad)


def test_steps_to_thresholds_on_known_runs(runs: Path):
    stats = lineage.steps_to_thresholds(runs, [0.1, 0.5])
    mean, std, reached, n = stats["dino-dn_on"][0.1]
    assert (mean, reached, n) == (200.0, 2, 2) and std == pytest.approx(141.421, abs=1e-3)
    mean, std, reached, n = stats["dino-dn_on"][0.5]
    assert (mean, reached, n) == (200.0, 1, 2) and std != std  # one seed: no spread
    assert stats["detr-dn_off"][0.1][2:] == (0, 1)


def test_command_writes_the_table_with_paper_and_our_columns(runs: Path, tmp_path: Path):
    out = tmp_path / "lineage.md"
    main(["lineage", "--runs", str(runs), "--out", str(out), "--no-sizes",
          "--thresholds", "0.1", "0.5", "--note", "machine: test"])  # fmt: skip
    text = out.read_text()
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines()}
    assert "| 49.0 (12 ep), 50.4 (24 ep), 50.9 (36 ep) | 23 (A100) | 47M / 279" in rows["DINO"]
    assert rows["LW-DETR"].endswith("| not implemented | not implemented |")
    assert rows["dino-dn_on"] == "| dino-dn_on | 200 ± 141 (2/2) | 200 (1/2) |"
    assert rows["detr-dn_off"] == "| detr-dn_off | not reached (0/1) | not reached (0/1) |"
    assert rows["conditional_detr-dn_off"].endswith("| not run | not run |")
    assert "**Paper** columns are the papers'" in text and text.rstrip().endswith("machine: test")


def test_our_size_column_uses_the_papers_counting():
    papers = [p for p in lineage.load_papers() if p["name"] in ("DINO", "RT-DETRv2")]
    sizes = {"dino_r50": (46.88, 276.7), "rtdetrv2_r50": (42.89, 68.9)}
    text = lineage.render(papers, sizes, {"dino": 0.5}, {}, [0.5])
    assert "| 46.88M / 276.7 | 500 ms |" in text
    assert "| 42.89M / 137.8 | - |" in text  # RT-DETR counts 2 per multiply-add


def test_runs_of_several_directories_are_combined(tmp_path: Path):
    """The main job's runs (DETR) beside the lineage spec's (DINO): one table; a directory that
    holds neither group leaves the other rows as they are."""
    main_dir, lineage_dir, empty = tmp_path / "toy_main", tmp_path / "toy_lineage", tmp_path / "e"
    write_run(main_dir, "detr-dn_off", 0, {99: 0.2, 199: 0.6})
    write_run(main_dir, "detr-dn_off", 1, {99: 0.05, 199: 0.3, 299: 0.55})
    write_run(lineage_dir, "dino-dn_on", 0, {99: 0.0, 199: 0.15})
    empty.mkdir()
    out = tmp_path / "lineage.md"
    main(["lineage", "--runs", str(main_dir), str(lineage_dir), str(empty), "--out", str(out),
          "--no-sizes", "--thresholds", "0.1", "0.5"])  # fmt: skip
    rows = {line.split(" | ")[0].lstrip("| "): line for line in out.read_text().splitlines()}
    assert rows["detr-dn_off"] == "| detr-dn_off | 150 ± 71 (2/2) | 250 ± 71 (2/2) |"
    assert rows["dino-dn_on"] == "| dino-dn_on | 200 (1/1) | not reached (0/1) |"
    assert rows["deformable_detr-dn_off"].endswith("| not run | not run |")


def test_a_group_under_two_run_directories_or_a_missing_one_is_named(tmp_path: Path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    write_run(a, "detr-dn_off", 0, {99: 0.2})
    write_run(b, "detr-dn_off", 1, {99: 0.2})
    out = str(tmp_path / "lineage.md")
    with pytest.raises(SystemExit) as exit_info:
        main(["lineage", "--runs", str(a), str(b), "--out", out, "--no-sizes"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"run group detr-dn_off is under both {a} and {b}" in err
    with pytest.raises(SystemExit):
        main(["lineage", "--runs", str(a), str(tmp_path / "typo"), "--out", out, "--no-sizes"])
    assert f"--runs: no directory {tmp_path / 'typo'}" in capsys.readouterr().err
    assert not Path(out).exists()
