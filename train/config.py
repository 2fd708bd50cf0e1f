"""Typed run configuration: the schema, TOML loading, ``--set`` overrides and validation.

Everything a run needs is read and checked here, once, before any data or model is
touched. The rest of the package receives these dataclasses and never reads TOML or the
environment itself. The keys are the seed project's (``data_dir``, ``[dataloader]``,
``[preprocess]``, ``[optim]``, ``[lr_scheduler]``, ``[reproduce]``, ``[log]``) plus a few
a modern trainer needs, each with a default that keeps the seed's files valid.
"""

from __future__ import annotations

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


def _bounds(default: Any, *, gt: float | None = None, ge: float | None = None,
            lt: float | None = None, le: float | None = None) -> Any:
    """A dataclass field whose numeric value must lie within the given bounds."""
    return field(default=default, metadata={"gt": gt, "ge": ge, "lt": lt, "le": le})


# ----------------------------------------------------------------------------- data


@dataclass
class DataloaderConfig:
    name: Literal["dali", "hf"] = "dali"
    num_data_workers: int = _bounds(4, ge=0)  # DataLoader worker processes (hf), or DALI threads
    prefetch_queue_depth: int = _bounds(2, ge=1)  # DALI: batches prepared ahead of the loop
    # Split names, used when data_dir is a Hugging Face Hub dataset ("hf-hub:<id>").
    train_split: str = "train"
    val_split: str = "validation"
    image_column: str = "image"
    label_column: str = "label"


@dataclass
class DataConfig:
    # A folder with train/<class>/* and val/<class>/*, "hf-hub:<dataset id>", or
    # "builtin:shapes" for the small generated dataset. No default: it must be given.
    data_dir: str = ""
    num_classes: int = _bounds(1000, gt=0)
    dataloader: DataloaderConfig = field(default_factory=DataloaderConfig)


# ---------------------------------------------------------------------------- train


@dataclass
class PreprocessConfig:
    # Train from a copy of data_dir on the node's local disk ($TMPDIR), one per node, made at
    # start-up and reused by later jobs on the node (data/preload.py).
    preload_local: bool = False
    # "triangular" is DALI's antialiased linear filter; the HF loader uses PIL's bilinear,
    # which is the same triangle filter when downscaling.
    interpolation: Literal["bilinear", "bicubic", "triangular"] = "bilinear"
    train_crop_size: int = _bounds(176, gt=0)
    val_image_size: int = _bounds(256, gt=0)
    val_crop_size: int = _bounds(224, gt=0)
    dali_cpu: bool = True  # false: decode JPEGs on the GPU (DALI "mixed" decoder) when CUDA is there
    # GPU decoding only: the share of images given to the hardware JPEG decoder (A100, H100),
    # and the image size its buffers are preallocated for (ImageNet's largest image).
    dali_hw_decoder_load: float = _bounds(0.65, ge=0, le=1)
    dali_preallocate_width_hint: int = _bounds(5980, ge=0)
    dali_preallocate_height_hint: int = _bounds(6430, ge=0)


@dataclass
class SGDConfig:
    name: Literal["sgd"] = "sgd"
    weight_decay: float = _bounds(1e-4, ge=0)
    momentum: float = _bounds(0.875, ge=0, lt=1)
    nesterov: bool = False


@dataclass
class AdamConfig:
    name: Literal["adam"] = "adam"
    weight_decay: float = _bounds(1e-4, ge=0)
    beta1: float = _bounds(0.9, ge=0, lt=1)
    beta2: float = _bounds(0.999, ge=0, lt=1)
    epsilon: float = _bounds(1e-8, gt=0)


@dataclass
class AdamWConfig:
    name: Literal["adamw"] = "adamw"
    weight_decay: float = _bounds(0.05, ge=0)
    beta1: float = _bounds(0.9, ge=0, lt=1)
    beta2: float = _bounds(0.999, ge=0, lt=1)
    epsilon: float = _bounds(1e-8, gt=0)


@dataclass
class SGDScheduleFreeConfig:
    name: Literal["sgd-schedule-free"] = "sgd-schedule-free"
    warmup_epochs: float = _bounds(5, ge=0)
    weight_decay: float = _bounds(1e-4, ge=0)
    momentum: float = _bounds(0.9, ge=0, lt=1)
    r: float = _bounds(0.0, ge=0)
    weight_lr_power: float = _bounds(2.0, ge=0)


@dataclass
class AdamWScheduleFreeConfig:
    name: Literal["adamw-schedule-free"] = "adamw-schedule-free"
    warmup_epochs: float = _bounds(5, ge=0)
    weight_decay: float = _bounds(0.1, ge=0)
    beta1: float = _bounds(0.9, ge=0, lt=1)
    beta2: float = _bounds(0.999, ge=0, lt=1)
    epsilon: float = _bounds(1e-8, gt=0)
    r: float = _bounds(0.0, ge=0)
    weight_lr_power: float = _bounds(2.0, ge=0)


@dataclass
class SGDSAMConfig:
    name: Literal["sgd-sam"] = "sgd-sam"
    weight_decay: float = _bounds(1e-4, ge=0)
    momentum: float = _bounds(0.9, ge=0, lt=1)
    rho: float = _bounds(0.05, ge=0)
    adaptive: bool = True
    v2: bool = True  # single-step SAM; false is the original two-step SAM


# typing.Union rather than "|": _union_members recognises tagged unions by it.
OptimConfig = Union[SGDConfig, AdamConfig, AdamWConfig, SGDScheduleFreeConfig,  # noqa: UP007
                    AdamWScheduleFreeConfig, SGDSAMConfig]


@dataclass
class CosineScheduleConfig:
    name: Literal["cosine"] = "cosine"
    warmup_epochs: float = _bounds(5, ge=0)
    warmup_decay: float = _bounds(0.01, gt=0, le=1)  # warm-up starts at lr * warmup_decay
    eta_min: float = _bounds(1e-5, ge=0)


@dataclass
class ConstantScheduleConfig:
    name: Literal["constant"] = "constant"


ScheduleConfig = Union[CosineScheduleConfig, ConstantScheduleConfig]  # noqa: UP007


@dataclass
class ReproduceConfig:
    seed: int = 810975


@dataclass
class LogConfig:
    log_freq: int = _bounds(100, gt=0)  # steps between loss/lr log lines
    checkpoint_freq: int = _bounds(45, gt=0)  # epochs between checkpoints (the last epoch always saves)
    checkpoint_every_steps: int = _bounds(0, ge=0)  # also every N optimizer steps (0: off)
    checkpoint_every_minutes: float = _bounds(0.0, ge=0)  # also every N minutes of wall time (0: off)
    keep_last: int = _bounds(2, gt=0)  # newest checkpoints kept, besides the best by val top-1
    # Also log to Weights & Biases (pip install '.[wandb]'): the same scalars and config as
    # TensorBoard, into the W&B project `wandb_project`, or `project` when that is empty.
    wandb_on: bool = False
    project: str = "imagenet-baselines"
    wandb_project: str = ""  # the seed's other name for `project`
    profile_steps: int = _bounds(0, ge=0)  # torch.profiler trace of this many steps, early in the run (0: off)


@dataclass
class TrainConfig:
    batch_size: int = _bounds(1024, gt=0)  # global: summed over all processes
    # Samples per forward and backward pass on each process. 0: the whole per-process batch
    # (batch_size / processes), no gradient accumulation. A divisor of it: each optimizer step
    # accumulates the gradients of batch_size / (processes * micro_batch_size) passes.
    # "auto": the largest that fits in GPU memory (on the CPU, the whole per-process batch).
    micro_batch_size: int | Literal["auto"] = _bounds(0, ge=0)
    max_epochs: int = _bounds(90, gt=0)
    lr: float = _bounds(1e-3, gt=0)
    label_smoothing: float = _bounds(0.1, ge=0, lt=1)
    grad_clip_norm: float = _bounds(0.0, ge=0)  # 0 disables clipping
    # Where to start from: a training checkpoint (RUN/checkpoints/<step>, resumed as --resume
    # does while the run directory has none of its own), or weights for a fresh run (a model
    # folder, a .safetensors file, or hf-hub:<repo id>). Empty: from scratch.
    checkpoint_dir: str = ""
    arch: str = "resnet50"
    use_amp: bool = True  # false forces fp32 whatever the launcher asks for
    # NHWC memory format; "auto": on CUDA for convolutional models (faster there), never on the
    # CPU (slower there) nor for ViTs (a single convolution, the patch embedding).
    channels_last: bool | Literal["auto"] = "auto"
    compile: bool = False  # torch.compile the model
    tf32: bool = True  # TF32 tensor cores for fp32 matmuls and convolutions (Ampere and newer GPUs)
    cudnn_benchmark: bool = True  # let cuDNN time its kernels for the fixed input shapes
    # BatchNorm statistics over the global batch rather than each GPU's share (SyncBatchNorm),
    # for small per-GPU batches; costs a collective per BN layer. GPUs only.
    sync_bn: bool = False
    eval_freq: int = _bounds(1, gt=0)  # epochs between evaluations (the last always runs)
    num_samples_for_stats: int = _bounds(102400, gt=0)  # training images BatchNorm statistics are recomputed over
    # Recompute BatchNorm statistics before the last epoch's evaluation (and so for the exported model),
    # as the seed does for every optimizer; Schedule-Free recomputes them before every evaluation anyway.
    recompute_bn_before_final_eval: bool = False
    # Keyword arguments for timm.create_model, checked against the model's own (e.g. zero_init_last = false).
    model: dict[str, Any] = field(default_factory=dict)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    optim: OptimConfig = field(default_factory=AdamConfig)
    lr_scheduler: ScheduleConfig = field(default_factory=CosineScheduleConfig)
    reproduce: ReproduceConfig = field(default_factory=ReproduceConfig)
    log: LogConfig = field(default_factory=LogConfig)


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


def _tag(cls: type) -> str:
    return get_args(get_type_hints(cls)["name"])[0]


def _fmt(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)


def _describe_type(tp: Any) -> str:
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
    by_tag = {_tag(m): m for m in members}
    if "name" not in raw:
        raise ConfigError(f"{source}: {prefix}.name is missing; choose one of {', '.join(map(repr, by_tag))}")
    chosen = by_tag.get(raw["name"])
    if chosen is None:
        close = difflib.get_close_matches(str(raw["name"]), list(by_tag), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{source}: {prefix}.name must be one of {', '.join(map(repr, by_tag))}, "
                          f"got {_fmt(raw['name'])}{hint}")
    return _build(chosen, raw, prefix, source)


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
    if t.batch_size % num_processes:
        raise ConfigError(f"{source}: train.batch_size ({t.batch_size}) is not divisible by the number of "
                          f"processes ({num_processes})")
    check_micro_batch(t, source, num_processes)
    schedule_free = isinstance(t.optim, (SGDScheduleFreeConfig, AdamWScheduleFreeConfig))
    if schedule_free and not isinstance(t.lr_scheduler, ConstantScheduleConfig):
        raise ConfigError(f"{source}: train.optim.name = {t.optim.name!r} needs train.lr_scheduler.name = "
                          f"'constant' (Schedule-Free replaces the schedule), got {t.lr_scheduler.name!r}")
    if t.preprocess.preload_local and config.data.data_dir.startswith("hf-hub:"):
        raise ConfigError(f"{source}: train.preprocess.preload_local = true copies a folder, but data.data_dir = "
                          f"{config.data.data_dir!r} is a Hub data set (HF_HOME moves its cache to a local disk)")


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
    """The config as nested plain dicts, ready for TOML."""
    return dataclasses.asdict(config)


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
