"""Optimizers by name (``[optim] name``): one entry each, built from its own config section.

An entry says how to build the torch optimizer, which train step drives it (``step.py``, or
SAM's in ``sam.py``), which weights the run evaluates (``weights.py``; Schedule-Free's average
in ``schedule_free.py``) and what to check at start-up beyond the config schema. Adding an
optimizer is a config section in ``train/config.py`` and an entry here. Any other name timm's
``create_optimizer_v2`` knows gets the plain step and weights (``timm_optimizers.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from timm.optim import param_groups_weight_decay

from ..config import AdamConfig, AdamWConfig, OptimConfig, SGDConfig, SGDSAMConfig, TimmOptimizerConfig
from . import schedule_free, timm_optimizers
from .sam import SingleStepSAM, TwoStepSAM
from .step import TrainStep
from .weights import TrainedWeights


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups, weight decay first: weight matrices and kernels, then everything timm exempts.

    timm exempts 1-D parameters (normalization scales and shifts), biases, and the names the
    model lists in ``no_weight_decay()`` (a ViT's position embedding and class token). Both
    groups exist, in this order, whatever the decay, because checkpoints store the optimizer's
    state by group: a run resumes into the layout it was saved with.
    """
    exempt = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    # Any decay > 0 makes timm split by shape and name; the real value is set below.
    split = param_groups_weight_decay(model, weight_decay=1.0, no_weight_decay_list=exempt)
    decay = [p for group in split if group["weight_decay"] > 0 for p in group["params"]]
    no_decay = [p for group in split if group["weight_decay"] == 0 for p in group["params"]]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def _sgd(groups: list[dict], cfg: SGDConfig, lr: float, steps_per_epoch: int, fused: bool = False):
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, fused=fused or None)


def _adam(groups: list[dict], cfg: AdamConfig, lr: float, steps_per_epoch: int, fused: bool = False):
    return torch.optim.Adam(groups, lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.epsilon, fused=fused or None)


def _adamw(groups: list[dict], cfg: AdamWConfig, lr: float, steps_per_epoch: int, fused: bool = False):
    return torch.optim.AdamW(groups, lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.epsilon, fused=fused or None)


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
    # (prepared optimizer) -> the hook that puts the weights to evaluate and save in the model
    weights: Callable[[torch.optim.Optimizer], TrainedWeights] = TrainedWeights
    # Start-up checks beyond the config schema: (config section, source) -> None or UserError.
    check: Callable[[Any, str], None] | None = None
    # build takes fused=True (one kernel per step for all parameters), used on CUDA.
    fused_on_cuda: bool = False


OPTIMIZERS: dict[str, OptimizerEntry] = {
    "sgd": OptimizerEntry(_sgd, fused_on_cuda=True),
    "adam": OptimizerEntry(_adam, fused_on_cuda=True),
    "adamw": OptimizerEntry(_adamw, fused_on_cuda=True),
    "sgd-schedule-free": OptimizerEntry(schedule_free.sgd_schedule_free, weights=schedule_free.AveragedWeights,
                                        check=schedule_free.check_config),
    "adamw-schedule-free": OptimizerEntry(schedule_free.adamw_schedule_free, weights=schedule_free.AveragedWeights,
                                          check=schedule_free.check_config),
    "sgd-sam": OptimizerEntry(_sam_base, train_step=_sam_step),
}


def _timm_build(groups: list[dict], cfg: TimmOptimizerConfig, lr: float, steps_per_epoch: int) -> torch.optim.Optimizer:
    return timm_optimizers.build(cfg, groups, lr)


# Every name the schema lets through beyond the entries above (TimmOptimizerConfig).
TIMM_ENTRY = OptimizerEntry(_timm_build, check=lambda cfg, source: timm_optimizers.check_config(
    cfg, source, list(OPTIMIZERS)))


def entry(cfg: OptimConfig) -> OptimizerEntry:
    return TIMM_ENTRY if isinstance(cfg, TimmOptimizerConfig) else OPTIMIZERS[cfg.name]


def check_supported(cfg: OptimConfig, source: str) -> None:
    """Start-up checks of the chosen optimizer's values (the schema has checked the built-in names)."""
    check = entry(cfg).check
    if check is not None:
        check(cfg, source)


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, lr: float, steps_per_epoch: int,
                    device_type: str = "cpu") -> torch.optim.Optimizer:
    """The optimizer for ``model``, weight decay on weight matrices and kernels only; fused on
    CUDA where the entry allows it (``device_type``: where the model will train)."""
    chosen = entry(cfg)
    options = {"fused": True} if chosen.fused_on_cuda and device_type == "cuda" else {}
    return chosen.build(param_groups(model, cfg.weight_decay), cfg, lr, steps_per_epoch, **options)


def build_train_step(cfg: OptimConfig, model: torch.nn.Module, optimizer, criterion, accelerator: Accelerator,
                     grad_clip_norm: float) -> TrainStep:
    """The step that drives this optimizer; ``model`` and ``optimizer`` as returned by ``prepare``."""
    return entry(cfg).train_step(cfg, model, optimizer, criterion, accelerator, grad_clip_norm)


def evaluation_weights(cfg: OptimConfig, optimizer: torch.optim.Optimizer) -> TrainedWeights:
    """The hook that decides which weights are evaluated and saved; ``optimizer`` as prepared."""
    return entry(cfg).weights(optimizer)


def reads_training_batches(cfg: OptimConfig) -> bool:
    """Whether the optimizer's evaluation hook reads training batches (BatchNorm statistics)."""
    return entry(cfg).weights.reads_training_batches


def reported_lr(optimizer: torch.optim.Optimizer) -> float:
    """The lr of the last step as the optimizer applied it.

    Schedule-Free warms up inside the optimizer and records the lr it used as
    ``scheduled_lr``; for the others the schedule sets ``lr`` itself.
    """
    group = optimizer.param_groups[0]
    return group.get("scheduled_lr", group["lr"])
