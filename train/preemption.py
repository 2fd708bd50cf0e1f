"""Stop requests (SIGTERM, SIGUSR1, SIGUSR2) and when to checkpoint, agreed by all processes.

A signal handler only sets a flag: the step in flight finishes, then all processes agree
(within seconds, see ``CheckpointPolicy``; and at every epoch's end) to write a checkpoint
and stop with ``EXIT_PREEMPTED``, which the SLURM wrappers take as "requeue me". Signals
that arrive while the checkpoint is being written only set the flag again.
"""

from __future__ import annotations

import enum
import logging
import os
import signal
import time

import torch
import torch.distributed as dist

LOG = logging.getLogger("train")

# EX_TEMPFAIL from sysexits.h: "temporary failure, try again later".
EXIT_PREEMPTED = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
# What SLURM sends ahead of a job's time limit (#SBATCH --signal=B:USR1@600 in launch/): a
# warning, where SIGTERM is an order (scancel, or the limit itself).
TIME_LIMIT_WARNINGS = (signal.SIGUSR1, signal.SIGUSR2)
# Processes agree on stopping about this often (and at least every log_freq steps): a stop
# signal is acted on within seconds, and a GPU run rarely waits on the host for it.
AGREE_EVERY_S = 10.0


class Preempted(Exception):
    """Raised after the checkpoint is written, to end the run with EXIT_PREEMPTED."""


class Action(enum.IntFlag):
    CONTINUE = 0
    CHECKPOINT = 1
    STOP = 2  # checkpoint, then end the run


class StopRequests:
    """Catches the stop signals for as long as it is installed.

    ``stop_on_warnings=False`` (a preflight) only notes a time-limit warning in ``warned``: a
    preflight is minutes long and has nothing to save, and a job whose time limit is shorter
    than the warning's lead gets the warning as soon as it starts."""

    def __init__(self, stop_on_warnings: bool = True):
        self.received: int | None = None
        self.warned: int | None = None
        self.stop_on_warnings = stop_on_warnings
        self._previous = {}
        self._pid = os.getpid()

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            # A child forked with this handler (a loader worker that has not yet run its
            # worker_init_fn): the stop is the trainer's to act on and to report.
            return
        name = signal.Signals(signum).name
        # Each is recorded before it is reported: a second signal arriving while this handler
        # logs runs the handler again, nested (scancel's SIGTERM comes three times within
        # milliseconds: from SLURM, the node launcher and torchrun's agent), and must find the
        # first already recorded.
        if signum in TIME_LIMIT_WARNINGS and not self.stop_on_warnings:
            first = self.warned is None
            self.warned = signum
            if first:
                LOG.warning(f"received {name}, a warning of the job's time limit: noted, not stopping")
            return
        first = self.received is None
        self.received = signum
        if first:
            LOG.warning(f"received {name}: stopping after this step with a checkpoint")

    def describe(self) -> str:
        """What stopped this process: its own signal, or another process's."""
        if self.received is None:
            return "a stop signal to another process"
        return f"signal {signal.Signals(self.received).name}"

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

    Step-based checkpoints need no communication. A stop signal (which may reach only some
    processes) and the wall clock of time-based checkpoints (read on the main process) are
    agreed on with a max all-reduce over the training's own process group (NCCL on GPUs), and
    not after every step: at most ``log_freq`` steps apart and about ``AGREE_EVERY_S`` seconds
    apart, whichever comes first. The main process proposes the next interval from the step
    time it measured, and the all-reduce hands its proposal to everyone, so all processes
    agree at the same steps. A GPU run so waits on the host only every few seconds, and a
    multi-node job needs no Gloo connection between its nodes.
    """

    def __init__(self, requests: StopRequests, every_steps: int, every_minutes: float, max_interval: int,
                 is_main_process: bool, device: torch.device):
        self.requests = requests
        self.every_steps = every_steps
        self.every_seconds = every_minutes * 60
        self.max_interval = max_interval
        self.is_main_process = is_main_process
        self.device = device
        self.last_save = time.monotonic()
        self.next_agreement: int | None = None  # None: at the next step (the first after a start)
        self.last_agreement: tuple[int, float] | None = None  # (step, time) on the main process

    def saved(self) -> None:
        self.last_save = time.monotonic()

    def after_step(self, step: int) -> Action:
        action = Action.CONTINUE
        if self.next_agreement is None or step >= self.next_agreement:
            action |= self._agree(step)
        if self.every_steps and step % self.every_steps == 0:
            action |= Action.CHECKPOINT
        return action

    def stop_agreed(self) -> bool:
        """Whether any process received a stop signal (collective: every process must call it)."""
        local = Action.STOP if self.requests.received is not None else Action.CONTINUE
        return bool(Action(_max_over_processes([int(local)], self.device)[0]) & Action.STOP)

    def _agree(self, step: int) -> Action:
        local = Action.CONTINUE
        if self.requests.received is not None:
            local |= Action.STOP
        if self.every_seconds and self.is_main_process and time.monotonic() - self.last_save >= self.every_seconds:
            local |= Action.CHECKPOINT
        proposal = self._next_interval(step) if self.is_main_process else 0
        agreed, interval = _max_over_processes([int(local), proposal], self.device)
        self.next_agreement = step + interval
        return Action(agreed)

    def _next_interval(self, step: int) -> int:
        """Steps until the next agreement: about AGREE_EVERY_S of them, at most ``max_interval``."""
        now = time.monotonic()
        previous, self.last_agreement = self.last_agreement, (step, now)
        if previous is None or step <= previous[0]:
            return 1
        seconds_per_step = (now - previous[1]) / (step - previous[0])
        return max(1, min(self.max_interval, int(AGREE_EVERY_S / max(seconds_per_step, 1e-9))))


def _max_over_processes(values: list[int], device: torch.device) -> list[int]:
    """The element-wise maximum of ``values`` over all processes (collective when there are several)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return values
    tensor = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()
