"""Reading back what W&B wrote in offline mode: ``<dir>/wandb/offline-run-<time>-<id>/run-<id>.wandb``.

The file is a record log in LevelDB's log format (a 7-byte header ``:W&B``, version; then
32 KiB blocks of chunks, each with a 7-byte header: checksum, length, type), each record a
``wandb_internal_pb2.Record`` protobuf. The wandb package no longer ships a reader for it.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    position, chunks = HEADER, []
    while position + HEADER <= len(data):
        left_in_block = BLOCK - position % BLOCK
        if left_in_block < HEADER:  # too small for a chunk header: zero padding
            position += left_in_block
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[position:position + HEADER])
        if kind == 0 and length == 0:
            position += left_in_block
            continue
        chunks.append(data[position + HEADER:position + HEADER + length])
        position += HEADER + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


@dataclass
class OfflineRun:
    folder: Path
    run_id: str = ""
    name: str = ""
    project: str = ""
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)  # one dict per history row, "_step" included

    def series(self, key: str) -> list[tuple[int, float]]:
        return [(row["_step"], row[key]) for row in self.history if key in row]


def read_offline_run(folder: Path) -> OfflineRun:
    (run_file,) = folder.glob("run-*.wandb")
    run = OfflineRun(folder)
    for record in records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id, run.name, run.project = record.run.run_id, record.run.display_name, record.run.project
            run.config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "config":
            run.config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            run.history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                for item in record.history.item})
    return run


def offline_runs(run_dir: Path) -> list[OfflineRun]:
    """Every attempt's offline run under ``<run>/wandb/``, oldest first."""
    return [read_offline_run(folder) for folder in sorted((run_dir / "wandb").glob("offline-run-*"))]
