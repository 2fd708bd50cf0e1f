"""Any optimizer ``timm.optim.create_optimizer_v2`` knows by name (``[optim] name = "lamb"``).

The schema cannot list timm's optimizers, so ``TimmOptimizerConfig`` takes any name the
registry has no entry for and collects the table's other keys in ``args``. Here, at start-up,
the name is looked up in timm's registry and every key in the constructor of the class timm
would build, so a typo stops the run with one line naming the key, as the schema does for the
built-in optimizers. The optimizer is then built by timm from this project's two weight-decay
groups (``registry.param_groups``), with ``train.lr`` as its ``lr``.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any

import timm.optim
import torch

from ..config import TimmOptimizerConfig, convert_value
from ..errors import UserError, first_line

# Keys of the table the trainer sets itself.
SET_BY_TRAINER = {"params": "the parameters come from the model",
                  "lr": "set from train.lr (and the lr schedule)"}
# timm names whose optimizers need more than a plain step: a pointer to what serves instead.
NOT_SUPPORTED = {"schedulefree": "Schedule-Free optimizers evaluate averaged weights; use name = "
                                 "'sgd-schedule-free' or 'adamw-schedule-free'"}


def _info(name: str):
    """timm's OptimInfo for ``name`` ("lookahead_" prefixes the wrapped optimizer), or None."""
    parts = name.lower().split("_")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "lookahead"):
        return None
    try:
        return timm.optim.get_optimizer_info(parts[-1])
    except ValueError:
        return None


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    return timm.optim.get_optimizer_class(_info(name).name, bind_defaults=False)


def constructor_defaults(cls: type) -> dict[str, Any]:
    """The keyword arguments of ``cls.__init__`` with their defaults (inspect.Parameter.empty when none)."""
    parameters = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p.default for p in parameters
            if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def check_config(cfg: TimmOptimizerConfig, source: str, builtin_names: list[str]) -> None:
    """The name is one timm knows and each key an argument of its class with a value of the default's type."""
    info = _info(cfg.name)
    if info is None:
        known = builtin_names + timm.optim.list_optimizers()
        close = difflib.get_close_matches(cfg.name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "; see timm.optim.list_optimizers()"
        raise UserError(f"{source}: train.optim.name: {cfg.name!r} is neither {', '.join(map(repr, builtin_names))} "
                        f"nor an optimizer timm knows{hint}")
    for marker, why in NOT_SUPPORTED.items():
        if marker in cfg.name.lower():
            raise UserError(f"{source}: train.optim.name = {cfg.name!r}: {why}")
    if info.second_order:
        raise UserError(f"{source}: train.optim.name = {cfg.name!r} needs second-order gradients (create_graph), "
                        "which the train step does not compute")
    cls = optimizer_class(cfg.name)
    defaults = constructor_defaults(cls)
    for key, value in cfg.args.items():
        where = f"{source}: train.optim.{key}"
        if key in SET_BY_TRAINER:
            raise UserError(f"{where}: {SET_BY_TRAINER[key]}; remove it from [optim]")
        if key not in defaults:
            names = [n for n in defaults if n not in SET_BY_TRAINER]
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; it takes {', '.join(names)}"
            raise UserError(f"{where}: timm's {cfg.name} ({cls.__name__}) takes no argument {key!r}{hint}")
        _check_like_default(defaults[key], value, where)
    try:  # what the signature cannot say (a value out of range): timm's own check, on one tensor
        build(cfg, [{"params": [torch.zeros(1, requires_grad=True)], "weight_decay": cfg.weight_decay}], 1e-3)
    except Exception as exc:
        raise UserError(f"{source}: train.optim: timm cannot build {cfg.name} with {cfg.args}: "
                        f"{first_line(exc) or type(exc).__name__}") from None


def _check_like_default(default: Any, value: Any, where: str) -> None:
    """A value of the default's kind: true/false, a number, a string, or a list as long as a tuple
    default (betas); arguments without a usable default are left to the optimizer."""
    if isinstance(default, bool):
        convert_value(bool, value, where)
    elif isinstance(default, (int, float)):
        convert_value(float, value, where)
    elif isinstance(default, str):
        convert_value(str, value, where)
    elif isinstance(default, tuple):
        if not isinstance(value, list) or len(value) != len(default):
            raise UserError(f"{where} must be a list of {len(default)} numbers, like {list(default)}, got {value!r}")
        for index, item in enumerate(value):
            convert_value(float, item, f"{where}[{index}]")


def build(cfg: TimmOptimizerConfig, groups: list[dict], lr: float) -> torch.optim.Optimizer:
    """timm's optimizer over ``groups`` (each with its weight decay), peak lr ``lr``, the table's keys.

    Tuple arguments arrive from TOML as lists; they are handed over as tuples, as the classes expect."""
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.args.items()}
    return timm.optim.create_optimizer_v2(groups, opt=cfg.name, lr=lr, weight_decay=cfg.weight_decay, **args)
