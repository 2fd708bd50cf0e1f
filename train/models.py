"""Models come from timm, by name; the seed's short names are aliases of timm names."""

from __future__ import annotations

import difflib

import timm
import torch

from .errors import UserError

ALIASES = {"vit_base_16": "vit_base_patch16_224"}


def resolve_arch(name: str) -> str:
    """The timm model name for ``train.arch``, or a one-line error with close matches."""
    arch = ALIASES.get(name, name)
    if timm.is_model(arch):
        return arch
    candidates = timm.list_models() + list(ALIASES)
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else "; see timm.list_models()"
    raise UserError(f"train.arch: unknown model {name!r}{hint}")


def model_args(arch: str, train_crop_size: int, val_crop_size: int) -> dict:
    """timm construction arguments besides num_classes (recorded in exported config.json).

    Models with a fixed input size (ViTs) are built for the validation crop and told to
    accept other sizes when training crops differ from it.
    """
    pretrained_cfg = timm.models.get_pretrained_cfg(arch)
    if pretrained_cfg is None or not pretrained_cfg.fixed_input_size:
        return {}
    args = {"img_size": val_crop_size}
    if train_crop_size != val_crop_size:
        args["dynamic_img_size"] = True
    return args


def build_model(arch: str, num_classes: int, train_crop_size: int, val_crop_size: int) -> torch.nn.Module:
    """A randomly initialised timm model for ``num_classes`` classes."""
    arch = resolve_arch(arch)
    return timm.create_model(arch, pretrained=False, num_classes=num_classes,
                             **model_args(arch, train_crop_size, val_crop_size))


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
