"""Typed run configuration: the schema, TOML loading, ``--set`` overrides and validation.

Everything a run needs is read and checked here, once, before any data or model is
touched. The rest of the package receives these dataclasses and never reads TOML or the
environment itself. The keys are the seed project's (``data_dir``, ``[dataloader]``,
``[preprocess]``, ``[optim]``, ``[lr_scheduler]``, ``[reproduce]``, ``[log]``) plus a few
a modern trainer needs, each with a default that keeps the seed's files valid.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import tomllib
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from .errors import UserError


class ConfigError(UserError):
    pass


_MISSING = dataclasses.MISSING


def key(default: Any = _MISSING, doc: str = "", *, default_factory: Any = _MISSING, gt: float | None = None,
        ge: float | None = None, lt: float | None = None, le: float | None = None) -> Any:
    """A config key: its default, one line saying what it does (docs/config-reference.md is made
    from these lines by ``python -m train.config_reference``), and the bounds a number must lie in."""
    if not doc:
        raise TypeError("every config key needs a one-line doc")
    metadata = {"doc": doc, "gt": gt, "ge": ge, "lt": lt, "le": le}
    if default_factory is not _MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


# ----------------------------------------------------------------------------- data


@dataclass
class DataloaderConfig:
    name: Literal["dali", "hf"] = key("dali", "Input pipeline: NVIDIA DALI, or the Hugging Face `datasets` loader "
                                              "(PIL decoding in DataLoader workers).")
    num_data_workers: int = key(4, "DataLoader worker processes per training process (hf), or DALI's CPU threads.",
                                ge=0)
    prefetch_queue_depth: int = key(2, "DALI: batches prepared ahead of the training loop.", ge=1)
    train_split: str = key("train", "Training split's name, when data_dir is a Hub data set (`hf-hub:<id>`).")
    val_split: str = key("validation", "Validation split's name, when data_dir is a Hub data set.")
    image_column: str = key("image", "Column holding the images, when data_dir is a Hub data set.")
    label_column: str = key("label", "Column holding the class indices, when data_dir is a Hub data set.")


@dataclass
class DataConfig:
    # No usable default: load_config refuses an empty data_dir with its own message.
    data_dir: str = key("", "Required. A folder with `train/<class>/*` and `val/<class>/*`, a folder of WebDataset "
                            "shards (this project's or the seed's), `hf-hub:<dataset id>`, or `builtin:shapes`.")
    num_classes: int = key(1000, "Number of classes: the size of the model's classifier.", gt=0)
    dataloader: DataloaderConfig = key(doc="How images are read and decoded.", default_factory=DataloaderConfig)


# ---------------------------------------------------------------------------- train


@dataclass
class CropRamp:
    """Training crops that grow (or shrink) over the epochs, as FFCV's progressive resizing."""
    start: int = key(160, "Crop side up to and including start_epoch, in pixels.", gt=0)
    end: int = key(192, "Crop side from end_epoch on, in pixels.", gt=0)
    start_epoch: int = key(1, "Last epoch at the start size (epochs count from 1, as the log does).", ge=1)
    end_epoch: int = key(1, "First epoch at the end size; between the two, the side moves linearly.", ge=1)
    step: int = key(32, "Sides in between are rounded to the nearest multiple of this.", gt=0)

    def size_at(self, epoch: int) -> int:
        """The crop side of epoch ``epoch`` (0-based, as the loop counts)."""
        number = epoch + 1
        if number <= self.start_epoch:
            return self.start
        if number >= self.end_epoch:
            return self.end
        share = (number - self.start_epoch) / (self.end_epoch - self.start_epoch)
        return round((self.start + share * (self.end - self.start)) / self.step) * self.step

    def describe(self) -> str:
        return (f"{self.start} -> {self.end} px over epochs {self.start_epoch}-{self.end_epoch} "
                f"(multiples of {self.step})")


def crop_size_at(crop: int | CropRamp, epoch: int) -> int:
    """The training crop side of (0-based) ``epoch``, for a fixed size or a ramp."""
    return crop.size_at(epoch) if isinstance(crop, CropRamp) else crop


def largest_crop(crop: int | CropRamp) -> int:
    """The largest training crop side of the run: what memory must be sized for."""
    return max(crop.start, crop.end) if isinstance(crop, CropRamp) else crop


def crop_sizes(crop: int | CropRamp) -> set[int]:
    """Every training crop side the run uses (a ramp's rounding can only land on multiples of step
    between its ends)."""
    if not isinstance(crop, CropRamp):
        return {crop}
    return {crop.size_at(epoch) for epoch in range(max(crop.end_epoch, crop.start_epoch) + 1)}


@dataclass
class PreprocessConfig:
    preload_local: bool = key(False, "Train from a copy of data_dir on the node's local disk ($TMPDIR), made once "
                                     "per node at start-up and reused by later jobs there.")
    # "triangular" is DALI's antialiased linear filter; the HF loader uses PIL's bilinear,
    # which is the same triangle filter when downscaling.
    interpolation: Literal["bilinear", "bicubic", "triangular"] = key(
        "bilinear", "Resampling filter for every resize, training and validation.")
    train_crop_size: int | CropRamp = key(
        176, "Side of the random-area crops the model is trained on, in pixels; or a table {start, end, start_epoch, "
             "end_epoch, step} that changes it over the epochs (see [train_crop_size]).", gt=0)
    val_image_size: int = key(256, "Validation: the shorter side is resized to this before the centre crop.", gt=0)
    val_crop_size: int = key(224, "Validation: side of the centre crop (at most val_image_size).", gt=0)
    # "auto", so that a config without the key never decodes on the CPU of a GPU node.
    dali_cpu: bool | Literal["auto"] = key(
        "auto", "DALI: true decodes JPEGs on the CPU, false on the GPU (DALI's `mixed` decoder); \"auto\": on the "
                "GPU where CUDA is present, else on the CPU.")
    # The hardware decoder exists on A100 and H100; the hints are ImageNet's largest image.
    dali_hw_decoder_load: float = key(0.65, "DALI GPU decoding: share of images given to the hardware JPEG "
                                            "decoder (A100, H100).", ge=0, le=1)
    dali_preallocate_width_hint: int = key(5980, "DALI GPU decoding: image width its buffers are preallocated for.",
                                           ge=0)
    dali_preallocate_height_hint: int = key(6430, "DALI GPU decoding: image height its buffers are preallocated for.",
                                            ge=0)


_WEIGHT_DECAY_DOC = "Weight decay, on weight matrices and kernels only (not norms, biases or no_weight_decay())."
_BETA1_DOC = "First-moment (gradient average) coefficient."
_BETA2_DOC = "Second-moment (squared-gradient average) coefficient."
_EPSILON_DOC = "Term added to the denominator for numerical stability."
_SF_WARMUP_DOC = "Epochs of linear lr warm-up, inside the optimizer."
_SF_R_DOC = "Schedule-Free's r: how much later iterates weigh in the average (0: uniform)."
_SF_POWER_DOC = "Schedule-Free's weight_lr_power: how much the lr weighs the average."


@dataclass
class SGDConfig:
    name: Literal["sgd"] = key("sgd", "SGD with momentum (torch.optim.SGD).")
    weight_decay: float = key(1e-4, _WEIGHT_DECAY_DOC, ge=0)
    momentum: float = key(0.875, "Momentum factor.", ge=0, lt=1)
    nesterov: bool = key(False, "Nesterov momentum.")


@dataclass
class AdamConfig:
    name: Literal["adam"] = key("adam", "Adam (torch.optim.Adam), weight decay added to the gradient.")
    weight_decay: float = key(1e-4, _WEIGHT_DECAY_DOC, ge=0)
    beta1: float = key(0.9, _BETA1_DOC, ge=0, lt=1)
    beta2: float = key(0.999, _BETA2_DOC, ge=0, lt=1)
    epsilon: float = key(1e-8, _EPSILON_DOC, gt=0)


@dataclass
class AdamWConfig:
    name: Literal["adamw"] = key("adamw", "AdamW (torch.optim.AdamW), decoupled weight decay.")
    weight_decay: float = key(0.05, _WEIGHT_DECAY_DOC, ge=0)
    beta1: float = key(0.9, _BETA1_DOC, ge=0, lt=1)
    beta2: float = key(0.999, _BETA2_DOC, ge=0, lt=1)
    epsilon: float = key(1e-8, _EPSILON_DOC, gt=0)


@dataclass
class SGDScheduleFreeConfig:
    name: Literal["sgd-schedule-free"] = key("sgd-schedule-free", "Schedule-Free SGD (schedulefree.SGDScheduleFree); "
                                                                  "needs lr_scheduler.name = 'constant'.")
    warmup_epochs: float = key(5, _SF_WARMUP_DOC, ge=0)
    weight_decay: float = key(1e-4, _WEIGHT_DECAY_DOC, ge=0)
    momentum: float = key(0.9, "Interpolation between the averaged and the trained weights.", ge=0, lt=1)
    r: float = key(0.0, _SF_R_DOC, ge=0)
    weight_lr_power: float = key(2.0, _SF_POWER_DOC, ge=0)


@dataclass
class AdamWScheduleFreeConfig:
    name: Literal["adamw-schedule-free"] = key(
        "adamw-schedule-free", "Schedule-Free AdamW (schedulefree.AdamWScheduleFree); needs lr_scheduler.name = "
                               "'constant'.")
    warmup_epochs: float = key(5, _SF_WARMUP_DOC, ge=0)
    weight_decay: float = key(0.1, _WEIGHT_DECAY_DOC, ge=0)
    beta1: float = key(0.9, "Interpolation between the averaged and the trained weights.", ge=0, lt=1)
    beta2: float = key(0.999, _BETA2_DOC, ge=0, lt=1)
    epsilon: float = key(1e-8, _EPSILON_DOC, gt=0)
    r: float = key(0.0, _SF_R_DOC, ge=0)
    weight_lr_power: float = key(2.0, _SF_POWER_DOC, ge=0)


@dataclass
class SGDSAMConfig:
    name: Literal["sgd-sam"] = key("sgd-sam", "SGD with Sharpness-Aware Minimization.")
    weight_decay: float = key(1e-4, _WEIGHT_DECAY_DOC, ge=0)
    momentum: float = key(0.9, "Momentum factor of the SGD step.", ge=0, lt=1)
    rho: float = key(0.05, "Radius of the weight perturbation (0: plain SGD).", ge=0)
    adaptive: bool = key(True, "Adaptive SAM: the perturbation scaled by each weight's magnitude.")
    v2: bool = key(True, "Single-step SAM (perturbs along the previous step's gradient); false: two-step SAM.")


@dataclass
class TimmOptimizerConfig:
    # The open member of the union: any name not listed above. Keys besides name and
    # weight_decay are collected in ``args`` when read and written back beside them by to_dict;
    # the optimizer's registry (train/optim/timm_optimizers.py) checks name and keys at start-up.
    name: str = key("lamb", "Any other optimizer timm.optim.create_optimizer_v2 knows by name (lamb, lion, adopt, "
                            "nadamw, ...).")
    weight_decay: float = key(0.0, _WEIGHT_DECAY_DOC, ge=0)
    args: dict[str, Any] = key(doc="The optimizer's own keys, written beside `name` (`betas = [0.9, 0.99]`), checked "
                                   "against the arguments of its timm class at start-up; train.lr sets `lr`.",
                               default_factory=dict)


# typing.Union rather than "|": _union_members recognises tagged unions by it.
OptimConfig = Union[SGDConfig, AdamConfig, AdamWConfig, SGDScheduleFreeConfig,  # noqa: UP007
                    AdamWScheduleFreeConfig, SGDSAMConfig, TimmOptimizerConfig]


@dataclass
class CosineScheduleConfig:
    name: Literal["cosine"] = key("cosine", "Linear warm-up, then cosine decay per step to eta_min.")
    warmup_epochs: float = key(5, "Epochs of linear warm-up.", ge=0)
    warmup_decay: float = key(0.01, "Warm-up starts at lr * warmup_decay.", gt=0, le=1)
    eta_min: float = key(1e-5, "The lr the cosine ends at.", ge=0)


@dataclass
class ConstantScheduleConfig:
    name: Literal["constant"] = key("constant", "The lr stays at train.lr (Schedule-Free warms up inside the "
                                                "optimizer).")


@dataclass
class TriangularScheduleConfig:
    name: Literal["triangular"] = key("triangular", "Linear per step from lr * start_factor up to lr at peak_epoch, "
                                                    "then linear down to end_lr at the end of training (FFCV's).")
    peak_epoch: float = key(2, "Epoch at which the lr reaches train.lr (below train.max_epochs).", ge=0)
    start_factor: float = key(1e-4, "The first step's lr is lr * start_factor.", ge=0, le=1)
    end_lr: float = key(0.0, "The lr the ramp down ends at, after the last step.", ge=0)


ScheduleConfig = Union[CosineScheduleConfig, ConstantScheduleConfig, TriangularScheduleConfig]  # noqa: UP007


@dataclass
class ReproduceConfig:
    seed: int = key(810975, "Seed of every random number generator: weights, augmentation, data order.")


@dataclass
class LogConfig:
    log_freq: int = key(100, "Optimizer steps between loss/lr log lines and TensorBoard points.", gt=0)
    checkpoint_freq: int = key(45, "Epochs between checkpoints (the last epoch always saves).", gt=0)
    checkpoint_every_steps: int = key(0, "Also a checkpoint every N optimizer steps (0: off).", ge=0)
    checkpoint_every_minutes: float = key(0.0, "Also a checkpoint every N minutes of wall time (0: off).", ge=0)
    keep_last: int = key(2, "Newest checkpoints kept, besides the best by validation top-1.", gt=0)
    wandb_on: bool = key(False, "Also log to Weights & Biases (pip install '.[wandb]'): the same scalars and "
                                "config as TensorBoard.")
    project: str = key("imagenet-baselines", "W&B project, when wandb_project is empty.")
    wandb_project: str = key("", "W&B project: the seed's other name for `project`, which it overrides.")
    profile_steps: int = key(0, "torch.profiler trace of this many steps, early in the run (0: off).", ge=0)


@dataclass
class EmaConfig:
    enabled: bool = key(False, "Keep an exponential moving average of the weights (timm's ModelEmaV3), updated "
                               "after each optimizer step and evaluated beside the trained weights.")
    decay: float = key(0.9998, "The average's decay per optimizer step (the most it reaches with warm-up).",
                       ge=0, lt=1)
    warmup: bool = key(False, "Warm the decay up: 1 - (1 + updates / warmup_gamma) ** -warmup_power, at most "
                              "decay (timm's use_warmup).")
    warmup_gamma: float = key(1.0, "Warm-up: the number of updates that counts as one (timm's warmup_gamma).", gt=0)
    warmup_power: float = key(2 / 3, "Warm-up: how fast the decay rises (timm's warmup_power).", gt=0)
    # timm's train.py leaves ModelEmaV3's exclude_buffers false: the running statistics are averaged.
    buffers: Literal["average", "copy"] = key(
        "average", "BatchNorm running statistics of the average: averaged like the weights (timm's default), or "
                   "copied from the trained model at each update (timm's exclude_buffers).")
    export: Literal["trained", "ema"] = key("trained", "Which weights <run>/model and `python -m train.export` "
                                                       "write: the trained ones, or the average (needs enabled).")


@dataclass
class MixupConfig:
    mixup_alpha: float = key(0.0, "MixUp: images and labels of a pair blended by a Beta(alpha, alpha) weight "
                                  "(0: off).", ge=0)
    cutmix_alpha: float = key(0.0, "CutMix: a box of the paired image pasted in, its area drawn from Beta(alpha, "
                                   "alpha), labels weighed by area (0: off).", ge=0)
    prob: float = key(1.0, "Chance that a micro-batch is mixed at all.", ge=0, le=1)
    switch_prob: float = key(0.5, "With both alphas above 0: chance of CutMix rather than MixUp.", ge=0, le=1)
    mode: Literal["batch", "pair", "elem"] = key("batch", "One draw per micro-batch, per pair of images, or per "
                                                          "image.")


@dataclass
class TrainConfig:
    batch_size: int = key(1024, "Global batch: summed over all processes.", gt=0)
    # Accumulation: each optimizer step sums the gradients of
    # batch_size / (processes * micro_batch_size) passes.
    micro_batch_size: int | Literal["auto"] = key(
        0, "Samples per forward/backward pass on each process: 0, the whole per-process batch; a divisor of it "
           "accumulates gradients; \"auto\", the largest that fits in GPU memory.", ge=0)
    max_epochs: int = key(90, "Epochs to train.", gt=0)
    lr: float = key(1e-3, "Peak learning rate, reached after the warm-up.", gt=0)
    label_smoothing: float = key(0.1, "Label smoothing of the cross-entropy loss.", ge=0, lt=1)
    grad_clip_norm: float = key(0.0, "Clip the gradients' global norm to this (0: no clipping).", ge=0)
    checkpoint_dir: str = key("", "Where to start: a training checkpoint (`RUN/checkpoints/<step>`), or weights for "
                                  "a fresh run (a model folder, a .safetensors file, `hf-hub:<repo>`); empty: scratch.")
    arch: str = key("resnet50", "Any timm model name (`vit_base_16` is an alias of `vit_base_patch16_224`).")
    use_amp: bool = key(True, "Mixed precision as the launcher asks (bf16 on Ampere+, fp16 before); false forces "
                              "fp32.")
    # NHWC is faster for convolutions on CUDA and slower on the CPU; a ViT has one convolution.
    channels_last: bool | Literal["auto"] = key(
        "auto", "NHWC memory format; \"auto\": on CUDA for convolutional models, never on the CPU nor for ViTs.")
    compile: bool = key(False, "torch.compile the model.")
    tf32: bool = key(True, "TF32 tensor cores for fp32 matmuls and convolutions (Ampere and newer GPUs).")
    cudnn_benchmark: bool = key(True, "Let cuDNN time its kernels for the fixed input shapes.")
    sync_bn: bool = key(False, "BatchNorm statistics over the global batch (SyncBatchNorm), for small per-GPU "
                               "batches; one collective per BN layer. GPUs only.")
    collective_timeout_s: float = key(
        600.0, "Seconds a collective (gradient all-reduce, broadcast) waits for the other processes before the run "
               "ends with status 75 for a requeue: a node lost or a rank hung. The process group's timeout (gloo "
               "and NCCL).", gt=0)
    progress_timeout_s: float = key(
        300.0, "Seconds without a finished training step before a process names the rank that stopped and ends "
               "with status 75 (the watchdog; paused during evaluation and checkpoints).", gt=0)
    eval_freq: int = key(1, "Epochs between evaluations (the last epoch always evaluates).", gt=0)
    eval_hflip: bool = key(False, "Evaluate on the mean of the logits of each validation image and of its mirror "
                                  "image (two forward passes).")
    num_samples_for_stats: int = key(102400, "Training images BatchNorm statistics are recomputed over.", gt=0)
    recompute_bn_before_final_eval: bool = key(
        False, "Recompute BatchNorm statistics before the last evaluation (and so for the exported model), as the "
               "seed does; Schedule-Free recomputes them before every evaluation.")
    model: dict[str, Any] = key(doc="Keyword arguments for timm.create_model, checked against the model's own "
                                    "(e.g. zero_init_last = false).", default_factory=dict)
    preprocess: PreprocessConfig = key(doc="Crops, resizing and decoding.", default_factory=PreprocessConfig)
    mixup: MixupConfig = key(doc="MixUp/CutMix (timm's Mixup) with soft-target cross-entropy, off while both alphas "
                                 "are 0; train.label_smoothing is then applied to the mixed targets.",
                             default_factory=MixupConfig)
    optim: OptimConfig = key(doc="The optimizer, chosen by `name`, with its own keys.", default_factory=AdamConfig)
    lr_scheduler: ScheduleConfig = key(doc="The learning-rate schedule, chosen by `name`.",
                                       default_factory=CosineScheduleConfig)
    reproduce: ReproduceConfig = key(doc="Seeds.", default_factory=ReproduceConfig)
    log: LogConfig = key(doc="Logging, checkpoints, W&B and the profiler.", default_factory=LogConfig)
    ema: EmaConfig = key(doc="Exponential moving average of the weights (off by default).", default_factory=EmaConfig)


@dataclass
class Config:
    data: DataConfig
    train: TrainConfig


# ------------------------------------------------------------------ building from dicts

_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _union_members(tp: Any) -> tuple[type, ...] | None:
    """The dataclasses of a tagged union such as OptimConfig, or None for other types."""
    if get_origin(tp) is Union:
        members = get_args(tp)
        if all(_is_dataclass_type(m) for m in members):
            return members
    return None


def _tag(cls: type) -> str | None:
    """The member's ``name``; None for the open member, whose ``name`` is any string."""
    choices = get_args(get_type_hints(cls)["name"])
    return choices[0] if choices else None


def _fmt(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)


def _describe_type(tp: Any) -> str:
    if _is_dataclass_type(tp):
        return "a table"
    if get_origin(tp) is Literal:
        return " or ".join(map(repr, get_args(tp)))
    return _TYPE_NAMES[tp]


def _convert_scalar(tp: Any, value: Any, where: str) -> Any:
    if get_origin(tp) in (Union, types.UnionType):  # a choice such as `int | Literal["auto"]`
        for member in get_args(tp):
            try:
                return _convert_scalar(member, value, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where} must be {' or '.join(_describe_type(m) for m in get_args(tp))}, got {_fmt(value)}")
    if _is_dataclass_type(tp):
        raise ConfigError(f"{where} must be a table, got {_fmt(value)}")
    if get_origin(tp) is Literal:
        choices = get_args(tp)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where} must be one of {', '.join(map(repr, choices))}, got {_fmt(value)}{hint}")
        return value
    # bool is a subclass of int in Python; TOML keeps them apart and so do we.
    ok = isinstance(value, tp) and not (tp is not bool and isinstance(value, bool))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        raise ConfigError(f"{where} must be {_TYPE_NAMES[tp]}, got {_fmt(value)}")
    return value


def convert_value(tp: Any, value: Any, where: str) -> Any:
    """``value`` as type ``tp`` (bool, int, float, str, a Literal, or a union of these), or a
    ConfigError naming ``where``: for tables checked outside this schema, such as ``[model]``."""
    return _convert_scalar(tp, value, where)


def _check_bounds(f: dataclasses.Field, value: Any, where: str) -> None:
    limits = f.metadata
    if not limits or isinstance(value, (str, bool)):  # bounds are for numbers ("auto" has none)
        return
    checks = [("gt", lambda v, b: v > b, "> "), ("ge", lambda v, b: v >= b, ">= "),
              ("lt", lambda v, b: v < b, "< "), ("le", lambda v, b: v <= b, "<= ")]
    for key, ok, symbol in checks:
        bound = limits.get(key)
        if bound is not None and not ok(value, bound):
            raise ConfigError(f"{where} must be {symbol}{_fmt(bound)}, got {_fmt(value)}")


def _build(cls: type, raw: Any, prefix: str, source: str) -> Any:
    """Turn a TOML table into dataclass ``cls``, rejecting unknown keys and bad values."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {prefix} must be a table, got {_fmt(raw)}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            dotted = f"{prefix}.{key}"
            candidates = [f"{prefix}.{name}" for name in fields]
            close = difflib.get_close_matches(dotted, candidates, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"{source}: unknown key {dotted!r}{hint}")
    values = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        where = f"{source}: {prefix}.{name}"
        tp, value = hints[name], raw[name]
        members = _union_members(tp)
        if members is not None:
            values[name] = _build_tagged(members, value, f"{prefix}.{name}", source)
        elif _is_dataclass_type(tp):
            values[name] = _build(tp, value, f"{prefix}.{name}", source)
        elif isinstance(value, dict) and any(_is_dataclass_type(m) for m in get_args(tp)):  # a value or a table
            values[name] = _build(next(m for m in get_args(tp) if _is_dataclass_type(m)), value,
                                  f"{prefix}.{name}", source)
        elif get_origin(tp) is dict:  # a free-form table, checked by whoever receives it
            if not isinstance(value, dict):
                raise ConfigError(f"{where} must be a table, got {_fmt(value)}")
            values[name] = dict(value)
        else:
            values[name] = _convert_scalar(tp, value, where)
            _check_bounds(f, values[name], where)
    return cls(**values)


def _build_tagged(members: tuple[type, ...], raw: Any, prefix: str, source: str) -> Any:
    """Pick the member of a tagged union by the table's ``name`` key, then build it."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {prefix} must be a table, got {_fmt(raw)}")
    by_tag = {_tag(m): m for m in members if _tag(m) is not None}
    open_member = next((m for m in members if _tag(m) is None), None)
    if "name" not in raw:
        raise ConfigError(f"{source}: {prefix}.name is missing; choose one of {', '.join(map(repr, by_tag))}")
    chosen = by_tag.get(raw["name"])
    if chosen is None and open_member is not None and isinstance(raw["name"], str):
        return _build_open(open_member, raw, prefix, source)
    if chosen is None:
        close = difflib.get_close_matches(str(raw["name"]), list(by_tag), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        other = " or another name (a string)" if open_member is not None else ""
        raise ConfigError(f"{source}: {prefix}.name must be one of {', '.join(map(repr, by_tag))}{other}, "
                          f"got {_fmt(raw['name'])}{hint}")
    return _build(chosen, raw, prefix, source)


def _build_open(cls: type, raw: dict, prefix: str, source: str) -> Any:
    """The open member of a tagged union: its declared keys as usual, every other key into ``args``."""
    declared = {f.name for f in dataclasses.fields(cls)} - {"args"}
    built = _build(cls, {k: v for k, v in raw.items() if k in declared}, prefix, source)
    built.args = {k: v for k, v in raw.items() if k not in declared}
    return built


# -------------------------------------------------------------------- files and --set


def read_toml(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc})") from None
    return _parse_toml(text, str(path))


def _parse_toml(text: str, source: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: {_describe_toml_error(exc)}") from None


def _describe_toml_error(exc: Exception) -> str:
    """'line L, column C: message' from tomllib's 'message (at line L, column C)'."""
    text = str(exc)
    match = re.search(r"^(.*) \(at line (\d+), column (\d+)\)$", text)
    if match:
        return f"TOML syntax error at line {match.group(2)}, column {match.group(3)}: {match.group(1)}"
    match = re.search(r"^(.*) \(at end of document\)$", text)
    if match:
        return f"TOML syntax error at end of file: {match.group(1)}"
    return f"TOML syntax error: {text}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.optim.momentum=0.9`` -> (['train', 'optim', 'momentum'], 0.9), value in TOML syntax.

    A bare word that is not valid TOML (``--set train.arch=resnet18``) is taken as a
    string, since shells make quoting awkward.
    """
    key, sep, raw_value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. --set train.lr=0.5")
    parts = key.split(".")
    if parts[0] not in ("data", "train") or len(parts) < 2 or not all(parts):
        raise ConfigError(f"--set {text!r}: the key must start with 'data.' or 'train.', e.g. train.lr")
    raw_value = raw_value.strip()
    try:
        value = tomllib.loads(f"v = {raw_value}")["v"]
    except tomllib.TOMLDecodeError:
        if re.fullmatch(r"[^\s\"'\[\]{}=,#]+", raw_value):
            value = raw_value
        else:
            raise ConfigError(f"--set {text!r}: {raw_value!r} is not a TOML value "
                              "(strings need quotes when they hold spaces or symbols)") from None
    return parts, value


def apply_override(tables: dict[str, dict], parts: list[str], value: Any) -> None:
    node = tables[parts[0]]
    for part in parts[1:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {'.'.join(parts)}: {part!r} is a value, not a table")
        node = child
    node[parts[-1]] = value


# --------------------------------------------------------------------------- loading


def load_config_text(text: str, source: str, num_processes: int = 1) -> Config:
    """A Config from one TOML document with [data] and [train] tables (a run's config.toml)."""
    tables = _parse_toml(text, source)
    for section in ("data", "train"):
        if not isinstance(tables.get(section), dict):
            raise ConfigError(f"{source}: missing [{section}] table")
    config = Config(data=_build(DataConfig, tables["data"], "data", source),
                    train=_build(TrainConfig, tables["train"], "train", source))
    check_consistency(config, source, num_processes)
    return config


def load_data_config(path: str | Path, overrides: list[str] = (), text: str | None = None) -> DataConfig:
    """Only the data file, with ``--set data.*`` overrides (for commands that bring their own model).

    ``text``: the file's contents, checked before they are written to ``path``.
    """
    tables = {"data": read_toml(path) if text is None else _parse_toml(text, str(path)), "train": {}}
    for override in overrides:
        parts, value = parse_override(override)
        if parts[0] != "data":
            raise ConfigError(f"--set {override!r}: only data.* keys apply here")
        apply_override(tables, parts, value)
    source = describe_source(path, "data", list(overrides))
    if not tables["data"].get("data_dir"):
        raise ConfigError(f"{source}: missing required key 'data.data_dir'")
    return _build(DataConfig, tables["data"], "data", source)


def describe_source(path: str | Path, section: str, overrides: list[str]) -> str:
    """How error messages name where a section's values came from."""
    touched = any(text.strip().startswith(section + ".") for text in overrides)
    return f"{path}{' (with --set)' if touched else ''}"


def load_config(data_path: str | Path, train_path: str | Path, overrides: list[str] = (),
                num_processes: int = 1) -> Config:
    """Read both TOML files, apply ``--set`` overrides and validate the result."""
    tables = {"data": read_toml(data_path), "train": read_toml(train_path)}
    sources = {"data": str(data_path), "train": str(train_path)}
    for text in overrides:
        parts, value = parse_override(text)
        apply_override(tables, parts, value)

    def source_of(section: str) -> str:
        return describe_source(sources[section], section, overrides)

    if "data_dir" not in tables["data"] or tables["data"]["data_dir"] == "":
        raise ConfigError(f"{source_of('data')}: missing required key 'data.data_dir' "
                          "(a folder with train/ and val/, or hf-hub:<dataset id>)")
    data = _build(DataConfig, tables["data"], "data", source_of("data"))
    train = _build(TrainConfig, tables["train"], "train", source_of("train"))
    config = Config(data=data, train=train)
    check_consistency(config, source_of("train"), num_processes)
    return config


def check_consistency(config: Config, source: str, num_processes: int) -> None:
    """Checks that involve more than one key, or the number of processes."""
    t = config.train
    p = t.preprocess
    if p.val_crop_size > p.val_image_size:
        raise ConfigError(f"{source}: train.preprocess.val_crop_size ({p.val_crop_size}) is larger than "
                          f"train.preprocess.val_image_size ({p.val_image_size}), the size it is cropped from")
    check_crop_ramp(p.train_crop_size, source)
    if t.batch_size % num_processes:
        raise ConfigError(f"{source}: train.batch_size ({t.batch_size}) is not divisible by the number of "
                          f"processes ({num_processes})")
    check_micro_batch(t, source, num_processes)
    micro = t.micro_batch_size or t.batch_size // num_processes
    if (t.mixup.mixup_alpha > 0 or t.mixup.cutmix_alpha > 0) and micro != "auto" and micro % 2:
        raise ConfigError(f"{source}: train.mixup mixes images in pairs, but the micro-batch has {micro} images "
                          "per process; choose an even train.batch_size / processes (or train.micro_batch_size)")
    schedule_free = isinstance(t.optim, (SGDScheduleFreeConfig, AdamWScheduleFreeConfig))
    if schedule_free and not isinstance(t.lr_scheduler, ConstantScheduleConfig):
        raise ConfigError(f"{source}: train.optim.name = {t.optim.name!r} needs train.lr_scheduler.name = "
                          f"'constant' (Schedule-Free replaces the schedule), got {t.lr_scheduler.name!r}")
    if t.ema.export == "ema" and not t.ema.enabled:
        raise ConfigError(f"{source}: train.ema.export = 'ema' needs train.ema.enabled = true (there is no average "
                          "to export otherwise)")
    if isinstance(t.lr_scheduler, TriangularScheduleConfig) and t.lr_scheduler.peak_epoch >= t.max_epochs:
        raise ConfigError(f"{source}: train.lr_scheduler.peak_epoch ({_fmt(t.lr_scheduler.peak_epoch)}) must be below "
                          f"train.max_epochs ({t.max_epochs}): the ramp down needs steps after the peak")
    if t.preprocess.preload_local and config.data.data_dir.startswith("hf-hub:"):
        raise ConfigError(f"{source}: train.preprocess.preload_local = true copies a folder, but data.data_dir = "
                          f"{config.data.data_dir!r} is a Hub data set (HF_HOME moves its cache to a local disk)")


def check_crop_ramp(crop: int | CropRamp, source: str) -> None:
    if not isinstance(crop, CropRamp):
        return
    where = f"{source}: train.preprocess.train_crop_size"
    if crop.end_epoch < crop.start_epoch:
        raise ConfigError(f"{where}.end_epoch ({crop.end_epoch}) is before start_epoch ({crop.start_epoch})")
    for name in ("start", "end"):
        if getattr(crop, name) % crop.step:
            raise ConfigError(f"{where}.{name} ({getattr(crop, name)}) is not a multiple of step ({crop.step})")


def divisors(n: int) -> list[int]:
    """The whole numbers that divide ``n``, ascending: the micro-batch sizes a per-process batch allows."""
    return [d for d in range(1, n + 1) if n % d == 0]


def check_micro_batch(t: TrainConfig, source: str, num_processes: int) -> None:
    """A micro-batch size must split the per-process batch into a whole number of passes."""
    micro = t.micro_batch_size
    if micro == "auto" or micro == 0:
        return
    per_process = t.batch_size // num_processes
    if per_process % micro == 0:
        return
    valid = divisors(per_process)
    nearest = [d for d in (max((d for d in valid if d < micro), default=None),
                           min((d for d in valid if d > micro), default=None)) if d is not None]
    raise ConfigError(f"{source}: train.micro_batch_size ({micro}) must divide the per-process batch "
                      f"({per_process} = train.batch_size {t.batch_size} / {num_processes} process(es)) to give a "
                      f"whole number of accumulation steps; nearest valid values: {' and '.join(map(str, nearest))}")


def to_dict(config: Any) -> dict:
    """The config as nested plain dicts, ready for TOML; an open member's ``args`` beside its other keys,
    as they were read."""
    if not dataclasses.is_dataclass(config):
        return copy.deepcopy(config)
    table = {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, TimmOptimizerConfig):
        table.update(table.pop("args"))
    return table


def flatten(table: dict, prefix: str = "") -> dict:
    """``{"train": {"optim": {"momentum": 0.9}}}`` -> ``{"train.optim.momentum": 0.9}``."""
    flat = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat
