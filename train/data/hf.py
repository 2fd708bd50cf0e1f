"""The Hugging Face ``datasets`` loader (``[dataloader] name = "hf"``).

It serves an ImageNet-layout folder (listed by ``folder.py``, decoded with PIL) or a Hub
data set (``data_dir = "hf-hub:<id>"``), through torch DataLoader workers.
"""

from __future__ import annotations

import functools
import io
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import random
import signal
import threading

import datasets
import torch
from PIL import Image

from ..config import CropRamp, DataConfig, PreprocessConfig
from ..errors import first_line
from ..preemption import STOP_SIGNALS
from .folder import DataError, FolderSplit
from .transforms import EvalPreset, TrainPreset, UndecodableImage


def _open_lazily(value, where: str) -> Image.Image:
    """A PIL image from a file path, PIL image or {'bytes', 'path'} record: opened, its size
    known, its pixels decoded later by the preset (at a reduced size where the crop allows)."""
    try:
        if isinstance(value, str):
            return Image.open(value)
        if isinstance(value, dict):
            return Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value["path"])
        return value
    except Exception as exc:  # PIL raises many types for a bad file; all mean the same here
        raise DataError(f"cannot decode image {where}: {exc.__class__.__name__}: {exc}") from None


class ImageDataset(torch.utils.data.Dataset):
    """Decodes and preprocesses sample ``index`` of a ``datasets.Dataset`` for a given epoch:
    uint8 pixels, height x width x 3 (normalised on the training device: ``device.py``)."""

    def __init__(self, table: datasets.Dataset, image_column: str, label_column: str, preset, seed: int):
        self.table = table
        self.image_column = image_column
        self.label_column = label_column
        self.preset = preset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        row = self.table[index]
        value = row[self.image_column]
        where = value if isinstance(value, str) else f"#{index} of {self.table.info.dataset_name or 'the data set'}"
        image = _open_lazily(value, where)
        rng = random.Random(f"{self.seed}/{epoch}/{index}")
        try:
            return self.preset(image, rng, epoch), row[self.label_column]  # the epoch decides a ramp's crop size
        except UndecodableImage as exc:
            raise DataError(f"cannot decode image {where}: {exc}") from None
        finally:
            if image is not value:
                image.close()


def folder_table(split: FolderSplit) -> datasets.Dataset:
    """A ``datasets.Dataset`` of (path, label) rows; images are decoded lazily by ImageDataset."""
    return datasets.Dataset.from_dict({"image": list(split.paths), "label": list(split.labels)})


def hub_tables(dataset_id: str, data: DataConfig) -> tuple[datasets.Dataset, datasets.Dataset, tuple[str, ...]]:
    """Train and val splits of a Hub data set (or a local data set folder), with class names."""
    loader = data.dataloader
    try:
        train = datasets.load_dataset(dataset_id, split=loader.train_split)
        val = datasets.load_dataset(dataset_id, split=loader.val_split)
    except Exception as exc:  # offline, unknown id, missing split: all are input problems
        raise DataError(f"data.data_dir: cannot load Hugging Face data set {dataset_id!r} "
                        f"(splits {loader.train_split!r}/{loader.val_split!r}): {first_line(exc)}") from None
    for table, split in ((train, loader.train_split), (val, loader.val_split)):
        for column in (loader.image_column, loader.label_column):
            if column not in table.column_names:
                raise DataError(f"data.dataloader: split {split!r} of {dataset_id!r} has no column {column!r} "
                                f"(columns: {', '.join(table.column_names)})")
    label_feature = train.features[loader.label_column]
    if hasattr(label_feature, "names"):
        class_names = tuple(label_feature.names)
    else:
        class_names = tuple(str(i) for i in range(max(train[loader.label_column]) + 1))
    if len(class_names) != data.num_classes:
        raise DataError(f"data.num_classes = {data.num_classes} but {dataset_id!r} has {len(class_names)} "
                        "classes; set data.num_classes to match")
    return train, val, class_names


def make_datasets(train_table: datasets.Dataset, val_table: datasets.Dataset, image_column: str,
                  label_column: str, preprocess: PreprocessConfig, seed: int) -> tuple[ImageDataset, ImageDataset]:
    train_preset = TrainPreset(preprocess.train_crop_size, preprocess.interpolation)
    val_preset = EvalPreset(preprocess.val_image_size, preprocess.val_crop_size, preprocess.interpolation)
    return (ImageDataset(train_table, image_column, label_column, train_preset, seed),
            ImageDataset(val_table, image_column, label_column, val_preset, seed))


def at_final_crop_size(train_set: ImageDataset, preprocess: PreprocessConfig) -> ImageDataset:
    """The training set with a ramp's last crop size in every epoch: the BatchNorm statistics
    stream's, which serves evaluations (the last one above all, once the ramp has ended)."""
    if not isinstance(preprocess.train_crop_size, CropRamp):
        return train_set
    preset = TrainPreset(preprocess.train_crop_size.end, preprocess.interpolation)
    return ImageDataset(train_set.table, train_set.image_column, train_set.label_column, preset, train_set.seed)


# SLURM sends the trainer's stop signals to every process of a job step: loader workers must
# leave them to the trainer, which stops after a checkpoint and then ends its workers itself.
OTHER_STOP_SIGNALS = frozenset(STOP_SIGNALS) - {signal.SIGTERM}


# Workers are forked by a fork server (a single-threaded process that imports this module
# once), never from the trainer itself. The trainer runs threads (Gloo's, TensorBoard's, the
# heartbeat), and CPython 3.11 before 3.11.8 can leave a child forked while another thread
# holds the interpreter's thread-list lock deadlocked for good (CPython gh-112275): the
# loader then waits forever for a worker that never starts (seen at the first evaluation of
# a 2-process run). SLURM signals every process of a job step, the server included, so the
# server starts with the stop signals blocked and every worker it forks inherits them
# blocked; the server is the trainer's to end (it exits with it).
WORKER_CONTEXT = multiprocessing.get_context("forkserver")
WORKER_CONTEXT.set_forkserver_preload([__name__])


def start_worker_server() -> None:
    """Start the fork server (and multiprocessing's resource tracker, which comes first) with
    the stop signals blocked; a no-op once they run. Called when a loader is built, so that the
    server imports torch while the trainer builds its model."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        # Starting the resource tracker unblocks SIGTERM on its way out: block it again.
        multiprocessing.resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        multiprocessing.forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class _StopSignalSafeLoader(torch.utils.data.DataLoader):
    """A DataLoader whose worker processes leave the stop signals to the trainer.

    Left alone, a worker dies of SIGTERM (PyTorch's handler in the worker lets only the
    trainer's own SIGTERM end it quietly), the trainer then fails with "DataLoader worker is
    killed by signal" before its checkpoint, and a worker inherits the trainer's handler for
    SIGUSR1, logging the stop once more. Workers start with the signals blocked (inherited
    from the fork server), so none arrives before ``_leave_stop_signals`` has run in them."""

    def __iter__(self):
        if self.num_workers > 0:
            start_worker_server()  # again, in case the server has gone since
        return super().__iter__()


def _leave_stop_signals(worker_id: int, trainer: int) -> None:
    """worker_init_fn: ignore SIGUSR1/SIGUSR2; SIGTERM ends this worker only when the trainer
    (process ``trainer``, which is not this worker's parent: the fork server is) sends it."""
    for sig in OTHER_STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)  # also drops one pending since the fork
    signal.pthread_sigmask(signal.SIG_UNBLOCK, OTHER_STOP_SIGNALS)
    # SIGTERM stays blocked (in this thread and the threads it starts) and is taken here with
    # its sender: the trainer's SIGTERM is PyTorch's last resort for a worker that does not
    # exit when asked, and still ends it as PyTorch's own handler would.
    threading.Thread(target=_end_on_trainers_sigterm, args=(trainer,), name="sigterm-watch", daemon=True).start()


def _end_on_trainers_sigterm(trainer: int) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == trainer:
            os._exit(0)


def make_loader(dataset: ImageDataset, batch_sampler, num_workers: int,
                pin_memory: bool = False) -> torch.utils.data.DataLoader:
    if num_workers > 0:
        start_worker_server()
    return _StopSignalSafeLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        worker_init_fn=functools.partial(_leave_stop_signals, trainer=os.getpid()) if num_workers > 0 else None,
        multiprocessing_context=WORKER_CONTEXT if num_workers > 0 else None,
    )
