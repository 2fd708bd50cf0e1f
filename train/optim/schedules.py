"""Learning-rate schedules, stepped once per optimizer step (not per epoch)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..config import ConstantScheduleConfig, CosineScheduleConfig, ScheduleConfig


def cosine_with_warmup(peak_lr: float, warmup_steps: int, total_steps: int, warmup_decay: float,
                       eta_min: float) -> Callable[[int], float]:
    """lr(step): linear from ``peak_lr * warmup_decay`` to ``peak_lr`` over ``warmup_steps``,
    then a half cosine from ``peak_lr`` down to ``eta_min`` at ``total_steps``."""

    def lr_at(step: int) -> float:
        if step < warmup_steps:
            return peak_lr * (warmup_decay + (1 - warmup_decay) * step / warmup_steps)
        decay_steps = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        return eta_min + (peak_lr - eta_min) * 0.5 * (1 + math.cos(math.pi * progress))

    return lr_at


def constant(peak_lr: float) -> Callable[[int], float]:
    return lambda step: peak_lr


def triangular(peak_lr: float, peak_steps: int, total_steps: int, start_factor: float,
               end_lr: float) -> Callable[[int], float]:
    """lr(step): linear from ``peak_lr * start_factor`` at step 0 to ``peak_lr`` at ``peak_steps``,
    then linear down to ``end_lr`` at ``total_steps`` (the step after the last update), as FFCV's
    ResNet recipes interpolate their per-epoch values per step. Past ``total_steps`` it stays there."""

    def lr_at(step: int) -> float:
        if step < peak_steps:
            return peak_lr * (start_factor + (1 - start_factor) * step / peak_steps)
        progress = min(1.0, (step - peak_steps) / max(1, total_steps - peak_steps))
        return peak_lr + (end_lr - peak_lr) * progress

    return lr_at


def lr_function(cfg: ScheduleConfig, peak_lr: float, steps_per_epoch: int, max_epochs: int) -> Callable[[int], float]:
    """lr(step) of ``[lr_scheduler]``: "constant", "cosine" or "triangular"."""
    if isinstance(cfg, ConstantScheduleConfig):
        return constant(peak_lr)
    total_steps = steps_per_epoch * max_epochs
    if isinstance(cfg, CosineScheduleConfig):
        warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
        return cosine_with_warmup(peak_lr, warmup_steps, total_steps, cfg.warmup_decay, cfg.eta_min)
    return triangular(peak_lr, round(cfg.peak_epoch * steps_per_epoch), total_steps, cfg.start_factor, cfg.end_lr)


def build_schedule(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, peak_lr: float,
                   steps_per_epoch: int, max_epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR whose lr after ``n`` calls to ``step()`` is ``lr_function(...)(n)``.

    Every parameter group starts at ``peak_lr``, so the multiplier is lr(step) / peak_lr.
    """
    lr_at = lr_function(cfg, peak_lr, steps_per_epoch, max_epochs)
    for group in optimizer.param_groups:
        group["lr"] = peak_lr
        group.setdefault("initial_lr", peak_lr)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step) / peak_lr)


def rewind(scheduler: torch.optim.lr_scheduler.LambdaLR, steps: int) -> None:
    """Take back ``steps`` calls to ``scheduler.step()`` (steps the optimizer skipped after
    all): the count goes back and the optimizer's lr is set for the step it is really at."""
    if steps <= 0:
        return
    scheduler.last_epoch -= steps
    lrs = [base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs
