"""The run directory: resolved config, metrics.jsonl and the plain-text log."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import tomli_w

from .config import Config, to_dict

LOG = logging.getLogger("train")


def default_run_dir(job_id: str | None, timestamp: str) -> Path:
    """``runs/<job id>`` under SLURM (a requeued job finds its own directory), else a timestamp."""
    return Path("runs") / (job_id or timestamp)


def write_config(run_dir: Path, config: Config) -> Path:
    path = run_dir / "config.toml"
    path.write_text(tomli_w.dumps(to_dict(config)), encoding="utf-8")
    return path


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
        staging = self.path.with_name(self.path.name + ".tmp")
        with open(staging, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(record) + "\n" for record in records)
            f.flush()
            os.fsync(f.fileno())
        staging.replace(self.path)


def read_metrics(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


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
