"""Models come from timm, by name; the seed's short names are aliases of timm names.

``[model]`` in the training file holds further keyword arguments for ``timm.create_model``
(``zero_init_last = false``, ``drop_rate = 0.5``, ...). They are checked at start-up against
the model's own arguments, by building the model on the meta device (no memory, no
initialisation cost), and recorded with the model, so exports rebuild the same network.
"""

from __future__ import annotations

import difflib
import inspect
import re
import types
import typing
from typing import Any, Literal, Union

import timm
import torch

from .config import CropRamp, TrainConfig, convert_value, crop_sizes
from .errors import UserError, first_line

ALIASES = {"vit_base_16": "vit_base_patch16_224"}

# timm arguments the trainer sets from other keys, which [model] must leave alone.
SET_BY_TRAINER = {
    "num_classes": "set from data.num_classes",
    "img_size": "set from train.preprocess.val_crop_size",
    "dynamic_img_size": "set when train.preprocess.train_crop_size differs from val_crop_size",
    "pretrained": "training starts from random weights",
}


def resolve_arch(name: str) -> str:
    """The timm model name for ``train.arch``, or a one-line error with close matches."""
    arch = ALIASES.get(name, name)
    if timm.is_model(arch):
        return arch
    candidates = timm.list_models() + list(ALIASES)
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else "; see timm.list_models()"
    raise UserError(f"train.arch: unknown model {name!r}{hint}")


def model_args(arch: str, train_crop_size: int | CropRamp, val_crop_size: int,
               extra: dict[str, Any] | None = None) -> dict:
    """timm construction arguments besides num_classes (recorded in exported config.json):
    the input size where the model needs one, then ``extra`` (the ``[model]`` table).

    Models with a fixed input size (ViTs) are built for the validation crop and told to
    accept other sizes when training crops differ from it.
    """
    args: dict[str, Any] = {}
    pretrained_cfg = timm.models.get_pretrained_cfg(arch)
    if pretrained_cfg is not None and pretrained_cfg.fixed_input_size:
        args["img_size"] = val_crop_size
        if crop_sizes(train_crop_size) != {val_crop_size}:
            args["dynamic_img_size"] = True
    return {**args, **(extra or {})}


def build_model(arch: str, num_classes: int, train_crop_size: int | CropRamp, val_crop_size: int,
                extra: dict[str, Any] | None = None) -> torch.nn.Module:
    """A randomly initialised timm model for ``num_classes`` classes; ``extra``: the ``[model]`` table."""
    arch = resolve_arch(arch)
    return timm.create_model(arch, pretrained=False, num_classes=num_classes,
                             **model_args(arch, train_crop_size, val_crop_size, extra))


def check_model(train: TrainConfig, num_classes: int, source: str) -> None:
    """Start-up check of ``train.arch`` and ``[model]``: one line naming the key for an argument the
    model does not take, a value of the wrong type, or a combination timm refuses."""
    arch = resolve_arch(train.arch)
    p = train.preprocess
    for key in train.model:
        if key in SET_BY_TRAINER:
            raise UserError(f"{source}: train.model.{key}: {SET_BY_TRAINER[key]}; remove it from [model]")
    plain = model_args(arch, p.train_crop_size, p.val_crop_size)
    model_class = None
    try:
        model_class = type(_build_unallocated(arch, num_classes, plain))
        annotations = _argument_types(model_class)
        for key, value in train.model.items():
            if key in annotations:
                _check_value(annotations[key], value, f"{source}: train.model.{key}")
        _build_unallocated(arch, num_classes, {**plain, **train.model})
    except UserError:
        raise
    except Exception as exc:
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
        if unknown:
            key = unknown.group(1)
            names = _argument_names(model_class) if model_class else []
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; it takes {', '.join(names)}" if names else ""
            raise UserError(f"{source}: train.model.{key}: {arch} takes no argument {key!r}{hint}") from None
        if isinstance(train.model.get("aa_layer"), str) and "issubclass" in str(exc):
            raise UserError(f"{source}: train.model.aa_layer: {_aa_layer_refusal(arch, train.model['aa_layer'])}") \
                from None
        raise UserError(f"{source}: train.model: timm cannot build {arch} with {train.model}: "
                        f"{first_line(exc) or type(exc).__name__}") from None


def _aa_layer_refusal(arch: str, value: str) -> str:
    """Why a layer name cannot reach ``arch`` and what to train instead.

    timm's ResNet stem tests ``issubclass(aa_layer, ...)``, so it takes a class only, and a
    config (or the exported config.json timm rebuilds from) can hold only a name. timm registers
    ResNets with the layer built in (resnetblur*, BlurPool2d; resnetaa*, average pooling).
    """
    family = "resnetaa" if value == "avg" else "resnetblur"
    built_in = timm.list_models(f"{family}*")
    close = difflib.get_close_matches(arch.replace("resnet", family, 1), built_in, n=1, cutoff=0.8)
    hint = f"arch = {close[0]!r}" if close else f"one of {', '.join(built_in)}"
    return (f"timm's {arch} takes a layer class here, not a name such as {value!r} (all a config and the exported "
            f"config.json can hold); train an architecture with it built in instead: {hint}")


def _build_unallocated(arch: str, num_classes: int, args: dict) -> torch.nn.Module:
    """The model built on the meta device; on the CPU for a constructor that needs real tensors."""
    try:
        with torch.device("meta"):
            return timm.create_model(arch, pretrained=False, num_classes=num_classes, **args)
    except Exception as exc:
        if "unexpected keyword argument" in str(exc):
            raise
    return timm.create_model(arch, pretrained=False, num_classes=num_classes, **args)


def _argument_names(model_class: type) -> list[str]:
    return [name for name in inspect.signature(model_class.__init__).parameters if name != "self"]


def _argument_types(model_class: type) -> dict[str, Any]:
    """The annotated types of the model class's arguments ({} where timm's annotations do not resolve)."""
    try:
        return typing.get_type_hints(model_class.__init__)
    except Exception:
        return {}


def _check_value(annotation: Any, value: Any, where: str) -> None:
    """Values of plain types (bool, int, float, str, a choice of words, optionally None) are checked here;
    others (classes, tuples, nested settings) are left to timm."""
    union = typing.get_origin(annotation) in (Union, types.UnionType)
    members = tuple(m for m in (typing.get_args(annotation) if union else (annotation,)) if m is not type(None))
    if members and all(m in (bool, int, float, str) or typing.get_origin(m) is Literal for m in members):
        convert_value(Union[members], value, where)  # noqa: UP007 (a union built from a tuple)


def is_convolutional(model: torch.nn.Module) -> bool:
    """More than one 2-D convolution: ResNets, VGG, ConvNeXt; not ViTs, whose one convolution
    is the patch embedding and whose time goes into matrix products."""
    return sum(isinstance(module, torch.nn.Conv2d) for module in model.modules()) > 1


def choose_channels_last(setting: bool | str, device_type: str, model: torch.nn.Module) -> bool:
    """``train.channels_last``, with "auto" decided: NHWC for convolutional models on CUDA GPUs.

    cuDNN's tensor-core convolutions run in NHWC and convert other layouts first; on the CPU
    the same switch made ResNet-18 slower (see the README's performance notes).
    """
    if setting != "auto":
        return bool(setting)
    return device_type == "cuda" and is_convolutional(model)


def use_sync_batchnorm(model: torch.nn.Module, num_processes: int, device_type: str) -> torch.nn.Module:
    """``train.sync_bn``: BatchNorm layers that compute batch statistics over all processes.

    timm's converter keeps the activation of its fused BatchNorm+activation layers, which
    PyTorch's own would drop. One process has nothing to share: the model stays as it is.
    PyTorch's SyncBatchNorm runs on GPUs only, so several CPU processes are refused here
    rather than failing at the first forward pass.
    """
    if num_processes == 1:
        return model
    if device_type == "cpu":
        raise UserError("train.sync_bn = true needs GPUs: PyTorch's SyncBatchNorm does not run on the CPU "
                        f"({num_processes} CPU processes); set train.sync_bn = false")
    return timm.layers.convert_sync_batchnorm(model)


def bare_model(accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The model without Accelerate's wrappers (DDP, torch.compile), for evaluation, buffers and export.

    ``keep_torch_compile=False`` matters: with Accelerate's default (True) the call points the
    compiled wrapper's ``_orig_mod`` at the bare model, so the training forward no longer runs
    through DDP (``no_sync`` stops meaning anything, and exported names gain ``_orig_mod.``).
    The bare model shares its parameters with the compiled one, so this loses nothing.
    """
    return accelerator.unwrap_model(model, keep_torch_compile=False)
