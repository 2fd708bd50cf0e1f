"""Weights & Biases alongside TensorBoard (``[log] wandb_on``), through Accelerate's W&B tracker.

It receives what TensorBoard receives (``tracking.RunTracker`` logs to both): the same
scalars at the same steps, and the flattened config. The W&B project is ``[log] wandb_project``,
or ``[log] project`` when that is empty (the seed's files use either); the W&B run is named
after the run directory, and its files go into ``<run>/wandb/``, or ``$WANDB_DIR/wandb/`` where the
user sets ``WANDB_DIR``, as W&B's own scripts do. ``WANDB_MODE=offline`` keeps
everything there for a later ``wandb sync``; ``WANDB_ENTITY`` picks the team.

Every attempt of a run (a requeued job, a rerun after a crash) continues the same W&B run:
``<run>/wandb.json`` keeps its id and the last step sent to it. W&B's history only grows, so a
resumed attempt sends only the steps after that one; the steps it repeats from its checkpoint
up to there keep the values the interrupted attempt sent (the same computation).

The ``wandb`` package is an optional extra: ``pip install 'imagenet-trainer[wandb]'``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
from pathlib import Path

from accelerate.tracking import WandBTracker, on_main_process

from .config import LogConfig
from .errors import UserError, first_line
from .files import write_json

STATE_FILE = "wandb.json"
INSTALL_HINT = "pip install 'imagenet-trainer[wandb]' (or pip install wandb)"


def project_name(log: LogConfig) -> str:
    return log.wandb_project or log.project


def check_supported(log: LogConfig, source: str) -> None:
    """Start-up check: asking for W&B without the package is a one-line error."""
    if log.wandb_on and not _wandb_installed():
        raise UserError(f"{source}: train.log.wandb_on = true needs the wandb package, which is not installed: "
                        f"{INSTALL_HINT}")


def _wandb_installed() -> bool:
    return importlib.util.find_spec("wandb") is not None


class ResumingWandBTracker(WandBTracker):
    """Accelerate's W&B tracker, continuing the run directory's W&B run across attempts."""

    def __init__(self, run_dir: Path, project: str):
        # W&B's own files follow WANDB_DIR where the user set it (a scratch disk, say); the
        # resume state below always stays with the run it belongs to.
        super().__init__(project, name=run_dir.name, dir=os.environ.get("WANDB_DIR") or str(run_dir),
                         resume="allow")
        self.state_file = run_dir / STATE_FILE
        self.state: dict = {}
        self.first_new_step = 0  # steps below this one are in the W&B run already

    @on_main_process
    def start(self):
        import wandb

        try:
            self.state = json.loads(self.state_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.state = {"id": secrets.token_hex(6), "logged_through": -1}  # W&B ids: letters and digits
        self.first_new_step = self.state["logged_through"] + 1
        self.init_kwargs["id"] = self.state["id"]
        write_json(self.state_file, self.state)
        try:
            super().start()
        except wandb.errors.Error as exc:
            raise UserError(f"Weights & Biases: {first_line(exc)} (train.log.wandb_on = true); log in with "
                            "`wandb login` or WANDB_API_KEY, or set WANDB_MODE=offline and run `wandb sync` "
                            "later") from None

    @on_main_process
    def log(self, values: dict, step: int | None = None, **kwargs):
        if step is not None and step < self.first_new_step:
            return
        super().log(values, step=step, **kwargs)
        if step is not None and step > self.state["logged_through"]:
            self.state["logged_through"] = step
            write_json(self.state_file, self.state)
