"""Everything a run does before its first step, gathered into one ``Run``.

``start_run`` creates the Accelerator (processes, device, mixed precision), agrees on the run
directory and whether to resume, builds the loaders, model, optimizer, schedule and train
step, restores a checkpoint when there is one, and starts the tracker and the stop-signal
handling. The loop (``loop.py``) receives the result and nothing else.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, broadcast_object_list, set_seed

from . import checkpoint
from .checkpoint import EpochState, TrainerState
from .config import Config, TrainConfig, to_dict
from .data import Loaders, build_loaders, resolve_data_dir, start_worker_server
from .data.device import batch_format_for
from .data.preload import node_local_copy
from .errors import SharedUserError, StorageError, UserError, first_line
from .initial_weights import load_initial_weights, training_checkpoint
from .micro_batch import choose_micro_batch
from .mixing import training_criterion, with_mixing
from .models import bare_model, build_model, choose_channels_last, use_sync_batchnorm
from .optim import (
    TrainedWeights,
    TrainStep,
    build_optimizer,
    build_schedule,
    build_train_step,
    evaluation_weights,
    reads_training_batches,
)
from .optim.ema import WeightAverage, build_weight_average
from .peers import Heartbeat, heartbeat_interval, process_group_kwargs
from .preemption import CheckpointPolicy, StopRequests
from .profiling import StepProfiler
from .rundir import MetricsLog, default_run_dir, setup_logging, write_config
from .tracking import RunTracker
from .wandb_tracking import project_name

LOG = logging.getLogger("train")
# How often processes waiting for the main process's one-off work ask whether it is done.
POLL_S = 2.0
# DDP options that change no result: BatchNorm buffers are not broadcast from process 0 before
# every forward (only evaluation reads them, and validation.sync_buffers broadcasts them first),
# and the gradients live in DDP's all-reduce buckets (no copy between the two per step).
DDP_OPTIONS = DistributedDataParallelKwargs(broadcast_buffers=False, gradient_as_bucket_view=True)


@dataclass
class RunOptions:
    """What the entry point knows besides the config: plain values, read once."""
    output_dir: Path | None = None
    job_id: str | None = None  # SLURM_JOB_ID, names the default run directory
    launcher_mixed_precision: str | None = None  # what `accelerate launch` asked for, if anything
    resume: Path | None = None  # --resume: this checkpoint rather than the run directory's newest
    command: str = "python -m train"  # the command line, for the exported model card
    stop_on_time_limit_warnings: bool = True  # False in a preflight (preemption.StopRequests says why)


@dataclass
class Run:
    """What one training run carries from its first step to its export."""
    config: Config
    options: RunOptions
    accelerator: Accelerator
    run_dir: Path
    loaders: Loaders
    model: torch.nn.Module  # as prepared by Accelerate (DDP-wrapped on several processes)
    optimizer: torch.optim.Optimizer  # as prepared by Accelerate
    scheduler: torch.optim.lr_scheduler.LRScheduler  # stepped by the loop, once per optimizer step
    train_step: TrainStep  # the optimizer's step: plain, or SAM's
    weights: TrainedWeights  # the optimizer's choice of weights to evaluate and save
    trainer: TrainerState  # epoch, step, metrics so far: what every checkpoint records
    metrics_log: MetricsLog
    tracker: RunTracker
    stop: StopRequests
    policy: CheckpointPolicy
    profiler: StepProfiler  # [log] profile_steps; stepped by the loop after each training step
    heartbeat: Heartbeat  # this process's last step, posted for the others (train/peers.py)
    ema: WeightAverage | None = None  # [ema]: the weights' moving average, updated after each optimizer step


def choose_mixed_precision(use_amp: bool, launcher_choice: str | None, cuda: bool,
                           cuda_capability: tuple[int, int] | None) -> str | None:
    """``None`` lets Accelerate apply the launcher's choice; otherwise "no", "bf16" or "fp16"."""
    if not use_amp:
        return "no"
    if launcher_choice:
        return None
    if not cuda:
        return "no"  # CPU autocast is slower than fp32 for these models
    return "bf16" if cuda_capability and cuda_capability >= (8, 0) else "fp16"


def set_backend_flags(train: TrainConfig, cuda: bool) -> None:
    """Process-wide speed switches: TF32 matmuls/convolutions and cuDNN autotuning on GPUs;
    on CPUs, flushing denormal floats to zero (tiny gradients late in training otherwise
    make CPU kernels several times slower)."""
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = train.tf32
        torch.backends.cudnn.allow_tf32 = train.tf32
        torch.backends.cudnn.benchmark = train.cudnn_benchmark
    else:
        torch.set_flush_denormal(True)


def make_accelerator(train: TrainConfig, options: RunOptions) -> Accelerator:
    cuda = torch.cuda.is_available()
    set_backend_flags(train, cuda)
    capability = torch.cuda.get_device_capability() if cuda else None
    mixed = choose_mixed_precision(train.use_amp, options.launcher_mixed_precision, cuda, capability)
    # cpu=True without CUDA: a 2-process CPU launch then forms a real gloo process group
    # instead of two independent single-process runs.
    # TensorBoard goes through Accelerate's tracker. Accelerate wants a logging folder now;
    # RunTracker moves it into the run directory, which is named only once the processes
    # created here can agree on it (resolve_run_dir).
    # The process group's timeout bounds how long a lost or hung peer can keep the others waiting.
    return Accelerator(cpu=not cuda, mixed_precision=mixed, dynamo_backend="inductor" if train.compile else None,
                       log_with="tensorboard", project_config=ProjectConfiguration(logging_dir="runs"),
                       kwargs_handlers=[DDP_OPTIONS, process_group_kwargs(train.collective_timeout_s)])


def resolve_run_dir(accelerator: Accelerator, options: RunOptions) -> Path:
    """The run directory, the same on every process (the main process's timestamp wins)."""
    if options.output_dir is not None:
        run_dir = Path(options.output_dir)
    else:
        stamp = [datetime.now().strftime("%Y%m%d-%H%M%S")]
        broadcast_object_list(stamp, from_process=0)
        run_dir = default_run_dir(options.job_id, stamp[0])
    problem = [create_run_dir(run_dir) if accelerator.is_main_process else None]
    broadcast_object_list(problem, from_process=0)  # every process stops alike, none waits for the main one
    if problem[0] is not None:
        storage, message = problem[0]
        raise StorageError(message) if storage else SharedUserError(message)
    return run_dir


def create_run_dir(run_dir: Path) -> tuple[bool, str] | None:
    """Create the run directory; None when it is there and writable, else (whether the disk is
    full, a one-line message naming it)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(run_dir, os.W_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    except OSError as exc:
        where = f"--output-dir {run_dir}: cannot create the run directory"
        blocker = next((p for p in [run_dir, *run_dir.parents] if p.exists()), None)
        if isinstance(exc, (FileExistsError, NotADirectoryError)) and blocker is not None and not blocker.is_dir():
            return False, f"{where}: {blocker} is a file, not a folder"
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        return full, f"{where} ({exc.strerror or exc}); choose another --output-dir"
    return None


def on_main_process(accelerator: Accelerator, work: Callable[[], None]) -> None:
    """Run ``work`` on the main process alone while the others wait; an error it raises stops
    every process (the main one reports it).

    The others ask every POLL_S seconds whether it is done, with a small all-reduce each time:
    no process sits in one collective long enough to trip NCCL's timeout, however long the
    work takes (the first verification of ImageNet decodes 1.33 M images).
    """
    if accelerator.num_processes == 1:
        work()
        return
    failure: list[BaseException | None] = [None]
    worker = None
    if accelerator.is_main_process:
        def run() -> None:
            try:
                work()
            except BaseException as exc:  # handed to the main thread below
                failure[0] = exc
        worker = threading.Thread(target=run, name="main-process-work", daemon=True)
        worker.start()
    while True:
        done = torch.tensor([int(worker is not None and not worker.is_alive())], device=accelerator.device)
        if accelerator.reduce(done, "sum").item():
            break
        if worker is not None:
            worker.join(POLL_S)
        else:
            time.sleep(POLL_S)
    outcome = [None if failure[0] is None else (isinstance(failure[0], UserError), first_line(failure[0]))]
    broadcast_object_list(outcome, from_process=0)
    if failure[0] is not None:
        raise failure[0]
    if outcome[0] is not None:
        user_error, message = outcome[0]
        raise SharedUserError(message) if user_error else RuntimeError(f"the main process failed: {message}")


def start_afresh(run_dir: Path) -> None:
    """Clear what an earlier attempt with no complete checkpoint left behind."""
    for name in ("metrics.jsonl", "train.log"):
        (run_dir / name).unlink(missing_ok=True)


def open_run_dir(config: Config, options: RunOptions, accelerator: Accelerator) -> tuple[Path, Path | None]:
    """The run directory, ready for this attempt, and the checkpoint to resume from (or None)."""
    run_dir = resolve_run_dir(accelerator, options)
    setup_logging(None, accelerator.is_main_process)  # the console, until train.log is decided on
    # Every process reads the same files and reaches the same decision (or the same error).
    resume_from = checkpoint.choose_resume_point(run_dir, to_dict(config), options.resume)
    start = training_checkpoint(config.train.checkpoint_dir)
    if resume_from is None and start is not None:  # only while the run has no checkpoint of its own
        resume_from = checkpoint.choose_resume_point(run_dir, to_dict(config), start, "train.checkpoint_dir =")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if resume_from is None:
            start_afresh(run_dir)
        checkpoint.remove_partial_saves(run_dir)
        write_config(run_dir, config)
    accelerator.wait_for_everyone()
    setup_logging(run_dir, accelerator.is_main_process)
    return run_dir, resume_from


def start_run(config: Config, options: RunOptions, accelerator: Accelerator | None = None) -> tuple[Run, EpochState]:
    """Everything ready for the first (or resumed) step, and this process's position in the epoch.

    ``accelerator``: one made already by ``make_accelerator`` (the preflight needs its processes
    to agree on a scratch directory before the run starts)."""
    train = config.train
    start_worker_server(config.data)
    accelerator = accelerator or make_accelerator(train, options)
    run_dir, resume_from = open_run_dir(config, options, accelerator)
    metrics_log = MetricsLog(run_dir / "metrics.jsonl")
    set_seed(train.reproduce.seed)

    with accelerator.main_process_first():  # the built-in data set is generated once
        data_dir = resolve_data_dir(config.data.data_dir)
    if train.preprocess.preload_local:  # one copy per node, made by the node's first process
        with accelerator.local_main_process_first():
            data_dir = str(node_local_copy(data_dir, accelerator.is_local_main_process))
    # The model (still on the CPU) comes before the loaders, which hand batches over in its
    # memory layout: channels_last is decided from it.
    model = build_model(train.arch, config.data.num_classes, train.preprocess.train_crop_size,
                        train.preprocess.val_crop_size, train.model)
    if resume_from is None and train.checkpoint_dir:  # a fresh run from given weights (fine-tuning)
        with accelerator.main_process_first():  # a Hub download happens once
            loaded = load_initial_weights(model, train.checkpoint_dir,
                                          f"{train.arch} with {config.data.num_classes} classes")
        LOG.info(f"initialised the weights from {train.checkpoint_dir} ({loaded} tensors)")
    if train.sync_bn:
        model = use_sync_batchnorm(model, accelerator.num_processes, accelerator.device.type)
    # "auto" is decided once, here; the loop reads the decision from the run's config.
    train = dataclasses.replace(train, channels_last=choose_channels_last(train.channels_last,
                                                                          accelerator.device.type, model))
    config = dataclasses.replace(config, train=train)
    if train.channels_last:
        model = model.to(memory_format=torch.channels_last)

    per_process_batch = train.batch_size // accelerator.num_processes
    micro_batch = choose_micro_batch(train, config.data.num_classes, accelerator)  # "auto": tried on the GPU
    loaders = build_loaders(dataclasses.replace(config.data, data_dir=data_dir), train.preprocess,
                            per_process_batch, accelerator.num_processes, accelerator.process_index,
                            train.reproduce.seed,
                            batch_format_for(accelerator.device, train.channels_last, accelerator.mixed_precision),
                            on_main_process=lambda work: on_main_process(accelerator, work), micro_batch=micro_batch)
    if loaders.build_before_training is not None:
        # The statistics stream serves Schedule-Free's averaged weights and a recomputation asked
        # for before the final evaluation. Built before prepare() puts the model on the GPU.
        reads_stats = reads_training_batches(train.optim) or train.recompute_bn_before_final_eval
        LOG.info(loaders.build_before_training(reads_stats))

    optimizer = build_optimizer(model, train.optim, train.lr, loaders.steps_per_epoch, accelerator.device.type)
    # The schedule is stepped by hand: accelerator.prepare would step it once per process.
    scheduler = build_schedule(optimizer, train.lr_scheduler, train.lr, loaders.steps_per_epoch, train.max_epochs)
    model, optimizer = accelerator.prepare(model, optimizer)
    criterion = training_criterion(train)  # soft-target cross-entropy when [mixup] mixes the batches
    train_step = with_mixing(build_train_step(train.optim, model, optimizer, criterion, accelerator,
                                              train.grad_clip_norm), train, config.data.num_classes)
    ema = build_weight_average(bare_model(accelerator, model), train.ema)  # a copy on the device: after prepare

    trainer = TrainerState(class_names=list(loaders.class_names), class_descriptions=list(loaders.class_descriptions))
    epoch_state = EpochState()
    if resume_from is not None:
        trainer, epoch_state = checkpoint.load(accelerator, resume_from, scheduler, ema)
        if trainer.class_names == list(loaders.class_names):
            # The data's class table may be newer than the checkpoint (or the checkpoint older
            # than class tables): exports use the current one.
            trainer = dataclasses.replace(trainer, class_descriptions=list(loaders.class_descriptions))
        if accelerator.is_main_process:
            metrics_log.rewrite(trainer.metrics)  # drop records written after that checkpoint
        LOG.info(f"resumed from {resume_from}: epoch {trainer.epoch + 1}, batch {epoch_state.batches_done}, "
                 f"step {trainer.step + epoch_state.batches_done}")  # the checkpoint's step, as it is named
    # Steps after the resume point are logged again; the tracker hides the earlier attempt's.
    tracker = RunTracker(accelerator, run_dir, to_dict(config), resumed_at_step=trainer.step + epoch_state.batches_done,
                         wandb_project=project_name(train.log) if train.log.wandb_on else None)

    LOG.info(f"run directory: {run_dir.resolve()}")
    LOG.info(f"{train.arch} on {accelerator.num_processes} process(es), device {accelerator.device.type}, "
             f"mixed precision {accelerator.mixed_precision}, channels_last {str(train.channels_last).lower()}; "
             f"data {config.data.data_dir}: "
             f"{loaders.num_train} train / {loaders.num_val} val images, {len(loaders.class_names)} classes; "
             f"{loaders.steps_per_epoch} steps per epoch at global batch {train.batch_size}"
             + (f", each {loaders.micro_batches_per_step} micro-batches of {micro_batch} per process"
                if loaders.micro_batches_per_step > 1 else ""))

    stop = StopRequests(stop_on_warnings=options.stop_on_time_limit_warnings).install()
    policy = CheckpointPolicy(stop, train.log.checkpoint_every_steps, train.log.checkpoint_every_minutes,
                              train.log.log_freq, accelerator.is_main_process, accelerator.device)
    run = Run(config=config, options=options, accelerator=accelerator, run_dir=run_dir, loaders=loaders, model=model,
              optimizer=optimizer, scheduler=scheduler, train_step=train_step,
              weights=evaluation_weights(train.optim, optimizer), trainer=trainer, metrics_log=metrics_log,
              tracker=tracker, stop=stop, policy=policy,
              profiler=StepProfiler(train.log.profile_steps, run_dir, accelerator.is_main_process,
                                    accelerator.device.type == "cuda"),
              heartbeat=Heartbeat(accelerator.process_index, accelerator.num_processes,
                                  heartbeat_interval(min(train.collective_timeout_s, train.progress_timeout_s)),
                                  train.progress_timeout_s).start(),
              ema=ema)
    return run, epoch_state
