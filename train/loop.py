"""The training loop: for each epoch, train, evaluate when due, checkpoint when due.

``startup.start_run`` builds what a run carries (a ``Run``); this module decides what happens
in a step and at the end of an epoch. Accelerate owns processes, devices and mixed precision;
the optimizer's registry entry decides which step runs and which weights are evaluated and
saved (``optim/``); which samples each process reads is the loaders' job (``data/``).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from pathlib import Path

import torch

from . import checkpoint, cost
from .checkpoint import EpochState
from .config import Config, CropRamp
from .data.device import to_device
from .errors import first_line
from .export import write_model_folder
from .models import bare_model
from .optim import reported_lr
from .optim.batchnorm import recompute_running_stats
from .optim.schedules import rewind
from .peers import PeerLost, is_collective_failure
from .preemption import Action, Preempted
from .progress import EpochProgress, format_duration, run_summary
from .startup import Run, RunOptions, start_run
from .validation import evaluate

LOG = logging.getLogger("train")


def fit(config: Config, options: RunOptions) -> dict:
    """Train and evaluate as configured, resuming from a checkpoint when there is one.

    Returns the last metrics record; raises Preempted after a stop signal's checkpoint, and
    PeerLost when a collective failed (another process gone, stopped or cut off).
    """
    run, epoch_state = start_run(config, options)
    try:
        return _fit(run, epoch_state)
    except Exception as exc:
        if not is_collective_failure(exc):
            raise
        # One line says which process stopped; the checkpoint last written is the one to resume from.
        raise PeerLost(f"a collective failed ({first_line(exc)}); {run.heartbeat.describe_stalled()}") from exc
    finally:
        run.heartbeat.close()


def _fit(run: Run, epoch_state: EpochState) -> dict:
    train = run.config.train
    try:
        while run.trainer.epoch < train.max_epochs:
            epoch = run.trainer.epoch
            if not train_one_epoch(run, epoch_state):
                raise Preempted(f"stopped by {run.stop.describe()} after step "
                                f"{run.trainer.step + epoch_state.batches_done}")
            train_loss = epoch_mean_loss(run, epoch_state)
            run.trainer = dataclasses.replace(run.trainer, epoch=epoch + 1,
                                              step=run.trainer.step + epoch_state.batches_done,
                                              train_time_s=run.trainer.train_time_s + epoch_state.seconds)
            last_epoch = epoch + 1 == train.max_epochs
            if (epoch + 1) % train.eval_freq == 0 or last_epoch:
                evaluate_and_record(run, train_loss, epoch_state)
            stopping = run.policy.stop_agreed()  # a signal may have reached some processes only
            if (epoch + 1) % train.log.checkpoint_freq == 0 or last_epoch or stopping:
                save_checkpoint(run, EpochState())
            if stopping:
                raise Preempted(f"stopped by {run.stop.describe()} after epoch {epoch + 1}")
            epoch_state = EpochState()
    finally:
        run.stop.uninstall()
        run.profiler.close()
    return finish(run)


def train_one_epoch(run: Run, state: EpochState, until: int | None = None) -> bool:
    """Continue the current epoch from ``state`` over this process's shard; ``state`` is updated.

    After each step the checkpoint policy may ask for a checkpoint or for a stop (a signal).
    Returns False when stopped before the epoch's end. ``until``: end the pass once the epoch
    has this many steps done (the preflight's few steps), else at the epoch's end.
    """
    train, accelerator, loaders = run.config.train, run.accelerator, run.loaders
    loaders.set_epoch(run.trainer.epoch, state.batches_done)
    if state.loader_state is not None and loaders.load_state_dict is not None:
        loaders.load_state_dict(state.loader_state)
    if (side := ramp_crop_size(run)) is not None:
        LOG.info(f"epoch {run.trainer.epoch + 1}/{train.max_epochs}: training crops of {side} px")
    progress = EpochProgress(run.trainer.epoch, train.max_epochs, loaders.steps_per_epoch, train.batch_size,
                             enabled=accelerator.is_main_process, start=state.batches_done)
    run.model.train()
    run.weights.before_training()
    loss_sum = torch.tensor(state.loss_sum, device=accelerator.device)
    started = time.perf_counter() - state.seconds
    try:
        for micro_batches in loaders.train_steps():  # this process's share of a global batch
            micro_batches = [to_device(images, labels, accelerator.device, train.channels_last)
                             for images, labels in micro_batches]
            # forward and backward per micro-batch, one optimizer step (plain or SAM)
            loss, updated = run.train_step.on_micro_batches(micro_batches)
            if updated:  # an fp16 overflow skips the step: keep the lr schedule (and the average) in step
                run.scheduler.step()
                if run.ema is not None:
                    run.ema.update()
            run.profiler.step()

            loss_sum += loss.detach()
            state.batches_done += 1
            step = run.trainer.step + state.batches_done
            # Reading the loss back waits for the device, so it happens only every log_freq steps.
            loss_value = loss.item() if step % train.log.log_freq == 0 else None
            if loss_value is not None:
                correct_schedule(run)
            progress.update(state.batches_done, loss_value, reported_lr(run.optimizer))
            if loss_value is not None:
                run.tracker.log_train_step(step, loss_value, reported_lr(run.optimizer), progress.images_per_s,
                                           run.model)

            run.heartbeat.progressed(step)
            action = run.policy.after_step(step)
            if action:
                state.loss_sum, state.seconds = loss_sum.item(), time.perf_counter() - started
                run.heartbeat.pause()  # a checkpoint's write is no step: the collective timeout guards it
                save_checkpoint(run, state)
                run.heartbeat.progressed(step)
                if action & Action.STOP:
                    return False
            if state.batches_done == until:
                break
    finally:
        run.heartbeat.pause()
        progress.close()
    correct_schedule(run)
    state.loss_sum, state.seconds = loss_sum.item(), time.perf_counter() - started
    return True


def correct_schedule(run: Run) -> None:
    """Put the lr schedule back by the steps a fused fp16 optimizer skipped since the last call
    (counted on the device, read here: once per log interval, at the epoch's end and before a
    checkpoint). Until then the lr runs ahead by as many steps as were skipped."""
    rewind(run.scheduler, run.train_step.take_skipped_steps())


def ramp_crop_size(run: Run, epoch: int | None = None) -> int | None:
    """The training crop side of ``epoch`` (default: the one in progress) when ``train_crop_size``
    is a ramp; None for a fixed side, which the metrics and the log leave out as before."""
    crop = run.config.train.preprocess.train_crop_size
    return crop.size_at(run.trainer.epoch if epoch is None else epoch) if isinstance(crop, CropRamp) else None


def epoch_mean_loss(run: Run, state: EpochState) -> float:
    """The epoch's training loss averaged over all steps of all processes."""
    accelerator = run.accelerator
    total = accelerator.reduce(torch.tensor(state.loss_sum, dtype=torch.float64, device=accelerator.device), "sum")
    return total.item() / (max(state.batches_done, 1) * accelerator.num_processes)


def recompute_batchnorm(run: Run) -> int:
    """BatchNorm statistics recomputed for the weights in the model over ``num_samples_for_stats``
    training samples, the same on every process; returns the number of samples used."""
    train, accelerator, loaders = run.config.train, run.accelerator, run.loaders
    batch = train.batch_size // loaders.micro_batches_per_step  # global samples per (micro-)batch of the stream
    num_batches = min(loaders.steps_per_epoch * loaders.micro_batches_per_step,
                      -(-train.num_samples_for_stats // batch))
    images = (to_device(images, labels, accelerator.device, train.channels_last)[0]
              for images, labels in itertools.islice(loaders.train_stats(), num_batches))
    used = recompute_running_stats(bare_model(accelerator, run.model), images,
                                   lambda buffer: accelerator.reduce(buffer, "mean"), accelerator.autocast)
    return used * batch


def evaluate_and_record(run: Run, train_loss: float, epoch_state: EpochState) -> None:
    """Validation metrics for the epoch just trained, with the time left and the device-hours
    spent so far (``cost.py``): in metrics.jsonl, TensorBoard and the log."""
    train, trainer, accelerator = run.config.train, run.trainer, run.accelerator
    last = trainer.epoch == train.max_epochs
    started = time.perf_counter()
    # The evaluated weights stay in the model until the next epoch's training, or for the export.
    bn_samples = run.weights.before_evaluation(lambda: recompute_batchnorm(run),
                                               statistics_asked=last and train.recompute_bn_before_final_eval)
    val = evaluate(run.model, run.loaders.val, accelerator, train.label_smoothing, run.config.data.num_classes,
                   train.channels_last, hflip=train.eval_hflip)
    if run.ema is not None:  # the moving average beside them: val_loss_ema, val_acc1_ema, ...
        val_ema = evaluate(run.ema.module, run.loaders.val, accelerator, train.label_smoothing,
                           run.config.data.num_classes, train.channels_last, hflip=train.eval_hflip)
        val.update({f"{name}_ema": value for name, value in val_ema.items() if name != "val_samples"})
    eval_time = time.perf_counter() - started
    trainer = run.trainer = dataclasses.replace(trainer, eval_time_s=trainer.eval_time_s + eval_time)
    steps, epoch_time = epoch_state.batches_done, epoch_state.seconds
    steps_left = (train.max_epochs - trainer.epoch) * run.loaders.steps_per_epoch
    eta = cost.time_left_s(steps_left, epoch_time / max(steps, 1),
                           cost.evaluations_left(trainer.epoch, train.max_epochs, train.eval_freq), eval_time)
    record = {"epoch": trainer.epoch, "step": trainer.step, "train_loss": train_loss, **val,
              "lr": reported_lr(run.optimizer), "epoch_time_s": epoch_time, "train_time_s": trainer.train_time_s,
              "images_per_s": steps * train.batch_size / epoch_time, "bn_stats_samples": bn_samples,
              "eval_time_s": eval_time, "eta_s": eta,
              "gpu_hours": cost.device_hours(trainer.train_time_s + trainer.eval_time_s, accelerator.num_processes)}
    if (side := ramp_crop_size(run, trainer.epoch - 1)) is not None:  # the epoch just trained
        record["train_crop_size"] = side
    trainer.metrics.append(record)
    if accelerator.is_main_process:
        run.metrics_log.append(record)
    run.tracker.log_evaluation(record)
    LOG.info(f"epoch {trainer.epoch}/{train.max_epochs} step {trainer.step}: train loss {train_loss:.4f}, "
             f"val loss {val['val_loss']:.4f}, top-1 {val['val_acc1']:.2f}%, top-5 {val['val_acc5']:.2f}% "
             f"({val['val_samples']} images)"
             + (f", EMA top-1 {val['val_acc1_ema']:.2f}%, top-5 {val['val_acc5_ema']:.2f}%" if run.ema else "")
             + f", {record['images_per_s']:.0f} img/s, epoch {epoch_time:.1f}s; "
             f"run eta {format_duration(eta)}, {record['gpu_hours']:.3f} {hours_unit(accelerator)} so far")


def hours_unit(accelerator) -> str:
    """What one process's hour is: a GPU's, or on the CPU a process's."""
    return "GPU-hours" if accelerator.device.type == "cuda" else "process-hours"


def save_checkpoint(run: Run, state: EpochState) -> None:
    """A checkpoint of every process at ``state``'s position (collective: all processes call it)."""
    correct_schedule(run)
    if run.loaders.state_dict is not None:
        state.loader_state = run.loaders.state_dict()
    with run.weights.while_saving():
        path = checkpoint.save(run.accelerator, run.run_dir, run.trainer, state, run.scheduler,
                               run.config.train.log.keep_last, run.ema)
    run.policy.saved()
    LOG.info(f"checkpoint: {path}")


def finish(run: Run) -> dict:
    """Export the evaluated weights, print the summary, close the tracker; returns the last record."""
    trainer, accelerator = run.trainer, run.accelerator
    record = trainer.metrics[-1] if trainer.metrics else {}
    if accelerator.is_main_process and record:
        model_dir = export_model(run)
        LOG.info(run_summary(record, trainer.metrics, run.config.train.max_epochs, run.run_dir,
                             checkpoint.list_checkpoints(run.run_dir), model_dir, run.tracker.log_dir,
                             hours_unit(accelerator)))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return record


def export_model(run: Run) -> Path:
    """The model's current weights, or their moving average (``[train.ema] export``), as a timm
    model folder, ``<run>/model`` (main process only)."""
    trainer = run.trainer
    weights = run.ema.module if run.config.train.ema.export == "ema" else bare_model(run.accelerator, run.model)
    return write_model_folder(run.run_dir / "model", weights, run.config,
                              tuple(trainer.class_names), trainer.metrics, run.options.command,
                              tuple(trainer.class_descriptions))
