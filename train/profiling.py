"""``[log] profile_steps``: a ``torch.profiler`` trace of a few training steps.

The trace is written once per attempt, by the main process only, into ``<run>/profile/`` as
``<worker>.<milliseconds>.pt.trace.json``: Chrome's trace event format, which Perfetto
(ui.perfetto.dev) and chrome://tracing open, named as TensorBoard's PyTorch profiler plugin
(``torch-tb-profiler``) looks for it under ``tensorboard --logdir``. The profiled steps are
ordinary training steps: the run goes on unchanged, only slower while they are recorded.

Recording starts after ``SKIP_STEPS`` steps, because the first steps of an attempt pay for
one-time work (cuDNN autotuning, ``torch.compile``, the allocator growing, the loader filling
its queue), then one warm-up step that the profiler records and discards.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

LOG = logging.getLogger("train")

PROFILE_FOLDER = "profile"
SKIP_STEPS = 5
WARMUP_STEPS = 1
WORKER_NAME = "main-process"


class StepProfiler:
    """``step()`` after every training step; ``close()`` when training ends (writes a
    partial trace if the run ends inside the recorded steps). Does nothing when off."""

    def __init__(self, steps: int, run_dir: Path, enabled: bool, cuda: bool):
        self.steps = steps
        self.folder = Path(run_dir) / PROFILE_FOLDER
        self.profiler: profile | None = None
        self.written: list[Path] = []
        if not (steps and enabled):
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        self.profiler = profile(activities=activities,
                                schedule=schedule(wait=SKIP_STEPS, warmup=WARMUP_STEPS, active=steps, repeat=1),
                                on_trace_ready=self._write, record_shapes=True, profile_memory=True)
        self.profiler.start()

    def _write(self, prof: profile) -> None:
        before = set(self.folder.glob("*.pt.trace.json"))
        tensorboard_trace_handler(str(self.folder), worker_name=WORKER_NAME)(prof)
        new = sorted(set(self.folder.glob("*.pt.trace.json")) - before)
        self.written += new
        for path in new:
            LOG.info(f"profiler: trace of up to {self.steps} training steps in {path} "
                     "(open it in ui.perfetto.dev, or with tensorboard --logdir and torch-tb-profiler)")

    def step(self) -> None:
        if self.profiler is not None:
            self.profiler.step()

    def close(self) -> None:
        if self.profiler is None:
            return
        self.profiler.stop()
        self.profiler = None
        if not self.written:
            LOG.info(f"profiler: no trace, the attempt ended within its first {SKIP_STEPS + WARMUP_STEPS} steps "
                     "(train.log.profile_steps starts recording after them)")
