"""W&B runs as ``Run``s: offline ``.wandb`` files (no network) or the W&B API (online).

The CSV log next to every run is the primary source; these readers are for runs that only
exist in W&B (another machine's runs, a sweep) or an offline run directory on its own.
History rows map to the CSV shape: ``trainer/global_step`` (what Lightning's WandbLogger logs)
is the step, ``epoch`` the epoch, every other non-underscore key a metric.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from .run_frame import Run, tidy_metrics

STEP_KEYS = ("trainer/global_step", "_step")
_HEADER = 7
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def history_to_frame(rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """W&B history rows -> the long ``Run.frame`` (``trainer/global_step`` as the step)."""
    records = []
    for row in rows:
        step = next((row[k] for k in STEP_KEYS if row.get(k) is not None), None)
        if step is None:
            continue
        record = {k: v for k, v in row.items() if not k.startswith("_") and k not in STEP_KEYS}
        record = {k: v for k, v in record.items() if isinstance(v, (int, float)) or k == "epoch"}
        record["step"] = int(step)
        records.append(record)
    wide = pd.DataFrame.from_records(records)
    if wide.empty:
        wide = pd.DataFrame({"step": pd.Series(dtype="int64")})
    return tidy_metrics(wide)


def _seed_of(name: str, config: dict[str, Any]) -> int | None:
    for key in ("seed_everything", "seed"):
        if isinstance(config.get(key), int):
            return config[key]
    match = re.search(r"-seed(\d+)$", name)  # cli.py names W&B runs "<name>-seed<S>"
    return int(match.group(1)) if match else None


def iter_wandb_records(data: bytes) -> Iterable[bytes]:
    """Raw records of a ``.wandb`` file: a 7-byte header, then 32 KiB blocks of chunks, each
    ``crc32c:u32, length:u16, type:u8`` + payload (a full record, or its first/middle/last part).
    """
    if data[:4] != b":W&B":
        raise ValueError("not a W&B run file (bad header)")
    pos, parts = _HEADER, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # block trailer too short for a chunk header: zero padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            parts = chunk
        elif kind == _MIDDLE:
            parts += chunk
        elif kind == _LAST:
            yield parts + chunk
            parts = b""


def load_wandb_file(path: str | Path) -> Run:
    """An offline run file (``wandb/offline-run-*/run-<id>.wandb``) -> ``Run``, no network."""
    from wandb.proto import wandb_internal_pb2 as pb

    path = Path(path)
    rows: list[dict[str, Any]] = []
    config: dict[str, Any] = {}
    name, group, tags = path.stem.removeprefix("run-"), None, []
    for raw in iter_wandb_records(path.read_bytes()):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            rows.append(row)
        elif kind == "run":
            name = record.run.display_name or name
            group = record.run.run_group or None
            tags = list(record.run.tags)
            for item in record.run.config.update:
                config[item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                config[item.key] = json.loads(item.value_json)
    config.pop("_wandb", None)
    return Run(
        name=name,
        path=str(path),
        frame=history_to_frame(rows),
        config=config,
        group=group,
        seed=_seed_of(name, config),
        tags=tags,
        source="wandb-offline",
    )


def _api_run_to_run(api_run: Any) -> Run:
    config = {k: v for k, v in dict(api_run.config).items() if not k.startswith("_")}
    return Run(
        name=api_run.name,
        path="/".join(api_run.path),
        frame=history_to_frame(api_run.scan_history()),
        config=config,
        group=api_run.group,
        seed=_seed_of(api_run.name, config),
        tags=list(api_run.tags),
        source="wandb",
    )


def load_wandb_api_run(path: str) -> Run:
    """``entity/project/run_id`` -> ``Run`` through ``wandb.Api`` (needs network and a login)."""
    import wandb

    return _api_run_to_run(wandb.Api().run(path))


def load_wandb_group(group: str, project: str | None = None) -> list[Run]:
    """All runs of a W&B group (``project``: ``entity/project``, default ``$WANDB_ENTITY/
    $WANDB_PROJECT`` or the project ``detr-lineage`` of the logged-in entity)."""
    import wandb

    if project is None:
        name = os.environ.get("WANDB_PROJECT", "detr-lineage")
        entity = os.environ.get("WANDB_ENTITY")
        project = f"{entity}/{name}" if entity else name
    api = wandb.Api()
    return [_api_run_to_run(r) for r in api.runs(project, filters={"group": group})]
