"""Optimizers by name (``[optim] name``), each built from its own config section."""

from __future__ import annotations

from typing import Callable

import torch

from .config import AdamConfig, AdamWConfig, OptimConfig, SGDConfig, UserError


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


def _sgd(model: torch.nn.Module, cfg: SGDConfig, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=lr, momentum=cfg.momentum,
                           nesterov=cfg.nesterov)


def _adam(model: torch.nn.Module, cfg: AdamConfig, lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(param_groups(model, cfg.weight_decay), lr=lr, betas=(cfg.beta1, cfg.beta2),
                            eps=cfg.epsilon)


def _adamw(model: torch.nn.Module, cfg: AdamWConfig, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.epsilon)


OPTIMIZERS: dict[str, Callable[[torch.nn.Module, OptimConfig, float], torch.optim.Optimizer]] = {
    "sgd": _sgd,
    "adam": _adam,
    "adamw": _adamw,
}


def check_supported(cfg: OptimConfig, source: str) -> None:
    if cfg.name not in OPTIMIZERS:
        raise UserError(f"{source}: train.optim.name = {cfg.name!r} is not yet supported "
                        f"(available now: {', '.join(map(repr, OPTIMIZERS))})")


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    return OPTIMIZERS[cfg.name](model, cfg, lr)
