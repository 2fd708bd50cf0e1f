"""Lost and hung peers: a bounded end instead of a collective that waits for half an hour.

The process group's timeout (``train.collective_timeout_s``, passed to gloo and NCCL when the
group is made) bounds every collective: one that waits longer for another process fails. Gloo
raises an error in the waiting process; NCCL's watchdog aborts it. A peer killed outright makes
gloo fail at once (its connection closes); a stopped or cut-off one only at the timeout.

A watchdog on progress (``train.progress_timeout_s``), a thread of each process, ends the
process when no training step has finished for that long, however the step is stuck: it fires
before NCCL's timeout (whose abort kills the process without a status the wrapper can requeue
on), and where no collective is waiting at all (a rank stuck in its own data loading, seen from
that rank). It is paused outside the training steps (evaluation, checkpoints), which the
collective timeout alone guards.

The same thread posts a heartbeat (rank, host, last step, the time) to the process group's
key-value store every few seconds. When a process gives up (a collective failed, or its
watchdog fired), it reads the others' heartbeats and logs one line naming the rank(s) and
host(s) that stopped: a stale heartbeat is a process that is gone or stopped; a fresh one at a
lower step is one alive but stuck. It then ends with EXIT_PREEMPTED (75): the last complete
checkpoint is intact, and the SLURM wrapper requeues the job to resume from it.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable

import torch.distributed as dist
from accelerate.utils import InitProcessGroupKwargs

from .preemption import EXIT_PREEMPTED

LOG = logging.getLogger("train")

HEARTBEAT_KEY = "train-heartbeat/{rank}"


class PeerLost(Exception):
    """A collective failed or made no progress: another process is gone, stopped or cut off."""


def process_group_kwargs(collective_timeout_s: float) -> InitProcessGroupKwargs:
    """The process group's timeout, for ``Accelerator(kwargs_handlers=[...])``."""
    return InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=collective_timeout_s))


def heartbeat_interval(collective_timeout_s: float) -> float:
    """Seconds between heartbeats: a stopped process's is stale (3 missed) well within the timeout."""
    return max(0.1, min(5.0, collective_timeout_s / 6))


def is_collective_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a failed collective (a peer gone, a timeout), not a bug of this process."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    # Gloo raises plain RuntimeErrors from its transport ("Connection closed by peer",
    # "Timed out waiting ...ms for recv operation").
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("gloo/transport" in text or "NCCL" in text)


class Heartbeat:
    """This process's heartbeat in the store (a thread), and what the others' say."""

    def __init__(self, rank: int, world_size: int, interval_s: float, progress_timeout_s: float,
                 on_stall: Callable[[], None] | None = None):
        self.rank, self.world_size = rank, world_size
        self.host = socket.gethostname()
        self.interval_s = interval_s
        self.progress_timeout_s = progress_timeout_s
        self.step = 0
        self.armed_at: float | None = None  # monotonic time of the last progress, while training
        self._stop = threading.Event()
        self._store = _default_store()
        self._on_stall = on_stall or (lambda: hard_exit(EXIT_PREEMPTED))
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        if self.world_size > 1:
            self._thread.start()
        return self

    def progressed(self, step: int) -> None:
        """A training step finished (the loop calls this after each): the watchdog is armed anew."""
        self.step = step
        self.armed_at = time.monotonic()

    def pause(self) -> None:
        """Outside the training steps (evaluation, checkpoints): the collective timeout guards those."""
        self.armed_at = None

    def close(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._post()
            armed_at = self.armed_at
            if armed_at is not None and time.monotonic() - armed_at > self.progress_timeout_s:
                LOG.error(f"rank {self.rank} ({self.host}): no training step finished for "
                          f"{self.progress_timeout_s:g} s (train.progress_timeout_s) after step {self.step}; "
                          f"{self.describe_stalled()}")
                self._on_stall()
                return

    def _post(self) -> None:
        if self._store is None:
            return
        record = {"rank": self.rank, "host": self.host, "step": self.step, "time": time.time()}
        try:
            self._store.set(HEARTBEAT_KEY.format(rank=self.rank), json.dumps(record))
        except Exception:  # the store's host is gone: nothing to post to, the timeouts still end the run
            self._store = None

    def heartbeats(self) -> list[dict]:
        """The last heartbeat of every rank that has posted one (the store may be gone: then none)."""
        found = []
        if self._store is None:
            return found
        for rank in range(self.world_size):
            try:
                if self._store.check([HEARTBEAT_KEY.format(rank=rank)]):
                    found.append(json.loads(self._store.get(HEARTBEAT_KEY.format(rank=rank))))
            except Exception:
                return found
        return found

    def describe_stalled(self) -> str:
        """Which rank(s) on which host(s) stopped making progress, as far as the heartbeats tell."""
        return stalled_ranks(self.heartbeats(), self.rank, time.time(), 3 * self.interval_s)


def stalled_ranks(heartbeats: list[dict], own_rank: int, now: float, stale_after_s: float) -> str:
    """One phrase naming the ranks that stopped: silent ones first, else those behind the others."""
    others = [h for h in heartbeats if h["rank"] != own_rank]
    silent = [h for h in others if now - h["time"] > stale_after_s]
    if silent:
        return "stopped making progress: " + ", ".join(
            f"rank {h['rank']} on {h['host']} (no heartbeat for {now - h['time']:.0f} s, last at step {h['step']})"
            for h in silent)
    if others:
        lowest = min(h["step"] for h in heartbeats)
        behind = [h for h in others if h["step"] == lowest and lowest < max(h["step"] for h in heartbeats)]
        if behind:
            return "stopped making progress: " + ", ".join(
                f"rank {h['rank']} on {h['host']} (alive, stuck at step {h['step']})" for h in behind)
    return "the other processes' heartbeats do not tell which one stopped (their host may be gone)"


# Run by hard_exit before the process ends: launch/train_worker.py records its status here.
HARD_EXIT_HOOKS: list[Callable[[int], None]] = []


def hard_exit(status: int) -> None:
    """End the process from the watchdog's thread (the main thread is stuck: that is why it fired).

    Logs are flushed and the hooks run; nothing else is to be trusted to return."""
    for hook in HARD_EXIT_HOOKS:
        hook(status)
    for handler in LOG.handlers + logging.getLogger().handlers:
        handler.flush()
    os._exit(status)


def _default_store():
    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return None
