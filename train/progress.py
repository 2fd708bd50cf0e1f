"""Console progress for the main process: a bar on a terminal, plain lines in log files,
and the summary printed when a run finishes.

SLURM and CI capture stdout to files, where a redrawn bar becomes carriage-return noise, so
without a terminal the same information (loss, lr, throughput, time left) comes as one log
line every ``log_freq`` steps.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from tqdm import tqdm

LOG = logging.getLogger("train")


def format_duration(seconds: float) -> str:
    """``3725.2`` -> ``"1:02:05"``."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class EpochProgress:
    """One epoch's progress. ``images_per_s`` is measured on every process (the tracker uses it);
    only an ``enabled`` one (the main process) draws or prints anything.

    Times left ("eta") extrapolate this epoch's seconds per step; the run's excludes the
    evaluations still to come.
    """

    def __init__(self, epoch: int, max_epochs: int, total_steps: int, global_batch: int, enabled: bool,
                 start: int = 0):
        """``start``: steps of this epoch already done (a resumed epoch)."""
        self.epoch, self.max_epochs = epoch, max_epochs
        self.total_steps, self.global_batch = total_steps, global_batch
        self.enabled = enabled
        self.first = start
        self.start = time.perf_counter()
        self.last_log = (start, self.start)  # (steps done, time) at the previous log step
        self.images_per_s: float | None = None  # global images per second between the last two log steps
        self.seconds_per_step = 0.0  # this epoch's average so far, measured at log steps
        self.bar = None
        if enabled and sys.stdout.isatty():
            self.bar = tqdm(total=total_steps, initial=start, desc=f"epoch {epoch + 1}/{max_epochs}", unit="step",
                            dynamic_ncols=True, leave=False)

    def update(self, steps_done: int, loss: float | None, lr: float) -> None:
        """Called every step with ``loss`` None, or with the loss at ``log_freq`` steps."""
        if loss is not None:
            self._measure(steps_done)
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(steps_done - self.bar.n)
            if loss is not None:
                self.bar.set_postfix({"loss": f"{loss:.4f}", "lr": f"{lr:.4g}", "img/s": f"{self.images_per_s:.0f}",
                                      "run eta": format_duration(self.run_eta(steps_done))}, refresh=False)
            return
        if loss is not None:
            LOG.info(f"epoch {self.epoch + 1}/{self.max_epochs} step {steps_done}/{self.total_steps} "
                     f"loss {loss:.4f} lr {lr:.4g} {self.images_per_s:.0f} img/s, "
                     f"epoch eta {format_duration(self.epoch_eta(steps_done))}, "
                     f"run eta {format_duration(self.run_eta(steps_done))}")

    def _measure(self, steps_done: int) -> None:
        """Throughput since the previous log step, and seconds per step since the epoch's start."""
        now = time.perf_counter()
        last_steps, last_time = self.last_log
        self.images_per_s = (steps_done - last_steps) * self.global_batch / max(now - last_time, 1e-9)
        self.last_log = (steps_done, now)
        self.seconds_per_step = (now - self.start) / max(steps_done - self.first, 1)

    def epoch_eta(self, steps_done: int) -> float:
        return (self.total_steps - steps_done) * self.seconds_per_step

    def run_eta(self, steps_done: int) -> float:
        later_epochs = self.max_epochs - self.epoch - 1
        return self.epoch_eta(steps_done) + later_epochs * self.total_steps * self.seconds_per_step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_summary(record: dict, metrics: list[dict], max_epochs: int, run_dir: Path, checkpoints: list[Path],
                model_dir: Path, tensorboard_dir: Path, hours_unit: str = "GPU-hours") -> str:
    """The screen printed when a run has finished: results, time, cost, and where everything is."""
    best = max(metrics, key=lambda r: r["val_acc1"])
    run_dir = run_dir.resolve()
    kept = ", ".join(p.name for p in checkpoints) or "none"
    lines = [
        f"finished: epoch {record['epoch']}/{max_epochs}, {record['step']} steps, training time "
        f"{format_duration(record['train_time_s'])} (evaluation excluded)",
        f"  validation   top-1 {record['val_acc1']:.2f}%  top-5 {record['val_acc5']:.2f}%  "
        f"loss {record['val_loss']:.4f}  ({record['val_samples']} images); train loss {record['train_loss']:.4f}",
        f"  best top-1   {best['val_acc1']:.2f}% at epoch {best['epoch']}",
        f"  run          {run_dir}  (config.toml, metrics.jsonl, train.log)",
        f"  checkpoints  {run_dir / 'checkpoints'}  (kept: {kept})",
        f"  model        {model_dir.resolve()}",
        f"               load: timm.create_model(\"local-dir:{model_dir.resolve()}\", pretrained=True)",
        f"  tensorboard  tensorboard --logdir {tensorboard_dir.resolve()}",
    ]
    if "gpu_hours" in record:  # absent from records of runs made before it was measured
        lines.insert(1, f"  cost         {record['gpu_hours']:.3f} {hours_unit} in all "
                        "(training and evaluation time x processes)")
    return "\n".join(lines)
