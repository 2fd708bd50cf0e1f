"""A Hugging Face Hub data set as the source for the ``hf`` loader (``data_dir = "hf-hub:<id>"``).

    python -m train.data.prepare hub ILSVRC/imagenet-1k [--token T] [--write-config FILE]

The trainer reads such a data set with ``datasets.load_dataset(id, split=...)``. The first
call downloads the data files into the Hub cache (``HF_HUB_CACHE``, by default
``~/.cache/huggingface/hub``) and writes an Arrow copy of every split, the unused ones
included (ImageNet's test split too), into the datasets cache (``HF_DATASETS_CACHE``, by
default ``~/.cache/huggingface/datasets``); later calls memory-map that copy. Doing this here,
once, before training means a run starts without a download, and its processes do not sit
behind the one that holds the preparation lock for an hour. The splits are then checked: both
exist, the columns exist, the label column is a ClassLabel whose classes agree between the
splits, every image has a label; for the official ``ILSVRC/imagenet-1k`` the counts must be
1,000 classes, 1,281,167 training and 50,000 validation images.

The token comes from ``--token``, or else from huggingface_hub's own lookup (``HF_TOKEN``, then
the token saved by ``hf auth login``). It is never printed.
"""

from __future__ import annotations

import argparse
import errno
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import huggingface_hub
import pyarrow.compute as pc

from ..config import DataloaderConfig, load_data_config
from ..data import HUB_PREFIX
from ..data.folder import DataError
from ..data.verify import available_cpus
from ..errors import first_line
from ..files import write_atomically

# The official copy (and its old alias, which the Hub redirects) and the ILSVRC2012 counts.
OFFICIAL_IMAGENET_IDS = ("ILSVRC/imagenet-1k", "imagenet-1k")
IMAGENET_CLASSES, IMAGENET_TRAIN, IMAGENET_VAL = 1000, 1_281_167, 50_000
# DataLoader workers per training process in the written config (as configs/data/imagenet-hf.toml).
CONFIG_WORKERS = 8
EXIT_MISMATCH = 1
EXIT_INTERRUPTED = 130


class HubSourceError(DataError):
    """A Hub data set that cannot be used: one line naming it and what to do."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_hub_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``hub`` subcommand's arguments; their defaults are the trainer's [dataloader] defaults."""
    defaults = DataloaderConfig()
    parser.add_argument("dataset", help="Hub data set id (ILSVRC/imagenet-1k) or a local data set folder "
                                        "(data files such as data/train-*.parquet, as on the Hub)")
    parser.add_argument("--train-split", default=defaults.train_split, help="default: %(default)s")
    parser.add_argument("--val-split", default=defaults.val_split, help="default: %(default)s")
    parser.add_argument("--image-column", default=defaults.image_column, help="default: %(default)s")
    parser.add_argument("--label-column", default=defaults.label_column, help="default: %(default)s")
    parser.add_argument("--token", default=None,
                        help="Hugging Face token for a gated data set (default: HF_TOKEN, or the token saved by "
                             "`hf auth login`)")
    parser.add_argument("--num-proc", type=_positive_int, default=None,
                        help="parallel download and preparation processes (default: the CPUs this process may use)")
    parser.add_argument("--write-config", type=Path, default=None, metavar="PATH",
                        help="write a data config for this source (--data-cfg PATH); refused if PATH exists")


# ------------------------------------------------------------------------------ loading


def _causes(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def describe_load_error(dataset: str, exc: Exception) -> str:
    """One line for a failed download or preparation: what went wrong and what to do."""
    page = f"{huggingface_hub.constants.ENDPOINT}/datasets/{dataset}"
    chain = list(_causes(exc))
    reason = first_line(exc, with_type=True)
    text = " ".join(str(e) for e in chain)
    gated = [e for e in chain if isinstance(e, huggingface_hub.errors.GatedRepoError)]
    status = getattr(getattr(gated[0], "response", None), "status_code", None) if gated else None
    if gated or "gated dataset" in text:
        if status == 401 or "must be authenticated" in text:
            return (f"{dataset} is gated and no accepted token was sent: accept its terms on {page}, then log in with "
                    "`hf auth login` or pass --token (or set HF_TOKEN)")
        return (f"{dataset} is gated and this token's account has not been granted access: accept its terms on "
                f"{page} while logged in as that account, or use a token of an account that has")
    if datasets.config.HF_HUB_OFFLINE and any(isinstance(e, ConnectionError) for e in chain):
        return (f"{dataset} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: unset HF_HUB_OFFLINE "
                "to download it (set it only once the cache holds the data set)")
    if any(isinstance(e, huggingface_hub.errors.RepositoryNotFoundError) for e in chain) or \
            isinstance(exc, datasets.exceptions.DatasetNotFoundError):
        return (f"{dataset}: no such data set on the Hub, or a private one this token cannot see: check the id "
                "(e.g. ILSVRC/imagenet-1k) or pass --token")
    if isinstance(exc, ConnectionError):
        return (f"{dataset}: cannot reach the Hugging Face Hub ({reason}): check the network, or prepare it "
                "where the Hub is reachable and copy the Hugging Face cache (HF_HOME) here")
    if "Not enough disk space" in text or any(getattr(e, "errno", None) == errno.ENOSPC for e in chain):
        return (f"{dataset}: not enough disk space for the Hugging Face cache ({reason}): free space, or "
                "point HF_HOME (or HF_HUB_CACHE and HF_DATASETS_CACHE) at a larger disk for this command and training")
    if isinstance(exc, FileNotFoundError) and not Path(dataset).exists():
        return (f"{dataset}: no such folder, nor a Hub data set of that name; give a Hub id such as "
                "ILSVRC/imagenet-1k or a folder of data files")
    if isinstance(exc, FileNotFoundError):
        return f"{dataset}: {reason}; give a folder of data files (e.g. data/train-*.parquet) or a Hub id"
    return f"{dataset}: datasets.load_dataset failed: {reason}"


def _known_splits(builder) -> list[str]:
    """Split names the builder knows before preparing (from its data files or the Hub's metadata)."""
    if getattr(builder.config, "data_files", None):
        return list(builder.config.data_files)
    return list(builder.info.splits or {})


def _require_split(dataset: str, split: str, option: str, available: list[str]) -> None:
    if split not in available:
        raise HubSourceError(f"{dataset} has no split {split!r} (its splits: {', '.join(available) or 'none'}); "
                             f"pass {option} with one of them")


def _dir_size(path: Path) -> int:
    """Bytes under path; the Hub cache's snapshot links to its blobs are not counted twice."""
    if not path.is_dir():
        return 0
    return sum(entry.stat().st_size for entry in path.rglob("*") if entry.is_file() and not entry.is_symlink())


def hub_download_dir(dataset: str) -> Path:
    """Where huggingface_hub keeps a Hub data set's downloaded files."""
    return Path(huggingface_hub.constants.HF_HUB_CACHE) / f"datasets--{dataset.replace('/', '--')}"


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_free_space(dataset: str, needs: list[tuple[Path, int]]) -> None:
    """Refuse to start when the disks of the caches cannot hold what is still to be written."""
    by_device: dict[int, tuple[Path, int]] = {}
    for folder, size in needs:
        folder = _existing_parent(folder)
        device = folder.stat().st_dev
        first, total = by_device.get(device, (folder, 0))
        by_device[device] = (first, total + size)
    for folder, size in by_device.values():
        free = shutil.disk_usage(folder).free
        if size > free:
            raise HubSourceError(f"{dataset} needs about {_size_text(size)} more in {folder}, which has "
                                 f"{_size_text(free)} free: free space, or point HF_HOME (or HF_HUB_CACHE and "
                                 "HF_DATASETS_CACHE) at a larger disk for this command and for training")


def _space_needed(dataset: str, builder, is_hub: bool) -> list[tuple[Path, int]]:
    """What is still to be written where, from the sizes the Hub publishes (unknown: nothing checked)."""
    info = builder.info
    if not (info.download_size or info.dataset_size):
        return []
    needs = [(Path(builder.cache_dir), info.dataset_size or 0)]
    if is_hub:
        downloaded = _dir_size(hub_download_dir(dataset))
        needs.append((hub_download_dir(dataset), max((info.download_size or 0) - downloaded, 0)))
    return needs


def prepare_tables(dataset: str, is_hub: bool, train_split: str, val_split: str, token: str | None,
                   num_proc: int) -> datasets.DatasetDict:
    """Download and prepare every split into the caches, exactly as the trainer's load_dataset(id) finds them."""
    try:
        builder = datasets.load_dataset_builder(dataset, token=token)
    except Exception as exc:  # offline, unknown id, gated, no such folder: all are the user's to fix
        raise HubSourceError(describe_load_error(dataset, exc)) from None
    known = _known_splits(builder)
    if known:  # a misspelt split is reported before hours of download, not after
        _require_split(dataset, train_split, "--train-split", known)
        _require_split(dataset, val_split, "--val-split", known)
    prepared = (Path(builder.cache_dir) / datasets.config.DATASET_INFO_FILENAME).is_file()
    if not prepared:
        check_free_space(dataset, _space_needed(dataset, builder, is_hub))
    try:
        builder.download_and_prepare(num_proc=num_proc)
        return builder.as_dataset()
    except Exception as exc:  # KeyboardInterrupt is no Exception: it reaches run_hub
        raise HubSourceError(describe_load_error(dataset, exc)) from None


# ----------------------------------------------------------------------------- checking


@dataclass(frozen=True)
class SplitCounts:
    name: str
    images: int
    fewest_per_class: int
    most_per_class: int


@dataclass(frozen=True)
class HubSummary:
    dataset: str
    class_names: tuple[str, ...]
    train: SplitCounts
    val: SplitCounts
    other_splits: tuple[str, ...]
    arrow_dir: Path


def _count_split(dataset: str, table: datasets.Dataset, split: str, label_column: str,
                 num_classes: int) -> SplitCounts:
    counts = pc.value_counts(table.data.column(label_column))
    per_label = dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True))
    unlabelled = {label: n for label, n in per_label.items() if label is None or not 0 <= label < num_classes}
    if unlabelled:
        values = ", ".join(f"{label}: {n:,}" for label, n in sorted(unlabelled.items(), key=lambda kv: str(kv[0])))
        raise HubSourceError(f"split {split!r} of {dataset} has {sum(unlabelled.values()):,} images without a class "
                             f"label in {label_column!r} ({values}); the trainer needs labelled train and validation "
                             "splits")
    per_class = [per_label.get(index, 0) for index in range(num_classes)]
    return SplitCounts(split, len(table), min(per_class), max(per_class))


def check_tables(dataset: str, tables: datasets.DatasetDict, train_split: str, val_split: str, image_column: str,
                 label_column: str) -> HubSummary:
    """The checks the trainer's loader relies on, each failing with one line that names the fix."""
    available = list(tables)
    _require_split(dataset, train_split, "--train-split", available)
    _require_split(dataset, val_split, "--val-split", available)
    for split in (train_split, val_split):
        features = tables[split].features
        for column, option in ((image_column, "--image-column"), (label_column, "--label-column")):
            if column not in features:
                raise HubSourceError(f"split {split!r} of {dataset} has no column {column!r} "
                                     f"(columns: {', '.join(features)}); pass {option} with one of them")
        image_feature = features[image_column]
        if not (isinstance(image_feature, datasets.Image)
                or (isinstance(image_feature, datasets.Value) and image_feature.dtype in ("string", "large_string"))):
            raise HubSourceError(f"column {image_column!r} of {dataset} holds {image_feature}, not images; "
                                 "pass --image-column with the image column")
        if not isinstance(features[label_column], datasets.ClassLabel):
            raise HubSourceError(f"column {label_column!r} of {dataset} holds {features[label_column]}, not a "
                                 "ClassLabel, so the classes are unknown; pass --label-column with the class column")
    class_names = tuple(tables[train_split].features[label_column].names)
    if tuple(tables[val_split].features[label_column].names) != class_names:
        raise HubSourceError(f"splits {train_split!r} and {val_split!r} of {dataset} name different classes in "
                             f"{label_column!r}; pick two splits of the same labelling")
    train = _count_split(dataset, tables[train_split], train_split, label_column, len(class_names))
    val = _count_split(dataset, tables[val_split], val_split, label_column, len(class_names))
    arrow_dir = Path(tables[train_split].cache_files[0]["filename"]).parent
    others = tuple(split for split in available if split not in (train_split, val_split))
    return HubSummary(dataset, class_names, train, val, others, arrow_dir)


def official_mismatches(summary: HubSummary) -> list[str]:
    """Differences from the ILSVRC2012 counts, for the official Hub copy only."""
    if summary.dataset not in OFFICIAL_IMAGENET_IDS:
        return []
    found = (("classes", len(summary.class_names), IMAGENET_CLASSES),
             (f"images in split {summary.train.name!r}", summary.train.images, IMAGENET_TRAIN),
             (f"images in split {summary.val.name!r}", summary.val.images, IMAGENET_VAL))
    return [f"{what}: {got:,}, but ILSVRC2012 has {expected:,}" for what, got, expected in found if got != expected]


# ------------------------------------------------------------------------------- output


def _size_text(size: int) -> str:
    if size >= 1e9:
        return f"{size / 1e9:,.1f} GB"
    return f"{size / 1e6:,.1f} MB" if size >= 1e6 else f"{size / 1e3:,.1f} kB"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def _toml_string(text: str) -> str:
    # A JSON string is a valid TOML basic string (same escapes).
    return json.dumps(text, ensure_ascii=False)


def config_text(data_dir: str, summary: HubSummary, image_column: str, label_column: str) -> str:
    return "\n".join([
        f"# {summary.dataset} through the Hugging Face datasets loader; written by `python -m train.data.prepare hub`,",
        "# which prepared its splits in the Hugging Face cache. Once it has, HF_HUB_OFFLINE=1 keeps training runs",
        "# off the network.",
        f"data_dir = {_toml_string(HUB_PREFIX + data_dir)}",
        f"num_classes = {len(summary.class_names)}",
        "",
        "[dataloader]",
        'name = "hf"',
        f"num_data_workers = {CONFIG_WORKERS}",
        f"train_split = {_toml_string(summary.train.name)}",
        f"val_split = {_toml_string(summary.val.name)}",
        f"image_column = {_toml_string(image_column)}",
        f"label_column = {_toml_string(label_column)}",
        "",
    ])


def write_config(path: Path, text: str) -> None:
    """Check that the trainer accepts the config, then write it (never over an existing file)."""
    load_data_config(path, text=text)
    if path.exists():  # appeared while preparing: keep the user's file
        raise HubSourceError(f"--write-config {path}: the file appeared while preparing; not overwritten")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, text)


def print_summary(summary: HubSummary, is_hub: bool, seconds: float, out=None) -> None:
    out = out or sys.stdout
    names = summary.class_names
    shown = "; ".join(names[:3]) + ("; ..." if len(names) > 3 else "")
    print(f"{summary.dataset}: prepared and checked in {_duration(seconds)}", file=out)
    print(f"  classes     {len(names):,} ({shown})", file=out)
    for role, split in (("train", summary.train), ("validation", summary.val)):
        print(f"  {role:<11} {split.images:,} images in split {split.name!r}, "
              f"{split.fewest_per_class:,}-{split.most_per_class:,} per class", file=out)
    if summary.other_splits:
        print(f"  also        split(s) {', '.join(summary.other_splits)}: prepared by datasets as well, "
              "not used by the trainer", file=out)
    print(f"  Arrow copy  {summary.arrow_dir} ({_size_text(_dir_size(summary.arrow_dir))}, all splits)", file=out)
    if is_hub:
        download_dir = hub_download_dir(summary.dataset)
        if download_dir.is_dir():
            print(f"  downloads   {download_dir} ({_size_text(_dir_size(download_dir))})", file=out)
        else:
            print("  downloads   none in the Hub cache", file=out)


def run_hub(args: argparse.Namespace) -> int:
    """Prepare and check a Hub data set (or local data set folder): 0 ready, 1 counts differ from ILSVRC2012."""
    dataset = args.dataset[len(HUB_PREFIX):] if args.dataset.startswith(HUB_PREFIX) else args.dataset
    is_hub = not Path(dataset).is_dir()
    data_dir = dataset if is_hub else str(Path(dataset).resolve())
    if args.write_config is not None and args.write_config.exists():
        raise HubSourceError(f"--write-config {args.write_config}: already exists; remove it or give another path")
    start = time.monotonic()
    try:
        tables = prepare_tables(data_dir, is_hub, args.train_split, args.val_split, args.token,
                                args.num_proc or available_cpus())
    except KeyboardInterrupt:
        print(f"interrupted: downloaded files of {dataset} are kept in the Hugging Face cache; the same command "
              "resumes", file=sys.stderr)
        return EXIT_INTERRUPTED
    summary = check_tables(data_dir, tables, args.train_split, args.val_split, args.image_column, args.label_column)
    print_summary(summary, is_hub, time.monotonic() - start)
    mismatches = official_mismatches(summary)
    if mismatches:
        for line in mismatches:
            print(f"mismatch: {line}", file=sys.stderr)
        print(f"{dataset} does NOT match the official ILSVRC2012 counts (see above)"
              + (f"; {args.write_config} not written" if args.write_config else ""), file=sys.stderr)
        return EXIT_MISMATCH
    if summary.dataset in OFFICIAL_IMAGENET_IDS:
        print(f"  matches ILSVRC2012: {IMAGENET_CLASSES:,} classes, {IMAGENET_TRAIN:,} training and "
              f"{IMAGENET_VAL:,} validation images")
    text = config_text(data_dir, summary, args.image_column, args.label_column)
    if args.write_config is not None:
        write_config(args.write_config, text)
        print(f"\nwrote {args.write_config}; train with --data-cfg {args.write_config}")
    else:
        print("\ndata config for the trainer (save as a file, pass it with --data-cfg):\n")
        print(text, end="")
    return 0
