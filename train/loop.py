"""The training loop: set up, then for each epoch train, evaluate and record.

Accelerate owns processes, devices and mixed precision; this module decides what happens
in a step and when to evaluate. Sharding of the data is the loaders' job (see
``data/sampling.py``), which is why loaders are not passed through ``accelerator.prepare``.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, broadcast, broadcast_object_list, set_seed

from . import checkpoint
from .batchnorm import recompute_running_stats
from .checkpoint import EpochState, TrainerState
from .config import Config, TrainConfig, UserError, to_dict
from .data import Loaders, build_loaders, resolve_data_dir
from .export import write_model_folder
from .models import build_model, use_sync_batchnorm
from .optim import averages_weights, build_optimizer, build_train_step, reported_lr
from .preemption import Action, CheckpointPolicy, Preempted, StopRequests
from .progress import EpochProgress, run_summary
from .rundir import MetricsLog, default_run_dir, setup_logging, write_config
from .schedules import build_schedule
from .steps import TrainStep
from .tracking import RunTracker

LOG = logging.getLogger("train")


@dataclass
class RunOptions:
    """What the entry point knows besides the config: plain values, read once."""
    output_dir: Path | None = None
    job_id: str | None = None  # SLURM_JOB_ID, names the default run directory
    launcher_mixed_precision: str | None = None  # what `accelerate launch` asked for, if anything
    resume: Path | None = None  # --resume: this checkpoint rather than the run directory's newest
    command: str = "python -m train"  # the command line, for the exported model card


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
    return Accelerator(cpu=not cuda, mixed_precision=mixed, dynamo_backend="inductor" if train.compile else None,
                       log_with="tensorboard", project_config=ProjectConfiguration(logging_dir="runs"))


def resolve_run_dir(accelerator: Accelerator, options: RunOptions) -> Path:
    """The run directory, the same on every process (the main process's timestamp wins)."""
    if options.output_dir is not None:
        run_dir = Path(options.output_dir)
    else:
        stamp = [datetime.now().strftime("%Y%m%d-%H%M%S")]
        broadcast_object_list(stamp, from_process=0)
        run_dir = default_run_dir(options.job_id, stamp[0])
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    return run_dir


def sync_buffers(model: torch.nn.Module, accelerator: Accelerator) -> None:
    """Give every process the main process's buffers (BatchNorm statistics).

    Each process updates its running statistics from its own shard, so they drift apart
    between DDP's broadcasts; evaluating with identical buffers makes the result exact.
    """
    if accelerator.num_processes == 1:
        return
    for buffer in accelerator.unwrap_model(model).buffers():
        buffer.copy_(broadcast(buffer.detach().clone(), from_process=0))


def to_device(images: torch.Tensor, labels: torch.Tensor, device: torch.device,
              channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    images = images.to(device, non_blocking=True)
    if images.ndim == 4 and channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True)


def enter_training(model, optimizer) -> None:
    """Model and optimizer in training mode (Schedule-Free: the parameters hold the trained weights)."""
    model.train()
    optimizer.train()


@contextmanager
def eval_weights(optimizer) -> Iterator[None]:
    """Inside, the parameters hold the weights to evaluate and save; afterwards, the mode found.

    Only Schedule-Free's differ from the trained ones: ``optimizer.eval()`` swaps in its
    average. Every checkpoint is written inside this, as the schedulefree package asks; the
    optimizer's state records the mode, so ``enter_training`` puts a resumed run right.
    """
    was_training = optimizer.param_groups[0].get("train_mode", False)  # schedulefree's own flag
    optimizer.eval()
    try:
        yield
    finally:
        if was_training:
            optimizer.train()


def prepare_for_eval(model, optimizer, loaders: Loaders, accelerator: Accelerator, train: TrainConfig) -> None:
    """Put the weights to evaluate (or export) in the model, until ``enter_training``.

    Schedule-Free: its averaged weights (``optimizer.eval()``), with BatchNorm statistics
    recomputed for them over ``num_samples_for_stats`` training samples, the same on every
    process. Other optimizers evaluate the weights they train, as they are.
    """
    if not averages_weights(train.optim):
        return
    optimizer.eval()
    if loaders.train_stats is None:
        raise UserError(f"train.optim.name = {train.optim.name!r} recomputes BatchNorm statistics, and this "
                        "data loader provides no stream of training batches for it (Loaders.train_stats)")
    num_batches = min(loaders.steps_per_epoch, -(-train.num_samples_for_stats // train.batch_size))
    images = (to_device(images, labels, accelerator.device, train.channels_last)[0]
              for images, labels in itertools.islice(loaders.train_stats(), num_batches))
    used = recompute_running_stats(accelerator.unwrap_model(model), images,
                                   lambda buffer: accelerator.reduce(buffer, "mean"), accelerator.autocast)
    if used:
        LOG.info(f"BatchNorm statistics recomputed for the averaged weights over "
                 f"{used * train.batch_size} training samples")


def train_one_epoch(model, loader, optimizer, scheduler, train_step: TrainStep, accelerator: Accelerator,
                    train: TrainConfig, progress: EpochProgress, first_step: int, state: EpochState,
                    policy: CheckpointPolicy, save: Callable[[EpochState], None], tracker: RunTracker) -> bool:
    """Continue the epoch from ``state`` over this process's shard; ``state`` is updated.

    After each step ``policy`` may ask for a checkpoint (``save`` is called with the epoch's
    position) or for a stop. Returns False when stopped before the epoch's end.
    """
    enter_training(model, optimizer)
    loss_sum = torch.tensor(state.loss_sum, device=accelerator.device)
    started = time.perf_counter() - state.seconds
    for images, labels in loader:
        images, labels = to_device(images, labels, accelerator.device, train.channels_last)
        loss, updated = train_step(images, labels)  # forward, backward, optimizer step (plain or SAM)
        if updated:  # an fp16 overflow skips the step: keep the lr schedule in step with updates
            scheduler.step()

        loss_sum += loss.detach()
        state.batches_done += 1
        step = first_step + state.batches_done
        # Reading the loss back waits for the device, so it happens only every log_freq steps.
        at_log_step = step % train.log.log_freq == 0
        loss_value = loss.item() if at_log_step else None
        progress.update(state.batches_done, loss_value, reported_lr(optimizer))
        if at_log_step:
            tracker.log_train_step(step, loss_value, reported_lr(optimizer), progress.images_per_s, model)

        action = policy.after_step(step)
        if action:
            state.loss_sum, state.seconds = loss_sum.item(), time.perf_counter() - started
            save(state)
            if action & Action.STOP:
                return False
    state.loss_sum, state.seconds = loss_sum.item(), time.perf_counter() - started
    return True


def epoch_mean_loss(state: EpochState, accelerator: Accelerator) -> float:
    """The epoch's training loss averaged over all steps of all processes."""
    total = accelerator.reduce(torch.tensor(state.loss_sum, dtype=torch.float64, device=accelerator.device), "sum")
    return total.item() / (max(state.batches_done, 1) * accelerator.num_processes)


@torch.no_grad()
def evaluate(model, loader, accelerator: Accelerator, label_smoothing: float, num_classes: int,
             channels_last: bool) -> dict:
    """Loss, top-1 and top-5 over the whole validation set, each image counted once."""
    sync_buffers(model, accelerator)
    # The unwrapped model: evaluation shards may differ in length by one batch, and no
    # process may wait on a collective operation that another never reaches.
    net = accelerator.unwrap_model(model)
    net.eval()
    top_k = min(5, num_classes)
    # loss sum, top-1 hits, top-5 hits, samples; float64 keeps large counts exact.
    totals = torch.zeros(4, dtype=torch.float64, device=accelerator.device)
    for images, labels in loader:
        images, labels = to_device(images, labels, accelerator.device, channels_last)
        with accelerator.autocast():
            logits = net(images)
        logits = logits.float()
        loss = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=label_smoothing, reduction="sum")
        hits = logits.topk(top_k, dim=1).indices.eq(labels[:, None])
        totals += torch.stack([loss.double(), hits[:, 0].sum().double(), hits.any(dim=1).sum().double(),
                               torch.tensor(len(labels), dtype=torch.float64, device=totals.device)])
    totals = accelerator.reduce(totals, "sum").tolist()
    samples = int(totals[3])
    return {"val_loss": totals[0] / max(samples, 1), "val_acc1": 100 * totals[1] / max(samples, 1),
            "val_acc5": 100 * totals[2] / max(samples, 1), "val_samples": samples}


def run(config: Config, options: RunOptions) -> dict:
    """Train and evaluate as configured, resuming from a checkpoint when there is one.

    Returns the last metrics record; raises Preempted after a stop signal's checkpoint.
    """
    train = config.train
    accelerator = make_accelerator(train, options)
    run_dir = resolve_run_dir(accelerator, options)
    config_table = to_dict(config)
    setup_logging(None, accelerator.is_main_process)  # the console, until train.log is decided on
    # Every process reads the same files and reaches the same decision (or the same error).
    resume_from = checkpoint.choose_resume_point(run_dir, config_table, options.resume)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if resume_from is None:
            start_afresh(run_dir)
        checkpoint.remove_partial_saves(run_dir)
        write_config(run_dir, config)
    accelerator.wait_for_everyone()
    setup_logging(run_dir, accelerator.is_main_process)
    metrics_log = MetricsLog(run_dir / "metrics.jsonl")
    set_seed(train.reproduce.seed)

    with accelerator.main_process_first():  # the built-in data set is generated once
        data_dir = resolve_data_dir(config.data.data_dir)
    per_process_batch = train.batch_size // accelerator.num_processes
    loaders = build_loaders(dataclasses.replace(config.data, data_dir=data_dir), train.preprocess,
                            per_process_batch, accelerator.num_processes, accelerator.process_index,
                            train.reproduce.seed, pin_memory=accelerator.device.type == "cuda")

    model = build_model(train.arch, config.data.num_classes, train.preprocess.train_crop_size,
                        train.preprocess.val_crop_size)
    if train.sync_bn:
        model = use_sync_batchnorm(model, accelerator.num_processes, accelerator.device.type)
    if train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, train.optim, train.lr, loaders.steps_per_epoch)
    # The schedule is stepped by hand: accelerator.prepare would step it once per process.
    scheduler = build_schedule(optimizer, train.lr_scheduler, train.lr, loaders.steps_per_epoch, train.max_epochs)
    model, optimizer = accelerator.prepare(model, optimizer)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=train.label_smoothing)
    train_step = build_train_step(train.optim, model, optimizer, criterion, accelerator, train.grad_clip_norm)

    trainer = TrainerState(class_names=list(loaders.class_names), class_descriptions=list(loaders.class_descriptions))
    epoch_state = EpochState()
    if resume_from is not None:
        trainer, epoch_state = checkpoint.load(accelerator, resume_from, scheduler)
        if trainer.class_names == list(loaders.class_names):
            # The data's class table may be newer than the checkpoint (or the checkpoint older
            # than class tables): exports use the current one.
            trainer = dataclasses.replace(trainer, class_descriptions=list(loaders.class_descriptions))
        if accelerator.is_main_process:
            metrics_log.rewrite(trainer.metrics)  # drop records written after that checkpoint
        LOG.info(f"resumed from {resume_from}: epoch {trainer.epoch + 1}, batch {epoch_state.batches_done}, "
                 f"step {trainer.step + epoch_state.batches_done}")  # the checkpoint's step, as it is named
    # Steps after the resume point are logged again; the tracker hides the earlier attempt's.
    tracker = RunTracker(accelerator, run_dir, config_table, resumed_at_step=trainer.step + epoch_state.batches_done)

    LOG.info(f"run directory: {run_dir.resolve()}")
    LOG.info(f"{train.arch} on {accelerator.num_processes} process(es), device {accelerator.device.type}, "
             f"mixed precision {accelerator.mixed_precision}; data {config.data.data_dir}: "
             f"{loaders.num_train} train / {loaders.num_val} val images, {len(loaders.class_names)} classes; "
             f"{loaders.steps_per_epoch} steps per epoch at global batch {train.batch_size}")

    def save_checkpoint(state: EpochState) -> None:
        if loaders.state_dict is not None:
            state.loader_state = loaders.state_dict()
        with eval_weights(optimizer):  # Schedule-Free saves its averaged weights, as its package asks
            path = checkpoint.save(accelerator, run_dir, trainer, state, scheduler, train.log.keep_last)
        policy.saved()
        LOG.info(f"checkpoint: {path}")

    requests = StopRequests().install()
    policy = CheckpointPolicy(requests, train.log.checkpoint_every_steps, train.log.checkpoint_every_minutes,
                              accelerator.num_processes, accelerator.is_main_process)
    try:
        while trainer.epoch < train.max_epochs:
            epoch = trainer.epoch
            loaders.set_epoch(epoch, epoch_state.batches_done)
            if epoch_state.loader_state is not None and loaders.load_state_dict is not None:
                loaders.load_state_dict(epoch_state.loader_state)
            progress = EpochProgress(epoch, train.max_epochs, loaders.steps_per_epoch, train.batch_size,
                                     enabled=accelerator.is_main_process, start=epoch_state.batches_done)
            finished = train_one_epoch(model, loaders.train, optimizer, scheduler, train_step, accelerator, train,
                                       progress, trainer.step, epoch_state, policy, save_checkpoint, tracker)
            progress.close()
            if not finished:
                raise Preempted(f"stopped by signal {requests.received} after step "
                                f"{trainer.step + epoch_state.batches_done}")

            train_loss = epoch_mean_loss(epoch_state, accelerator)
            steps, epoch_time = epoch_state.batches_done, epoch_state.seconds
            trainer = dataclasses.replace(trainer, epoch=epoch + 1, step=trainer.step + steps,
                                          train_time_s=trainer.train_time_s + epoch_time)
            epoch_state = EpochState()
            last_epoch = epoch + 1 == train.max_epochs
            if (epoch + 1) % train.eval_freq == 0 or last_epoch:
                prepare_for_eval(model, optimizer, loaders, accelerator, train)  # until the next epoch's training
                val = evaluate(model, loaders.val, accelerator, train.label_smoothing, config.data.num_classes,
                               train.channels_last)
                record = {"epoch": epoch + 1, "step": trainer.step, "train_loss": train_loss, **val,
                          "lr": reported_lr(optimizer), "epoch_time_s": epoch_time,
                          "train_time_s": trainer.train_time_s, "images_per_s": steps * train.batch_size / epoch_time}
                trainer.metrics.append(record)
                if accelerator.is_main_process:
                    metrics_log.append(record)
                tracker.log_evaluation(record)
                LOG.info(f"epoch {epoch + 1}/{train.max_epochs} step {trainer.step}: train loss {train_loss:.4f}, "
                         f"val loss {val['val_loss']:.4f}, top-1 {val['val_acc1']:.2f}%, "
                         f"top-5 {val['val_acc5']:.2f}% ({val['val_samples']} images), "
                         f"{record['images_per_s']:.0f} img/s, epoch {epoch_time:.1f}s")
            if (epoch + 1) % train.log.checkpoint_freq == 0 or last_epoch or requests.received is not None:
                save_checkpoint(EpochState())
            if requests.received is not None:
                raise Preempted(f"stopped by signal {requests.received} after epoch {epoch + 1}")
    finally:
        requests.uninstall()

    record = trainer.metrics[-1] if trainer.metrics else {}
    if accelerator.is_main_process and record:
        model_dir = write_model_folder(run_dir / "model", accelerator.unwrap_model(model), config,
                                       tuple(trainer.class_names), trainer.metrics, options.command,
                                       tuple(trainer.class_descriptions))
        LOG.info(run_summary(record, trainer.metrics, train.max_epochs, run_dir, checkpoint.list_checkpoints(run_dir),
                             model_dir, tracker.log_dir))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return record


def start_afresh(run_dir: Path) -> None:
    """Clear what an earlier attempt with no complete checkpoint left behind."""
    for name in ("metrics.jsonl", "train.log"):
        (run_dir / name).unlink(missing_ok=True)
