"""What a run costs: the time still to go and the device-hours spent, from measured times.

Used at every evaluation of a run (``loop.evaluate_and_record``) and by the preflight's
estimate of a whole run (``preflight.py``), so both extrapolate the same way:

- time left = optimizer steps left x the seconds per step measured last, plus the evaluations
  still due x the seconds the last one took. Checkpoint writes and start-up are left out: they
  are a few seconds each, against minutes per epoch on ImageNet.
- device-hours = (training + evaluation time) x processes. Each process holds one device (a
  GPU; on the CPU these are process-hours), and a cluster bills a device for the whole time it
  is held, evaluation included. Work that a preemption threw away (the steps after the last
  checkpoint) is not counted: the checkpoint's times are where a resumed run continues from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def device_hours(seconds: float, num_processes: int) -> float:
    """Hours of ``seconds`` on each of ``num_processes`` devices."""
    return seconds * num_processes / 3600


def evaluations_left(epochs_done: int, max_epochs: int, eval_freq: int) -> int:
    """Evaluations after epoch ``epochs_done`` until the end: every ``eval_freq`` epochs, and the last."""
    later = range(epochs_done + 1, max_epochs + 1)
    return sum(1 for epoch in later if epoch % eval_freq == 0 or epoch == max_epochs)


def time_left_s(steps_left: int, seconds_per_step: float, evaluations: int, seconds_per_evaluation: float) -> float:
    return steps_left * seconds_per_step + evaluations * seconds_per_evaluation


@dataclass(frozen=True)
class RunEstimate:
    """A whole run extrapolated from measured times."""
    steps: int
    wall_s: float
    device_hours: float
    requeues: int | None  # under a job time limit: how many times the job must be requeued; None without one


def estimate_run(steps_per_epoch: int, max_epochs: int, eval_freq: int, seconds_per_step: float,
                 seconds_per_evaluation: float, num_processes: int, time_limit_s: float | None) -> RunEstimate:
    """The run from its first step: training, evaluations, and the requeues a time limit implies."""
    steps = steps_per_epoch * max_epochs
    wall = time_left_s(steps, seconds_per_step, evaluations_left(0, max_epochs, eval_freq), seconds_per_evaluation)
    requeues = None
    if time_limit_s:
        requeues = max(math.ceil(wall / time_limit_s) - 1, 0)
    return RunEstimate(steps, wall, device_hours(wall, num_processes), requeues)
