"""Optimizers by name (``[optim] name``), each built from its own config section.

An entry says how to build the torch optimizer, which train step drives it (``steps.py``,
or SAM's in ``sam.py``) and whether it evaluates with averaged weights (Schedule-Free).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from accelerate import Accelerator

from . import schedule_free
from .config import AdamConfig, AdamWConfig, OptimConfig, SGDConfig, SGDSAMConfig, UserError
from .sam import SingleStepSAM, TwoStepSAM
from .steps import TrainStep


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay for weight matrices and kernels only.

    Normalization scales/shifts and biases are the 1-D (or scalar) parameters: deciding by
    shape rather than by name works for every timm architecture without a list of names.
    """
    decay, no_decay = [], []
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        (decay if parameter.ndim > 1 else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def _sgd(groups: list[dict], cfg: SGDConfig, lr: float, steps_per_epoch: int) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


def _adam(groups: list[dict], cfg: AdamConfig, lr: float, steps_per_epoch: int) -> torch.optim.Optimizer:
    return torch.optim.Adam(groups, lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.epsilon)


def _adamw(groups: list[dict], cfg: AdamWConfig, lr: float, steps_per_epoch: int) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.epsilon)


def _sam_base(groups: list[dict], cfg: SGDSAMConfig, lr: float, steps_per_epoch: int) -> torch.optim.Optimizer:
    """SAM's base optimizer is plain SGD: the lr schedule and weight decay act on it as on SGD."""
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)


def _plain_step(cfg: OptimConfig, *args) -> TrainStep:
    return TrainStep(*args)


def _sam_step(cfg: SGDSAMConfig, *args) -> TrainStep:
    return (SingleStepSAM if cfg.v2 else TwoStepSAM)(*args, rho=cfg.rho, adaptive=cfg.adaptive)


@dataclass(frozen=True)
class OptimizerEntry:
    # (param groups, config section, peak lr, steps per epoch) -> torch optimizer
    build: Callable[[list[dict], Any, float, int], torch.optim.Optimizer]
    # (config section, model, optimizer, criterion, accelerator, grad_clip_norm) -> train step
    train_step: Callable[..., TrainStep] = _plain_step
    # Evaluates with weights other than those it trains (Schedule-Free's average): the loop
    # then switches weights with optimizer.eval()/train() and recomputes BatchNorm statistics.
    averages_weights: bool = False
    # Start-up checks beyond the config schema: (config section, source) -> None or UserError.
    check: Callable[[Any, str], None] | None = None


OPTIMIZERS: dict[str, OptimizerEntry] = {
    "sgd": OptimizerEntry(_sgd),
    "adam": OptimizerEntry(_adam),
    "adamw": OptimizerEntry(_adamw),
    "sgd-schedule-free": OptimizerEntry(schedule_free.sgd_schedule_free, averages_weights=True,
                                        check=schedule_free.check_config),
    "adamw-schedule-free": OptimizerEntry(schedule_free.adamw_schedule_free, averages_weights=True,
                                          check=schedule_free.check_config),
    "sgd-sam": OptimizerEntry(_sam_base, train_step=_sam_step),
}


def check_supported(cfg: OptimConfig, source: str) -> None:
    if cfg.name not in OPTIMIZERS:
        raise UserError(f"{source}: train.optim.name = {cfg.name!r} is not yet supported "
                        f"(available now: {', '.join(map(repr, OPTIMIZERS))})")
    check = OPTIMIZERS[cfg.name].check
    if check is not None:
        check(cfg, source)


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, lr: float, steps_per_epoch: int) -> torch.optim.Optimizer:
    """The optimizer for ``model``, weight decay on weight matrices and kernels only."""
    return OPTIMIZERS[cfg.name].build(param_groups(model, cfg.weight_decay), cfg, lr, steps_per_epoch)


def build_train_step(cfg: OptimConfig, model: torch.nn.Module, optimizer, criterion, accelerator: Accelerator,
                     grad_clip_norm: float) -> TrainStep:
    """The step that drives this optimizer; ``model`` and ``optimizer`` as returned by ``prepare``."""
    return OPTIMIZERS[cfg.name].train_step(cfg, model, optimizer, criterion, accelerator, grad_clip_norm)


def averages_weights(cfg: OptimConfig) -> bool:
    return OPTIMIZERS[cfg.name].averages_weights


def reported_lr(optimizer: torch.optim.Optimizer) -> float:
    """The lr of the last step as the optimizer applied it.

    Schedule-Free warms up inside the optimizer and records the lr it used as
    ``scheduled_lr``; for the others the schedule sets ``lr`` itself.
    """
    group = optimizer.param_groups[0]
    return group.get("scheduled_lr", group["lr"])
