"""Input pipelines, chosen by ``[dataloader] name`` and by the form of ``data_dir``.

``data_dir`` is an ImageNet-layout folder, a folder of WebDataset shards (``train-*.tar``,
``val-*.tar``; DALI loader only), ``hf-hub:<dataset id>`` (HF loader only), or
``builtin:shapes``, the generated demo set, which is an ImageNet-layout folder in a cache.
"""

from __future__ import annotations

import importlib.util
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..config import DataConfig, PreprocessConfig
from ..errors import UserError
from . import hf
from .builtin import ensure_builtin_dataset
from .classes import class_descriptions
from .device import CPU_FLOAT32, BatchFormat, DeviceBatches
from .folder import DataError, scan_image_folder
from .sampling import EvalBatchSampler, ShardedBatchSampler
from .shards import is_shard_set

HUB_PREFIX = "hf-hub:"
BUILTIN_PREFIX = "builtin:"


@dataclass
class Loaders:
    """What the training loop needs from an input pipeline; every loader provides this."""
    # Yields (images, labels) micro-batches: micro_batches_per_step for each of the
    # steps_per_epoch optimizer steps, as many on every process. Every stream here yields
    # batches on the training device in the model's format (``device.py``'s BatchFormat).
    train: Iterable
    # Yields (images, labels) for this process's shard of the validation set: every sample
    # exactly once over all processes, no padding, no duplicates.
    val: Iterable
    class_names: tuple[str, ...]
    num_train: int
    num_val: int
    steps_per_epoch: int  # optimizer steps (global batches)
    # Called before each epoch's pass over `train`: set_epoch(epoch, start_step).
    set_epoch: Callable[[int, int], None]
    # A new stream of training batches (training preprocessing, this process's shard) that
    # leaves `train`'s position alone: BatchNorm statistics are recomputed from it mid-run.
    train_stats: Callable[[], Iterable]
    # Reader position for checkpoints, for loaders that need more than (epoch, start_batch)
    # to resume mid-epoch (DALI); None for loaders that do not.
    state_dict: Callable[[], dict] | None = None
    load_state_dict: Callable[[dict], None] | None = None
    # Readable name per class index (a folder's classes.tsv, or a shard manifest's copy of
    # it), for exported models; () when unknown or when class_names are readable already.
    class_descriptions: tuple[str, ...] = ()
    # Builds now what the loaders would build on first use (DALI's pipelines, the statistics
    # stream's included when asked), before training takes the GPU's memory; returns a line
    # for the log. None for loaders with nothing to build.
    build_before_training: Callable[[bool], str] | None = None
    # Micro-batches per optimizer step on each process (gradient accumulation; 1: none).
    micro_batches_per_step: int = 1

    def train_steps(self) -> Iterator[list]:
        """The epoch's training micro-batches (from the position set_epoch gave), a list per optimizer step."""
        batches = iter(self.train)
        while step := list(itertools.islice(batches, self.micro_batches_per_step)):
            yield step


def start_worker_server(data: DataConfig) -> None:
    """For the HF loader with workers: start the process they are forked from now, at the start
    of a run, so that its imports (torch, datasets, PIL: seconds) overlap the rest of the
    start-up rather than delay the first epoch's first batch (``hf.py`` says why there is one)."""
    if data.dataloader.name == "hf" and data.dataloader.num_data_workers > 0:
        hf.start_worker_server()


def check_supported(data: DataConfig, source: str) -> None:
    """Start-up check of the loader choice, before anything is read."""
    name = data.dataloader.name
    if data.data_dir.startswith(HUB_PREFIX) and name != "hf":
        raise UserError(f"{source}: data.data_dir = {data.data_dir!r} is a Hub data set, which only "
                        "data.dataloader.name = \"hf\" can read")
    if name == "dali" and not _dali_installed():
        raise UserError(f"{source}: data.dataloader.name = \"dali\" needs NVIDIA DALI, which is not installed "
                        "(pip install nvidia-dali-cuda120, Linux only); or use --set data.dataloader.name=\"hf\"")


def _dali_installed() -> bool:
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:  # not even the "nvidia" namespace package
        return False


def resolve_data_dir(data_dir: str) -> str:
    """Local folder for ``builtin:`` data sets (generated on first use); other values unchanged."""
    if data_dir.startswith(BUILTIN_PREFIX):
        return str(ensure_builtin_dataset(data_dir[len(BUILTIN_PREFIX):]))
    return data_dir


def build_loaders(data: DataConfig, preprocess: PreprocessConfig, per_process_batch: int,
                  num_processes: int, rank: int, seed: int, batch_format: BatchFormat = CPU_FLOAT32,
                  on_main_process: Callable[[Callable[[], None]], None] | None = None,
                  micro_batch: int | None = None) -> Loaders:
    """This process's loaders, with batches of ``micro_batch`` (a divisor of ``per_process_batch``,
    which it defaults to) for training and validation, handed over in ``batch_format`` (by
    default on the CPU, float32, NCHW). ``on_main_process(work)``: runs one-off work for the
    whole job (verifying a folder's images) on one process while the others wait; None runs it
    here."""
    loader_cfg = data.dataloader
    micro_batch = micro_batch or per_process_batch
    if loader_cfg.name == "dali":
        return _build_dali_loaders(data, preprocess, per_process_batch, num_processes, rank, seed, batch_format,
                                   on_main_process, micro_batch)
    if is_shard_set(Path(data.data_dir)):
        raise DataError(f"data.data_dir: {data.data_dir} holds WebDataset shards, which only "
                        "data.dataloader.name = \"dali\" reads")
    if data.data_dir.startswith(HUB_PREFIX):
        # A Hub data set's ClassLabel names are readable already: they are the labels.
        train_table, val_table, class_names = hf.hub_tables(data.data_dir[len(HUB_PREFIX):], data)
        descriptions: tuple[str, ...] = ()
        image_column, label_column = loader_cfg.image_column, loader_cfg.label_column
    else:
        train_split, val_split = scan_image_folder(Path(data.data_dir), data.num_classes)
        class_names = train_split.class_names
        descriptions = class_descriptions(Path(data.data_dir), class_names)
        train_table, val_table = hf.folder_table(train_split), hf.folder_table(val_split)
        image_column, label_column = "image", "label"
    train_set, val_set = hf.make_datasets(train_table, val_table, image_column, label_column, preprocess, seed)

    global_batch = per_process_batch * num_processes
    if len(train_set) < global_batch:
        raise DataError(f"data.data_dir: {len(train_set)} training images are fewer than one global batch "
                        f"(train.batch_size = {global_batch}); lower train.batch_size")
    train_sampler = ShardedBatchSampler(len(train_set), per_process_batch, num_processes, rank, seed, micro_batch)
    val_sampler = EvalBatchSampler(len(val_set), micro_batch, num_processes, rank)
    workers, pin_memory = loader_cfg.num_data_workers, batch_format.on_gpu

    def on_device(dataset: hf.ImageDataset, sampler) -> DeviceBatches:
        return DeviceBatches(hf.make_loader(dataset, sampler, workers, pin_memory), batch_format)

    return Loaders(
        train=on_device(train_set, train_sampler),
        val=on_device(val_set, val_sampler),
        class_names=class_names,
        num_train=len(train_set),
        num_val=len(val_set),
        steps_per_epoch=len(train_set) // global_batch,
        set_epoch=train_sampler.set_epoch,
        train_stats=lambda: on_device(
            hf.at_final_crop_size(train_set, preprocess),
            ShardedBatchSampler(len(train_set), per_process_batch, num_processes, rank, seed, micro_batch)),
        class_descriptions=descriptions,
        micro_batches_per_step=per_process_batch // micro_batch,
    )


def _build_dali_loaders(data: DataConfig, preprocess: PreprocessConfig, per_process_batch: int,
                        num_processes: int, rank: int, seed: int, batch_format: BatchFormat,
                        on_main_process: Callable[[Callable[[], None]], None] | None, micro_batch: int) -> Loaders:
    from . import dali  # imported when chosen: DALI is large, and Linux-only

    loader_cfg = data.dataloader
    train_source, val_source, class_names, descriptions = dali.open_sources(Path(data.data_dir), data.num_classes,
                                                                            on_main_process)
    global_batch = per_process_batch * num_processes
    if len(train_source) < global_batch:
        raise DataError(f"data.data_dir: {len(train_source)} training images are fewer than one global batch "
                        f"(train.batch_size = {global_batch}); lower train.batch_size")
    train, val, steps_per_epoch = dali.make_loaders(
        train_source, val_source, preprocess, per_process_batch, num_processes, rank, seed,
        loader_cfg.num_data_workers, loader_cfg.prefetch_queue_depth, batch_format, micro_batch)
    micro_batches_per_step = per_process_batch // micro_batch
    return Loaders(
        train=train,
        val=val,
        class_names=class_names,
        num_train=len(train_source),
        num_val=len(val_source),
        steps_per_epoch=steps_per_epoch,
        set_epoch=lambda epoch, start_step: train.set_epoch(epoch, start_step * micro_batches_per_step),
        state_dict=train.state_dict,
        load_state_dict=train.load_state_dict,
        train_stats=train.fresh_copy,
        class_descriptions=descriptions,
        build_before_training=lambda with_stats_stream: dali.build_before_training(train, val, with_stats_stream),
        micro_batches_per_step=micro_batches_per_step,
    )
