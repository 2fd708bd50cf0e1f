"""The run directory: resolved config, metrics.jsonl and the plain-text log."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import tomli_w

from .config import Config, to_dict
from .errors import UserError
from .files import write_atomically

LOG = logging.getLogger("train")


def default_run_dir(job_id: str | None, timestamp: str) -> Path:
    """``runs/<job id>`` under SLURM (a requeued job finds its own directory), else a timestamp."""
    return Path("runs") / (job_id or timestamp)


def write_config(run_dir: Path, config: Config) -> Path:
    return write_atomically(run_dir / "config.toml", tomli_w.dumps(to_dict(config)))


class MetricsLog:
    """Appends one JSON object per evaluation to ``metrics.jsonl``, flushed to disk each time."""

    def __init__(self, path: Path):
        self.path = path

    def append(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def rewrite(self, records: list[dict]) -> None:
        """Replace the file's records (on resume: with those the checkpoint knew of)."""
        write_atomically(self.path, "".join(json.dumps(record) + "\n" for record in records), fsync=True)


# Keys every record has; the report relies on them.
RECORD_KEYS = frozenset({"epoch", "step", "val_acc1", "val_acc5", "train_time_s"})


def read_metrics(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` ([] when there is none yet), each checked."""
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: line {number} is not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}: line {number} is not a JSON object")
        missing = RECORD_KEYS - record.keys()
        if missing:
            raise UserError(f"{path}: line {number} lacks {', '.join(sorted(missing))}")
        records.append(record)
    return records


def setup_logging(run_dir: Path | None, is_main_process: bool) -> None:
    """Console and ``train.log`` for the main process; other processes report warnings only."""
    LOG.handlers.clear()
    LOG.propagate = False
    LOG.setLevel(logging.INFO if is_main_process else logging.WARNING)
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    LOG.addHandler(console)
    if run_dir is not None and is_main_process:
        file_handler = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        LOG.addHandler(file_handler)
