"""``--preflight``: the whole run in miniature, on the real data and hardware, before the long job.

The same command as the run, with ``--preflight`` added, goes through every stage a run goes
through, with the run's own code (``startup.start_run``, ``loop.train_one_epoch``, the
checkpoint's save and load, ``loop.evaluate_and_record``, ``loop.export_model``) and the run's
settings (optimizer, precision, compile, gradient accumulation, loader):

1. start: the run directory (a scratch one), data opened and verified, model and optimizer;
2. a few training steps (warm-up: allocator, compilation, loader workers);
3. a checkpoint written and loaded back into the model, optimizer and schedule;
4. training resumed from it, timed step by step: the measured throughput;
5. the loader alone, and training on one batch held in memory (as ``train.benchmark``'s pipeline
   mode does), which tells whether the input pipeline or the model limits the run;
6. an evaluation on a slice of the validation set, after the BatchNorm recalibration the
   optimizer or ``recompute_bn_before_final_eval`` asks for, recorded as a run records it;
7. TensorBoard's event file read back;
8. the export: a model folder that timm loads and that gives the trained model's outputs.

Then one table (each stage ok or failed, with its time), the measured figures and peak
memory per process, and an estimate of the full run (``cost.estimate_run``): steps, wall
time, device-hours and, under SLURM, the requeues the job's time limit implies.

Nothing is written into the real run's directory: the preflight works in a scratch directory
next to it (``<run dir>.preflight-XXXX``), removed at the end unless ``--preflight-keep``.
Weights & Biases is off during the preflight (it would create a run on the server). The
first failing stage stops the preflight; the processes agree on it, and the exit status is
the real run's for the same error (2 for bad input, 74 for storage, else 1).
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import logging
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

from . import checkpoint, cost
from .benchmark import timed_images_per_s
from .checkpoint import EpochState
from .config import Config, largest_crop
from .data.device import to_device
from .errors import EXIT_IO_ERROR, EXIT_USER_ERROR, SharedUserError, StorageError, UserError, first_line
from .evaluate import load_model
from .loop import epoch_mean_loss, evaluate_and_record, export_model, hours_unit, save_checkpoint, train_one_epoch
from .models import bare_model
from .progress import format_duration
from .rundir import default_run_dir, setup_logging
from .startup import Run, RunOptions, create_run_dir, make_accelerator, start_run
from .tracking import TRACKER_FOLDER, memory_in_use, memory_report

LOG = logging.getLogger("train")

DEFAULT_STEPS = 30
# Steps timed after a restart before the clock starts: the loader's workers refill their queues.
SETTLING_STEPS = 2
VALIDATION_BATCHES = 4  # per process: the slice of the validation set evaluated
BALANCE_STEPS = 10  # loader alone / training on a batch in memory: steps of each
# Real-data training below this share of the slower of loader alone and model alone: they
# contend for something (CPU cores, memory bandwidth), and the report says so.
CONTENTION_SHARE = 0.5
# BatchNorm recalibration in miniature: this many global batches of training images.
STATS_BATCHES = 2


@dataclass
class Stage:
    name: str
    outcome: str = "skipped"  # "ok", "failed" or "skipped" (an earlier stage failed)
    seconds: float | None = None
    detail: str = ""


@dataclass
class Failure:
    stage: str
    message: str
    exit_status: int


def exit_status(exc: BaseException) -> int:
    """The real run's exit status for the same error."""
    if isinstance(exc, StorageError):
        return EXIT_IO_ERROR
    return EXIT_USER_ERROR if isinstance(exc, UserError) else 1


class Stages:
    """Runs the stages in order, times them, and stops at the first failure, which every
    process learns of (a stage may fail on one process only, e.g. the main one's export)."""

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.done: list[Stage] = []
        self.failure: Failure | None = None

    def run(self, name: str, work: Callable[[], object]):
        """``work()``'s result, or None when it failed or an earlier stage had; ``work`` may
        return ``(result, detail)`` through ``Detailed``."""
        stage = Stage(name)
        self.done.append(stage)
        if self.failure is not None:
            return None
        started = time.perf_counter()
        result, problem = None, None
        try:
            result = work()
        except Exception as exc:  # noqa: BLE001 - reported as the stage's failure, in one line
            problem = (first_line(exc), exit_status(exc))
            LOG.debug("preflight stage failed", exc_info=True)
        problems = gather_object([problem]) if self.accelerator.num_processes > 1 else [problem]
        stage.seconds = time.perf_counter() - started
        failed = [(rank, p) for rank, p in enumerate(problems) if p is not None]
        if failed:
            rank, (message, status) = failed[0]
            where = f"process {rank}: " if self.accelerator.num_processes > 1 else ""
            stage.outcome, stage.detail = "failed", f"{where}{message}"
            self.failure = Failure(name, stage.detail, status)
            return None
        stage.outcome = "ok"
        if isinstance(result, Detailed):
            stage.detail, result = result.detail, result.value
        return result


@dataclass
class Detailed:
    value: object
    detail: str


class StepClock:
    """Stands in for the run's profiler (the loop steps it after every training step) and notes
    when each step ended, the device's queue drained first so that the times are the steps'."""

    def __init__(self, profiler, device: torch.device):
        self.profiler, self.device = profiler, device
        self.times: list[float] = []

    def step(self) -> None:
        self.profiler.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())

    def close(self) -> None:
        self.profiler.close()

    def seconds_per_step(self) -> float | None:
        """Over the steps noted since ``times`` was last cleared, the first SETTLING_STEPS left out."""
        times = self.times[min(SETTLING_STEPS, len(self.times) - 2):] if len(self.times) >= 2 else []
        return (times[-1] - times[0]) / (len(times) - 1) if len(times) >= 2 else None


@dataclass
class MiniRun:
    """A run's position as the preflight moves it: across epoch ends as the loop does."""
    run: Run
    state: EpochState
    closed: EpochState | None = None  # the last epoch ended, for the evaluation's record

    @property
    def step(self) -> int:
        return self.run.trainer.step + self.state.batches_done

    def train(self, count: int) -> int:
        """``count`` more optimizer steps, or fewer where the run itself would end; returns those done."""
        run, target = self.run, self.step + count
        while self.step < target and run.trainer.epoch < run.config.train.max_epochs:
            if not train_one_epoch(run, self.state, until=min(target - run.trainer.step, run.loaders.steps_per_epoch)):
                raise RuntimeError(f"stopped by {run.stop.describe()}")
            if self.state.batches_done >= run.loaders.steps_per_epoch:
                self.close_epoch()
        return count - (target - self.step)

    def close_epoch(self) -> None:
        """End the epoch in progress here, as the loop does at an epoch's end."""
        if not self.state.batches_done:
            return
        trainer = self.run.trainer
        self.run.trainer = dataclasses.replace(trainer, epoch=trainer.epoch + 1, step=self.step,
                                               train_time_s=trainer.train_time_s + self.state.seconds)
        self.closed, self.state = self.state, EpochState()


class ValidationSlice:
    """The first ``batches`` batches of this process's validation shard, each pass."""

    def __init__(self, loader: Iterable, batches: int):
        self.loader, self.batches = loader, batches

    def __iter__(self):
        return itertools.islice(iter(self.loader), self.batches)


@dataclass
class Figures:
    """What the preflight measured, for the report and the estimate."""
    seconds_per_step: float | None = None
    loader_images_per_s: float | None = None  # per process, the slowest process's
    synthetic_images_per_s: float | None = None  # per process, the slowest process's
    evaluation_s: float | None = None  # the slice's evaluation, scaled to the whole validation set
    memory_line: str = ""
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------- stages


def create_scratch(accelerator: Accelerator, options: RunOptions) -> Path:
    """A new folder next to where the real run's directory is (or would be), the same on every
    process: the preflight's checkpoints go where the run's would, on the same file system."""
    created: list[object] = [None]
    if accelerator.is_main_process:
        real = Path(options.output_dir or default_run_dir(options.job_id, datetime.now().strftime("%Y%m%d-%H%M%S")))
        problem = create_run_dir(real.parent)
        if problem is None:
            try:
                created[0] = tempfile.mkdtemp(prefix=f"{real.name}.preflight-", dir=real.parent)
            except OSError as exc:
                problem = (exc.errno in (errno.ENOSPC, errno.EDQUOT), f"{real.parent}: {exc.strerror or exc}")
        if problem is not None:
            created[0] = (problem[0], f"cannot create the preflight's scratch directory next to {real}: {problem[1]}")
    broadcast_object_list(created, from_process=0)
    if isinstance(created[0], tuple):
        storage, message = created[0]
        raise StorageError(message) if storage else SharedUserError(message)
    return Path(created[0])


def miniature(config: Config) -> Config:
    """The run's config with what the preflight shortens: BatchNorm recalibration over a couple
    of batches, no W&B run, no checkpoints on a timer (the preflight writes its own). A ramp of
    training crops is replaced by its largest side: the steps measured are the run's heaviest."""
    train = config.train
    log = dataclasses.replace(train.log, wandb_on=False, checkpoint_every_steps=0, checkpoint_every_minutes=0.0)
    stats = min(train.num_samples_for_stats, STATS_BATCHES * train.batch_size)
    preprocess = dataclasses.replace(train.preprocess, train_crop_size=largest_crop(train.preprocess.train_crop_size))
    return dataclasses.replace(config, train=dataclasses.replace(train, log=log, num_samples_for_stats=stats,
                                                                 preprocess=preprocess))


def checkpoint_round_trip(mini: MiniRun) -> Detailed:
    """Write a checkpoint at the current step, then load it back as a resumed run does."""
    run, step = mini.run, mini.step
    save_checkpoint(run, mini.state)
    folder = checkpoint.latest_valid_checkpoint(run.run_dir)
    if folder is None or int(folder.name) != step:
        raise RuntimeError(f"the checkpoint of step {step} was not found complete in {run.run_dir / 'checkpoints'}")
    trainer, state = checkpoint.load(run.accelerator, folder, run.scheduler, run.ema)
    run.trainer, mini.state = trainer, state
    if mini.step != step:
        raise RuntimeError(f"checkpoint {folder} resumes at step {mini.step}, not {step}")
    return Detailed(None, f"{checkpoint.checkpoint_bytes(folder) / 2**20:.0f} MiB, resumed at step {step}")


def timed_training(mini: MiniRun, clock: StepClock, count: int, figures: Figures) -> Detailed:
    run = mini.run
    clock.times.clear()
    done = mini.train(count)
    figures.seconds_per_step = clock.seconds_per_step()
    if figures.seconds_per_step is None:
        return Detailed(None, f"{done} steps: too few to time")
    per_process = run.config.train.batch_size / run.accelerator.num_processes / figures.seconds_per_step
    return Detailed(None, f"{figures.seconds_per_step:.3f} s/step, {per_process:.1f} img/s per process, "
                          f"{per_process * run.accelerator.num_processes:.1f} img/s in total")


def slowest(accelerator: Accelerator, values: list[float]) -> list[float]:
    """Each value's minimum over the processes."""
    gathered = accelerator.gather(torch.tensor([values], dtype=torch.float64, device=accelerator.device))
    return gathered.min(dim=0).values.tolist()


def pipeline_balance(mini: MiniRun, figures: Figures) -> Detailed:
    """The loader alone, then the run's step on one batch held in memory, per process."""
    run = mini.run
    accelerator, loaders, train = run.accelerator, run.loaders, run.config.train
    loaders.set_epoch(run.trainer.epoch, 0)
    batches = iter(loaders.train)
    images, labels = next(batches)  # the workers' start-up is left out
    micro = len(labels)
    count = min(BALANCE_STEPS, loaders.steps_per_epoch * loaders.micro_batches_per_step - 1)
    if count < 1:
        return Detailed(None, "one batch per epoch: nothing to time")
    loader_rate = timed_images_per_s(lambda *_: None, batches, count, accelerator.device, micro)
    batch = to_device(images, labels, accelerator.device, train.channels_last)
    step = [batch] * loaders.micro_batches_per_step

    def train_on_batch(*_) -> None:
        run.train_step.on_micro_batches(step)

    train_on_batch()  # warm-up
    steps = max(count // loaders.micro_batches_per_step, 1)
    synthetic = timed_images_per_s(train_on_batch, itertools.repeat(batch), steps, accelerator.device,
                                   micro * loaders.micro_batches_per_step)
    run.train_step.take_skipped_steps()  # these steps never stepped the lr schedule: nothing to take back
    figures.loader_images_per_s, figures.synthetic_images_per_s = slowest(accelerator, [loader_rate, synthetic])
    bound = "the input pipeline" if figures.loader_images_per_s < figures.synthetic_images_per_s else "the model"
    if figures.seconds_per_step is not None:
        note = contention_note(train.batch_size / accelerator.num_processes / figures.seconds_per_step,
                               figures.loader_images_per_s, figures.synthetic_images_per_s)
        if note:
            figures.notes.append(note)
    return Detailed(None, f"bound by {bound}: loader alone {figures.loader_images_per_s:.1f} img/s, training on "
                          f"a batch in memory {figures.synthetic_images_per_s:.1f} img/s (per process)")


def contention_note(together: float, loader: float, model: float) -> str | None:
    """A note when training on real data (img/s per process) is far slower than the loader
    and the model each alone, else None."""
    alone = min(loader, model)
    if together >= CONTENTION_SHARE * alone:
        return None
    return (f"training on the real data ({together:.1f} img/s per process) is far slower than the loader and the "
            f"model each alone ({alone:.1f}): they compete for the same CPU cores, or other work shares the machine; "
            "fewer loader workers, or more cores per process, may help")


def miniature_evaluation(mini: MiniRun, figures: Figures) -> Detailed:
    """An evaluation on a slice of the validation set, as the run's last one: BatchNorm
    recalibrated first where the run would, recorded in metrics.jsonl and TensorBoard."""
    run = mini.run
    mini.close_epoch()
    if mini.closed is None:
        raise RuntimeError("no training step was done: nothing to evaluate")
    train_loss = epoch_mean_loss(run, mini.closed)
    whole = run.loaders.val
    # As the run's last evaluation: BatchNorm statistics are recomputed where it would be.
    run.config = dataclasses.replace(run.config, train=dataclasses.replace(run.config.train,
                                                                          max_epochs=run.trainer.epoch))
    run.loaders = dataclasses.replace(run.loaders, val=ValidationSlice(whole, VALIDATION_BATCHES))
    try:
        evaluate_and_record(run, train_loss, mini.closed)
    finally:
        run.loaders = dataclasses.replace(run.loaders, val=whole)
    record = run.trainer.metrics[-1]
    figures.evaluation_s = record["eval_time_s"] * run.loaders.num_val / max(record["val_samples"], 1)
    bn = (f"; BatchNorm statistics recomputed over {record['bn_stats_samples']} images"
          if record["bn_stats_samples"] else "")
    return Detailed(None, f"{record['val_samples']} images, top-1 {record['val_acc1']:.1f}%{bn}")


def tensorboard_read_back(run: Run) -> Detailed:
    """The evaluation's scalars, read back from the event file by TensorBoard's own reader."""
    if not run.accelerator.is_main_process:
        return Detailed(None, "")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run.accelerator.get_tracker("tensorboard", unwrap=True).flush()
    folder = run.run_dir / TRACKER_FOLDER
    reader = EventAccumulator(str(folder))
    reader.Reload()
    tags = reader.Tags().get("scalars", [])
    if "val/acc1" not in tags:
        raise RuntimeError(f"{folder}: the evaluation's scalars are not in the event file")
    return Detailed(None, f"{len(tags)} scalars in {TRACKER_FOLDER}/")


@torch.no_grad()
def export_and_load(run: Run) -> Detailed:
    """The export a finished run writes, loaded through timm, giving the trained model's outputs."""
    if not run.accelerator.is_main_process:
        return Detailed(None, "")
    folder = export_model(run)
    exported = load_model(str(folder)).eval()
    trained = bare_model(run.accelerator, run.model).eval()
    images = torch.randn(2, *exported.pretrained_cfg["input_size"])
    with run.accelerator.autocast():
        expected = trained(images.to(run.accelerator.device)).float().cpu()
    got = exported(images).float()
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-2, atol=1e-2):
        raise RuntimeError(f"{folder}: the exported model's outputs differ from the trained model's")
    return Detailed(None, f"timm loads {folder.name}/, outputs {tuple(got.shape)} match the trained model")


# ---------------------------------------------------------------------------------- SLURM


def parse_slurm_time(text: str) -> float | None:
    """SLURM's time format (``1-00:00:00``, ``12:00:00``, ``30:00``, ``90``) in seconds; None
    for no limit (``UNLIMITED``, ``NOT_SET``) or a value it is not."""
    text = text.strip()
    days, _, clock = text.rpartition("-")
    try:
        parts = [int(p) for p in clock.split(":")]
        day_count = int(days) if days else 0
    except ValueError:
        return None
    if not 1 <= len(parts) <= 3:
        return None
    if len(parts) == 1 and days:
        hours, minutes, seconds = parts[0], 0, 0  # days-hours
    elif len(parts) == 1:
        hours, minutes, seconds = 0, parts[0], 0  # minutes alone
    elif len(parts) == 2 and not days:
        hours, minutes, seconds = 0, *parts  # minutes:seconds
    elif len(parts) == 2:
        hours, minutes, seconds = *parts, 0  # days-hours:minutes
    else:
        hours, minutes, seconds = parts
    return float(((day_count * 24 + hours) * 60 + minutes) * 60 + seconds)


def slurm_time_limit_s(job_id: str) -> tuple[float | None, str]:
    """The job's time limit from ``squeue``, and a line on where it came from."""
    try:
        found = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%l"], capture_output=True, text=True,
                               timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"time limit of job {job_id} unknown (squeue: {first_line(exc)})"
    text = found.stdout.strip().splitlines()[0] if found.returncode == 0 and found.stdout.strip() else ""
    limit = parse_slurm_time(text) if text else None
    if limit is None:
        return None, f"job {job_id} has no time limit ({text or found.stderr.strip() or 'squeue gave nothing'})"
    return limit, f"job {job_id}'s time limit {text}"


def time_limit_warning_note(signum: int) -> str:
    name = signal.Signals(signum).name
    return (f"{name} arrived during the preflight and was noted, not obeyed. SLURM sends it ahead of the job's "
            f"time limit (the launch/ profiles ask for it 600 s ahead): a training job whose limit is not "
            f"longer than that lead is told to stop as soon as it starts, and again after every requeue.")


# ---------------------------------------------------------------------------------- report


def report(stages: list[Stage], figures: Figures, estimate: cost.RunEstimate | None, header: str,
           estimate_header: str, limit_line: str | None, unit: str) -> str:
    width = max(len(s.name) for s in stages)
    lines = [header, f"  {'stage':<{width}}  result   time     detail"]
    for s in stages:
        seconds = f"{s.seconds:6.1f}s" if s.seconds is not None else "      -"
        lines.append(f"  {s.name:<{width}}  {s.outcome:<7}  {seconds}  {s.detail}".rstrip())
    if figures.memory_line:
        lines.append(f"  {figures.memory_line}")
    if estimate is not None:
        lines += [estimate_header,
                  f"  {estimate.steps} steps, wall time {format_duration(estimate.wall_s)}, "
                  f"{estimate.device_hours:.2f} {unit}"]
        if limit_line is not None:
            requeues = "" if estimate.requeues is None else (
                f": {estimate.requeues} requeue(s), {estimate.requeues + 1} job(s) in all")
            lines.append(f"  {limit_line}{requeues}")
    lines += [f"  note: {note}" for note in figures.notes]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- the command


def preflight(config: Config, options: RunOptions, steps: int = DEFAULT_STEPS, keep: bool = False) -> int:
    """Run the stages, print the table and the estimate; returns the exit status (0: all ok)."""
    accelerator = make_accelerator(config.train, options)
    setup_logging(None, accelerator.is_main_process)
    stages, figures = Stages(accelerator), Figures()
    warm_up = max(steps // 3, 1)
    measured = max(steps - warm_up, SETTLING_STEPS + 2)
    run, mini, clock = None, None, None
    scratch = stages.run("scratch directory next to the run's", lambda: create_scratch(accelerator, options))
    # A time-limit warning is noted, not obeyed: a preflight has nothing to save (StopRequests).
    scratch_options = dataclasses.replace(options, output_dir=scratch, resume=None, stop_on_time_limit_warnings=False)
    started = stages.run("start: data opened and verified, model and optimizer built",
                         lambda: start_run(miniature(config), scratch_options, accelerator))
    if started is not None:
        run, state = started
        mini, clock = MiniRun(run, state), StepClock(run.profiler, accelerator.device)
        run.profiler = clock
    try:
        # After a failure the stages left are listed as skipped; their work is not called.
        stages.run(f"train {warm_up} steps (warm-up)",
                   lambda: Detailed(None, f"{mini.train(warm_up)} steps, {describe_settings(run)}"))
        stages.run("checkpoint written and loaded back", lambda: checkpoint_round_trip(mini))
        stages.run(f"train {measured} steps resumed from it, timed",
                   lambda: timed_training(mini, clock, measured, figures))
        stages.run("input pipeline alone vs model alone", lambda: pipeline_balance(mini, figures))
        stages.run("evaluation on a slice of validation", lambda: miniature_evaluation(mini, figures))
        stages.run("TensorBoard events written and read back", lambda: tensorboard_read_back(run))
        stages.run("export written and loaded through timm", lambda: export_and_load(run))
        if run is not None:
            if run.stop.warned is not None:
                figures.notes.append(time_limit_warning_note(run.stop.warned))
            peak, capacity = memory_in_use(accelerator.device)
            usage = gather_object([(peak, capacity)]) if accelerator.num_processes > 1 else [(peak, capacity)]
            figures.memory_line, warning = memory_report("during the preflight", usage)
            if warning:
                figures.notes.append(warning)
    finally:
        if run is not None:
            run.stop.uninstall()
            run.profiler.close()
        close_trackers(accelerator)
        setup_logging(None, accelerator.is_main_process)  # train.log is in the scratch directory
        accelerator.wait_for_everyone()
        if scratch is not None and accelerator.is_main_process and not keep:
            shutil.rmtree(scratch, ignore_errors=True)
        accelerator.end_training()  # the process group; the trackers are closed already
    if accelerator.is_main_process:
        print_report(stages, figures, config, run, accelerator, options, scratch, keep)
    failure = stages.failure
    if failure is None:
        return 0
    if accelerator.is_main_process:
        print(f"error: preflight failed at stage \"{failure.stage}\": {failure.message}", file=sys.stderr,
              flush=True)
    return failure.exit_status


def close_trackers(accelerator: Accelerator) -> None:
    """Close TensorBoard's writer before its folder goes; a failure here loses nothing the
    preflight needs (its stage read the events back), so it is a warning."""
    for tracker in accelerator.trackers:
        try:
            tracker.finish()
        except Exception as exc:  # noqa: BLE001 - one line, the preflight's outcome stands
            LOG.warning(f"warning: closing the {tracker.name} tracker failed: {first_line(exc)}")


def describe_settings(run: Run) -> str:
    train, accelerator, loaders = run.config.train, run.accelerator, run.loaders
    accumulation = (f", {loaders.micro_batches_per_step} micro-batches per step"
                    if loaders.micro_batches_per_step > 1 else "")
    return (f"{train.optim.name}, mixed precision {accelerator.mixed_precision}, "
            f"compile {str(train.compile).lower()}{accumulation}")


def print_report(stages: Stages, figures: Figures, config: Config, run: Run | None, accelerator: Accelerator,
                 options: RunOptions, scratch: Path | None, keep: bool) -> None:
    train = config.train
    where = "none" if scratch is None else f"{scratch.resolve()} ({'kept' if keep else 'removed'})"
    header = (f"preflight: {train.arch}, {accelerator.num_processes} process(es) on {accelerator.device.type}; "
              f"scratch directory {where}")
    estimate, limit_line, estimate_header = None, None, ""
    if run is not None and figures.seconds_per_step is not None and figures.evaluation_s is not None:
        limit_s = None
        if options.job_id:
            limit_s, limit_line = slurm_time_limit_s(options.job_id)
        steps_per_epoch = run.loaders.steps_per_epoch
        estimate = cost.estimate_run(steps_per_epoch, train.max_epochs, train.eval_freq, figures.seconds_per_step,
                                     figures.evaluation_s, accelerator.num_processes, limit_s)
        evaluations = cost.evaluations_left(0, train.max_epochs, train.eval_freq)
        estimate_header = (f"estimate for the full run: {train.max_epochs} epochs of {steps_per_epoch} steps at "
                           f"{figures.seconds_per_step:.3f} s/step, {evaluations} evaluation(s) of "
                           f"{figures.evaluation_s:.1f} s (checkpoints and start-up not counted)")
    print(report(stages.done, figures, estimate, header, estimate_header, limit_line, hours_unit(accelerator)),
          flush=True)
