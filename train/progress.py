"""Console progress for the main process: a bar on a terminal, plain lines in log files.

SLURM and CI capture stdout to files, where a redrawn bar becomes carriage-return noise, so
without a terminal the same information comes as one log line every ``log_freq`` steps.
"""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

LOG = logging.getLogger("train")


class EpochProgress:
    def __init__(self, epoch: int, max_epochs: int, total_steps: int, global_batch: int, enabled: bool,
                 start: int = 0):
        """``start``: steps of this epoch already done (a resumed epoch)."""
        self.epoch, self.max_epochs = epoch, max_epochs
        self.total_steps, self.global_batch = total_steps, global_batch
        self.enabled = enabled
        self.first = start
        self.start = time.perf_counter()
        self.bar = None
        if enabled and sys.stdout.isatty():
            self.bar = tqdm(total=total_steps, initial=start, desc=f"epoch {epoch + 1}/{max_epochs}", unit="step",
                            dynamic_ncols=True, leave=False)

    def update(self, steps_done: int, loss: float | None, lr: float) -> None:
        """Called every step with ``loss`` None, or with the loss at ``log_freq`` steps."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(steps_done - self.bar.n)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.4g}", refresh=False)
            return
        if loss is not None:
            elapsed = time.perf_counter() - self.start
            done_here = steps_done - self.first
            rate = done_here * self.global_batch / max(elapsed, 1e-9)
            eta = (self.total_steps - steps_done) * elapsed / max(done_here, 1)
            LOG.info(f"epoch {self.epoch + 1}/{self.max_epochs} step {steps_done}/{self.total_steps} "
                     f"loss {loss:.4f} lr {lr:.4g} {rate:.0f} img/s eta {eta:.0f}s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
