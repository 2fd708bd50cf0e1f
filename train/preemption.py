"""Stop requests (SIGTERM, SIGUSR1, SIGUSR2) and when to checkpoint, agreed by all processes.

A signal handler only sets a flag: the step in flight finishes, then all processes agree
(on a small CPU-side all-reduce, so the GPU never waits for it) to write a checkpoint and
stop with ``EXIT_PREEMPTED``, which the SLURM wrappers take as "requeue me". Signals that
arrive while the checkpoint is being written only set the flag again.
"""

from __future__ import annotations

import enum
import logging
import signal
import time

import torch
import torch.distributed as dist

LOG = logging.getLogger("train")

# EX_TEMPFAIL from sysexits.h: "temporary failure, try again later".
EXIT_PREEMPTED = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class Preempted(Exception):
    """Raised after the checkpoint is written, to end the run with EXIT_PREEMPTED."""


class Action(enum.IntFlag):
    CONTINUE = 0
    CHECKPOINT = 1
    STOP = 2  # checkpoint, then end the run


class StopRequests:
    """Catches the stop signals for as long as it is installed."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            LOG.warning(f"received {signal.Signals(signum).name}: stopping after this step with a checkpoint")
        self.received = signum

    def install(self) -> StopRequests:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """The handlers from before ``install``; after a stop request, the stop signals ignored instead.

        A stopping process is on its way to exit with EXIT_PREEMPTED, its checkpoint written: a
        late stop signal must not kill it before then (torchrun's agent sends SIGTERM to the
        other workers once one has exited; the node launcher sends its signal again)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if self.received is None else signal.SIG_IGN)
        self._previous.clear()


class CheckpointPolicy:
    """Decides after each step whether to checkpoint or stop, the same way on every process.

    Step-based checkpoints need no communication; a stop signal (which may reach only some
    processes) and the wall clock of time-based checkpoints (read on the main process) are
    combined with a max all-reduce over a gloo group, which stays on the CPU.
    """

    def __init__(self, requests: StopRequests, every_steps: int, every_minutes: float, num_processes: int,
                 is_main_process: bool):
        self.requests = requests
        self.every_steps = every_steps
        self.every_seconds = every_minutes * 60
        self.is_main_process = is_main_process
        self.last_save = time.monotonic()
        self.group = None
        if num_processes > 1:
            # The CPU group exists already when training runs on gloo; on NCCL make one.
            self.group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    def saved(self) -> None:
        self.last_save = time.monotonic()

    def after_step(self, step: int) -> Action:
        local = Action.CONTINUE
        if self.requests.received is not None:
            local |= Action.STOP
        if self.every_seconds and self.is_main_process and time.monotonic() - self.last_save >= self.every_seconds:
            local |= Action.CHECKPOINT
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([int(local)], dtype=torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
            local = Action(int(flag.item()))
        if self.every_steps and step % self.every_steps == 0:
            local |= Action.CHECKPOINT
        return local
