"""The DALI input pipeline (``[dataloader] name = "dali"``).

Two readers feed the same operators: DALI's file reader over an ImageNet-layout folder
(the file list and class indices come from ``folder.py``, as for the HF loader) and its
webdataset reader over ``train-*.tar`` / ``val-*.tar`` shards (``shards.py``).

Training: random-area crop fused into decoding, resize to ``train_crop_size``, random
horizontal flip, normalize. Validation: resize the shorter side to ``val_image_size``, centre
crop ``val_crop_size``. When training on a GPU, decoding runs there (``mixed``) unless
``preprocess.dali_cpu = true`` (default "auto"), which decodes and resizes on the CPU and moves
the images to the GPU inside DALI before the flip and normalisation. Batches leave DALI finished
(``device.py``'s BatchFormat): on the training device, labels included, in the model's memory
layout (NHWC for a channels_last model) and dtype (float16 under autocast on a GPU).

Each process reads shard ``rank`` of ``num_processes``. DALI pads every shard to the same
number of batches by repeating its last sample; the wrappers below turn that into what the
training loop expects: exactly as many batches per training epoch on every
process (the rest of DALI's epoch is read and dropped, so the next epoch starts on an epoch
boundary), and for validation exactly this shard's samples, padding cut off.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from nvidia.dali import fn, types
from nvidia.dali.backend import TensorListGPU
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..config import CropRamp, PreprocessConfig, crop_size_at
from .classes import class_descriptions
from .device import BatchFormat
from .folder import DataError, scan_image_folder
from .shards import ASCII_LABELS, is_shard_set, open_shard_set
from .transforms import CROP_AREA, CROP_ASPECT, CROP_ATTEMPTS
from .verify import CHECK_COMMAND, available_cpus, default_cache_file, describe_problems, verify_files

LOG = logging.getLogger("train")

READER = "Reader"
MEAN = [255 * m for m in IMAGENET_DEFAULT_MEAN]
STD = [255 * s for s in IMAGENET_DEFAULT_STD]
INTERPOLATION = {"bilinear": types.INTERP_LINEAR, "triangular": types.INTERP_TRIANGULAR,
                 "bicubic": types.INTERP_CUBIC}
# nvJPEG buffer paddings from NVIDIA's ImageNet ResNet-50 example: big enough for ImageNet's
# largest images, so the GPU decoder does not reallocate in the middle of an epoch. They are
# per decoding thread: one device buffer and two pinned host buffers (double buffering) each,
# about 1.7 GB and 2.25 GB for 8 threads. Only the training pipeline gets them; validation
# and the BatchNorm statistics stream keep DALI's small defaults and grow as needed.
DEVICE_MEMORY_PADDING = 211_025_920
HOST_MEMORY_PADDING = 140_544_512
HOST_BUFFERS_PER_THREAD = 2
# Webdataset shards are read in order; this buffer reshuffles samples within a window.
SHUFFLE_BUFFER = 4096
STATE_VERSION = 1


# ----------------------------------------------------------------------- sources


@dataclass(frozen=True)
class FolderSource:
    """Files and class indices of one split of an ImageNet-layout folder."""
    root: Path
    files: tuple[str, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.files)


@dataclass(frozen=True)
class ShardSource:
    """Tar archives and their index files for one split of a shard set."""
    root: Path
    tars: tuple[str, ...]
    indices: tuple[str, ...]
    num_samples: int
    label_encoding: str = ASCII_LABELS  # ASCII digits, or the seed's binary int64

    def __len__(self) -> int:
        return self.num_samples


def open_sources(root: Path, num_classes: int, on_main_process: Callable[[Callable[[], None]], None] | None = None,
                 ) -> tuple[FolderSource | ShardSource, FolderSource | ShardSource, tuple[str, ...], tuple[str, ...]]:
    """The train and val sources of ``root`` (shards or a folder), the class names, and
    their readable names (from the manifest or the folder's class table; () when unknown).

    A folder's files are verified first (once; the results are cached), since DALI may
    crash the process on a damaged file instead of naming it. ``on_main_process(work)``
    runs the verification on one process of the job while the others wait (by default,
    here): on a cluster, one process stats and decodes the files, not every one of them.
    """
    if is_shard_set(root):
        shard_set = open_shard_set(root, num_classes)
        train, val = (ShardSource(root, tuple(str(s.tar) for s in shard_set.split(split)),
                                  tuple(str(s.index) for s in shard_set.split(split)), shard_set.num_samples(split),
                                  shard_set.label_encoding)
                      for split in ("train", "val"))
        return train, val, shard_set.class_names, shard_set.class_descriptions
    train_split, val_split = scan_image_folder(root, num_classes)
    descriptions = class_descriptions(root, train_split.class_names)  # a bad table stops before verifying
    paths = train_split.paths + val_split.paths

    def announce(count: int) -> None:
        LOG.info(f"verifying {count} images of {root} before DALI reads them (once: the results are cached)")

    def verify() -> None:
        problems = verify_files(paths, root, default_cache_file(root), available_cpus(), on_start=announce)
        if problems:
            raise DataError(describe_problems(problems, root))

    (on_main_process or (lambda work: work()))(verify)
    return (FolderSource(root, train_split.paths, train_split.labels),
            FolderSource(root, val_split.paths, val_split.labels), train_split.class_names, descriptions)


def _read(source, training: bool, shard_id: int, num_shards: int, seed: int):
    """The reader of ``source``: (encoded images, raw labels)."""
    sharding = dict(shard_id=shard_id, num_shards=num_shards, pad_last_batch=True, name=READER)
    # Validation keeps each process on its shard (DALI would otherwise move every process to
    # the next shard at each epoch, and the padding to trim would move with it).
    shuffling = dict(shuffle_after_epoch=True, shuffle_after_epoch_seed=seed) if training else dict(stick_to_shard=True)
    if isinstance(source, FolderSource):
        # shuffle_after_epoch reshuffles the whole list each epoch with the same seed on
        # every process, so the shards of an epoch are a partition of the data set. (DALI's
        # other option, random_shuffle, only shuffles within a window of each shard.)
        return fn.readers.file(files=list(source.files), labels=list(source.labels), **shuffling, **sharding)
    # Shards are read sequentially: the archive order is reshuffled each epoch and a buffer
    # mixes samples; the converter stored the samples in random order to begin with.
    # Binary labels (the seed's int64) come out as numbers; ASCII ones as bytes, parsed below.
    binary = {} if source.label_encoding == ASCII_LABELS else dict(dtypes=[types.UINT8, types.INT64])
    return fn.readers.webdataset(paths=list(source.tars), index_paths=list(source.indices), ext=["jpg", "cls"],
                                 missing_component_behavior="error", random_shuffle=training,
                                 initial_fill=SHUFFLE_BUFFER, **binary, **shuffling, **sharding)


# ------------------------------------------------------------------------ pipelines


@dataclass(frozen=True)
class PipelineSpec:
    """Everything a pipeline is built from, so it can be rebuilt (from a checkpoint)."""
    source: FolderSource | ShardSource
    training: bool
    preprocess: PreprocessConfig
    batch_size: int
    num_threads: int
    prefetch: int
    shard_id: int
    num_shards: int
    seed: int
    device_id: int | None  # the GPU the batches go to; None: every operator on the CPU
    # The GPU decoder's buffers sized for ImageNet's largest image from the start: the training
    # pipeline's only (see DEVICE_MEMORY_PADDING).
    preallocate: bool = False
    crop_size: int = 0  # training: the side crops are resized to (a ramp's for the epoch); 0: epoch 1's
    decode_on_cpu: bool = False  # with a GPU: decode and resize on the CPU (dali_cpu = true)
    channels_last: bool = False  # images out as NHWC (handed over as NCHW with channels_last strides)
    float16: bool = False  # images out as float16 rather than float32

    @property
    def decoder_device(self) -> str:
        return "cpu" if self.device_id is None or self.decode_on_cpu else "mixed"

    def preallocated_bytes(self) -> tuple[int, int]:
        """(device, pinned host) bytes the GPU decoder's paddings reserve when the pipeline is built."""
        if self.decoder_device == "cpu" or not self.preallocate:
            return 0, 0
        return (DEVICE_MEMORY_PADDING * self.num_threads,
                HOST_BUFFERS_PER_THREAD * HOST_MEMORY_PADDING * self.num_threads)


def _decoder_options(spec: PipelineSpec) -> dict:
    if spec.decoder_device == "cpu":
        return {}
    p = spec.preprocess
    options = dict(hw_decoder_load=p.dali_hw_decoder_load)
    if spec.preallocate:
        options.update(preallocate_width_hint=p.dali_preallocate_width_hint,
                       preallocate_height_hint=p.dali_preallocate_height_hint,
                       device_memory_padding=DEVICE_MEMORY_PADDING, host_memory_padding=HOST_MEMORY_PADDING)
    return options


def define_pipeline(spec: PipelineSpec, checkpoint: bytes | None = None) -> Pipeline:
    """The DALI pipeline of ``spec``, defined but not yet built (which starts it)."""
    pipe = Pipeline(batch_size=spec.batch_size, num_threads=spec.num_threads, device_id=spec.device_id,
                    # The augmentation differs per process; the reader's shuffle seed does not.
                    seed=spec.seed + spec.shard_id, prefetch_queue_depth=spec.prefetch,
                    enable_checkpointing=spec.training, checkpoint=checkpoint)
    with pipe:
        pipe.set_outputs(*pipeline_outputs(spec))
    return pipe


def pipeline_outputs(spec: PipelineSpec):
    """The (images, labels) nodes of ``spec``'s pipeline; called inside its ``with pipe:`` block."""
    p = spec.preprocess
    interp = INTERPOLATION[p.interpolation]
    encoded, labels = _read(spec.source, spec.training, spec.shard_id, spec.num_shards, spec.seed)
    if spec.training:
        images = fn.decoders.image_random_crop(encoded, device=spec.decoder_device, output_type=types.RGB,
                                               random_area=list(CROP_AREA), random_aspect_ratio=list(CROP_ASPECT),
                                               num_attempts=CROP_ATTEMPTS, **_decoder_options(spec))
        side = spec.crop_size or crop_size_at(p.train_crop_size, 0)
        images = fn.resize(images, resize_x=side, resize_y=side, interp_type=interp, antialias=True)
        window = dict(mirror=fn.random.coin_flip(probability=0.5))
    else:
        images = fn.decoders.image(encoded, device=spec.decoder_device, output_type=types.RGB,
                                   **_decoder_options(spec))
        images = fn.resize(images, resize_shorter=p.val_image_size, interp_type=interp, antialias=True)
        window = dict(crop=(p.val_crop_size, p.val_crop_size))
    if spec.device_id is not None:
        # Decoded on the CPU (dali_cpu = true): flipped and normalised on the GPU, and the batch
        # leaves DALI there, rather than being copied over as float32 by the training loop.
        images = images.gpu()
        if not _ascii_labels(spec):  # numbers: onto the GPU too (ASCII text is parsed on the host)
            labels = fn.cast(labels, dtype=types.INT64).gpu()
    images = fn.crop_mirror_normalize(images, dtype=types.FLOAT16 if spec.float16 else types.FLOAT,
                                      output_layout="HWC" if spec.channels_last else "CHW", mean=MEAN, std=STD,
                                      **window)
    return images, labels


def _ascii_labels(spec: PipelineSpec) -> bool:
    return isinstance(spec.source, ShardSource) and spec.source.label_encoding == ASCII_LABELS


def build_pipeline(spec: PipelineSpec, checkpoint: bytes | None = None) -> Pipeline:
    """The DALI pipeline of ``spec``, built, restored from ``checkpoint`` if one is given."""
    pipe = define_pipeline(spec, checkpoint)
    try:
        pipe.build()
    except RuntimeError as exc:
        if _DECODE_FAILURE.search(str(exc)):  # a file the reader could not open
            raise _data_error(exc, spec.source.root) from None
        raise
    return pipe


def batches_per_epoch(pipe: Pipeline, batch_size: int) -> int:
    """Batches in one DALI epoch of this shard: every shard is padded to the largest one."""
    meta = pipe.reader_meta(READER)
    return math.ceil(meta["epoch_size_padded"] / meta["number_of_shards"] / batch_size)


def shard_size(num_samples: int, shard_id: int, num_shards: int) -> int:
    """Samples in DALI's shard ``shard_id``: it reads [n * id // shards, n * (id + 1) // shards)."""
    return num_samples * (shard_id + 1) // num_shards - num_samples * shard_id // num_shards


# ------------------------------------------------------------------- batch output


_DECODE_FAILURE = re.compile(r"(?:Failed to decode sample #\d+ : |File mapping failed: |"
                             r"Could not open file |Failed to open file )(\S+)")


def _data_error(exc: Exception, root: Path) -> DataError:
    """A one-line error naming the file DALI choked on, when its message says which."""
    text = str(exc)
    match = _DECODE_FAILURE.search(text)
    hint = f"run {CHECK_COMMAND} {root} to list every unreadable image"
    if match:
        return DataError(f"cannot read image {match.group(1)} (DALI: {_dali_reason(text)}); {hint}")
    return DataError(f"DALI failed reading {root}: {_dali_reason(text)}; {hint}")


def _dali_reason(text: str) -> str:
    """The line of a DALI error that says what went wrong (DALI prefixes it with the
    operator and the Python traceback where the pipeline was defined)."""
    tail = text.rsplit("encountered:", 1)[-1]
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("C++ context", "Current pipeline", "Critical error"))]
    return (useful or lines or [type(text).__name__])[0][:200]


def _to_torch(output) -> torch.Tensor:
    """A DALI output as a torch tensor of the same shape and type. On the GPU, copied (device to
    device) on the current stream, which DALI's outputs are bound to (``_Runner.next_batch``).
    On the CPU, handed over without a copy: the dynamic executor allocates every output afresh
    and the DLPack capsule keeps it alive."""
    tensor = output.as_tensor()
    if isinstance(output, TensorListGPU):
        device = torch.device("cuda", tensor.device_id())
        out = torch.empty(tensor.shape(), dtype=to_torch_type[tensor.dtype], device=device)
        return feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(device))
    return torch.from_dlpack(tensor)


def _images_to_torch(images, channels_last: bool) -> torch.Tensor:
    """N x C x H x W; from DALI's NHWC (``channels_last``) a view with channels_last strides."""
    out = _to_torch(images)
    return out.permute(0, 3, 1, 2) if channels_last else out


def _numeric_labels(labels, root: Path) -> torch.Tensor:
    """Class indices that DALI read as numbers (a folder's file list, the seed's int64 `.cls`);
    on the GPU when the pipeline put them there (cast to int64 in DALI)."""
    out = _to_torch(labels).view(-1)
    return out if out.dtype == torch.int64 else out.long()


def _shard_labels(labels, root: Path) -> torch.Tensor:
    """Class indices from the ASCII digits of the ``.cls`` components, parsed on the host (on a
    GPU, the runner sends them there from page-locked memory)."""
    values = []
    for i in range(len(labels)):
        text = np.array(labels[i]).tobytes().strip()
        if not text.isdigit():
            raise DataError(f"a sample in the shards of {root} has class {text[:20]!r}, not a number; "
                            f"run {CHECK_COMMAND} {root}")
        values.append(int(text))
    return torch.tensor(values, dtype=torch.int64)


class _Runner:
    """One DALI pipeline: built lazily, run batch by batch, outputs as torch tensors."""

    def __init__(self, spec: PipelineSpec):
        self.spec = spec
        self.labels_to_torch = _shard_labels if _ascii_labels(spec) else _numeric_labels
        self.pipe: Pipeline | None = None
        self.checkpoint: bytes | None = None  # restore from this at the next build
        self.batches_per_epoch = 0

    def ensure_built(self) -> None:
        if self.pipe is None:
            self.pipe = build_pipeline(self.spec, self.checkpoint)
            self.batches_per_epoch = batches_per_epoch(self.pipe, self.spec.batch_size)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.ensure_built()
        try:
            images, labels = self.pipe.run(*self.output_stream())
        except RuntimeError as exc:
            raise _data_error(exc, self.spec.source.root) from None
        labels = self.labels_to_torch(labels, self.spec.source.root)
        if self.spec.device_id is not None and not labels.is_cuda:  # parsed from ASCII on the host
            labels = labels.pin_memory().to(torch.device("cuda", self.spec.device_id), non_blocking=True)
        return _images_to_torch(images, self.spec.channels_last), labels

    def output_stream(self) -> tuple[torch.cuda.Stream, ...]:
        """What ``pipe.run`` is given: on a GPU, the compute stream, to which DALI then binds its
        outputs (the stream waits for them, the host does not), where the installed DALI can
        (its dynamic executor); otherwise nothing, and ``run`` waits on the host."""
        if self.spec.device_id is None or not getattr(self.pipe, "exec_dynamic", False):
            return ()
        return (torch.cuda.current_stream(torch.device("cuda", self.spec.device_id)),)

    def skip(self, batches: int) -> None:
        for _ in range(batches):
            try:
                self.pipe.run()
            except RuntimeError as exc:
                raise _data_error(exc, self.spec.source.root) from None

    def save(self) -> str | None:
        """DALI's checkpoint (serialized Protobuf) as base64 text, so the state is plain JSON."""
        checkpoint = self.pipe.checkpoint() if self.pipe is not None else self.checkpoint
        return None if checkpoint is None else base64.b64encode(checkpoint).decode("ascii")

    def restore(self, checkpoint: str | None) -> None:
        self.pipe = None  # a DALI pipeline takes its checkpoint when it is built
        self.checkpoint = None if checkpoint is None else base64.b64decode(checkpoint)


# ------------------------------------------------------------------------ loaders


class DaliTrainLoader:
    """Training batches: ``epoch_length`` per epoch, the same number on every process
    (micro-batches when the trainer accumulates gradients: several per optimizer step).

    ``position`` is (epoch, batches yielded in it). At the end of an epoch the rest of DALI's
    epoch for this shard (the ragged end and the padding, at most two batches) is read and
    dropped, so every epoch starts on a DALI epoch boundary and DALI's reshuffle lines up
    with the loop's epochs.
    """

    def __init__(self, spec: PipelineSpec, epoch_length: int, crop: int | CropRamp | None = None):
        self.runner = _Runner(spec)
        self.crop = spec.crop_size if crop is None else crop  # the crop side, or its ramp over the epochs
        self.epoch_length = epoch_length  # batches yielded per epoch
        self.position = (0, 0)
        self.reader_batches = 0  # batches taken from the current DALI epoch, dropped ones included
        self.requested: tuple[int, int] | None = None
        self.restored = False
        self.warned = False
        self.reserved_copy: DaliTrainLoader | None = None  # built before training, for fresh_copy

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.requested = (epoch, start_batch)

    def __len__(self) -> int:
        epoch, done = self.requested or self.position
        return self.epoch_length - done

    def __iter__(self):
        self.runner.ensure_built()
        self._go_to_requested_position()
        epoch, done = self.position
        self._use_crop_size(crop_size_at(self.crop, epoch))
        while done < self.epoch_length:
            batch = self.runner.next_batch()
            self.reader_batches += 1
            done += 1
            self.position = (epoch, done)
            yield batch
        self._finish_reader_epoch()
        self.position = (epoch + 1, 0)

    def _use_crop_size(self, side: int) -> None:
        """A pipeline resizing to ``side``: the current one, or (the size changed) one rebuilt from
        the current one's checkpoint, so the reader and the random draws go on where they were."""
        runner = self.runner
        if runner.spec.crop_size != side:
            runner.restore(runner.save())  # built again at the next batch
            runner.spec = dataclasses.replace(runner.spec, crop_size=side)

    def _finish_reader_epoch(self) -> None:
        self.runner.skip(self.runner.batches_per_epoch - self.reader_batches)
        self.reader_batches = 0

    def _go_to_requested_position(self) -> None:
        requested, self.requested = self.requested, None
        restored, self.restored = self.restored, False
        if self.position[1] >= self.epoch_length:  # the last pass stopped after its final batch
            self._finish_reader_epoch()
            self.position = (self.position[0] + 1, 0)
        if requested is None or requested == self.position:
            return
        if restored:
            raise ValueError(f"set_epoch{requested} does not match the restored DALI loader state "
                             f"(epoch {self.position[0]}, batch {self.position[1]})")
        # No saved reader state to go back to: the batch count is honoured, but which samples
        # this epoch holds differs from the uninterrupted run.
        if not self.warned:
            LOG.warning(f"DALI loader: starting at epoch {requested[0] + 1}, batch {requested[1]} without a "
                        "saved reader state; the sample order of this epoch differs from an uninterrupted run")
            self.warned = True
        if self.reader_batches:
            self._finish_reader_epoch()
        self.position = requested

    def fresh_copy(self) -> DaliTrainLoader:
        """Another loader of the same shard and preprocessing, from the start, with its own
        pipeline (without the decoder's preallocation; freed with the copy): this one keeps
        its place. The first call returns the copy ``reserve_copy`` built, if any. Its crops
        have a ramp's last size in every epoch: it serves evaluations (the last one above all)."""
        copy, self.reserved_copy = self.reserved_copy, None
        if copy is None:
            final = self.crop.end if isinstance(self.crop, CropRamp) else self.crop
            copy = DaliTrainLoader(dataclasses.replace(self.runner.spec, preallocate=False, crop_size=final),
                                   self.epoch_length)
        return copy

    def reserve_copy(self) -> None:
        """Build the first ``fresh_copy`` now: its memory is taken before training's, and when it
        is freed it goes back to DALI's pool, where later copies find it."""
        self.reserved_copy = None
        self.reserved_copy = self.fresh_copy()
        self.reserved_copy.runner.ensure_built()

    def state_dict(self) -> dict:
        """This process's reader position and random state (each process has its own)."""
        spec = self.runner.spec
        return {"version": STATE_VERSION, "shard_id": spec.shard_id, "num_shards": spec.num_shards,
                "batch_size": spec.batch_size, "num_samples": len(spec.source),
                "epoch": self.position[0], "batch": self.position[1], "reader_batches": self.reader_batches,
                "pipeline": self.runner.save()}

    def load_state_dict(self, state: dict) -> None:
        spec = self.runner.spec
        saved = (state.get("shard_id"), state.get("num_shards"), state.get("batch_size"), state.get("num_samples"))
        now = (spec.shard_id, spec.num_shards, spec.batch_size, len(spec.source))
        if state.get("version") != STATE_VERSION or saved != now:
            raise DataError(f"the saved DALI loader state is for shard {saved[0]} of {saved[1]}, batch {saved[2]}, "
                            f"{saved[3]} images; this run is shard {now[0]} of {now[1]}, batch {now[2]}, {now[3]} "
                            "images: resume with the same number of processes, (micro-)batch size and data")
        self.runner.restore(state["pipeline"])
        self.position = (state["epoch"], state["batch"])
        self.reader_batches = state["reader_batches"]
        self.restored = True


class DaliValLoader:
    """Validation batches of this process's shard: each of its samples once, no padding."""

    def __init__(self, spec: PipelineSpec):
        self.runner = _Runner(spec)
        self.samples = shard_size(len(spec.source), spec.shard_id, spec.num_shards)
        self.reader_batches = 0

    def __len__(self) -> int:
        return math.ceil(self.samples / self.runner.spec.batch_size)

    def __iter__(self):
        self.runner.ensure_built()
        if self.reader_batches:  # an earlier pass was abandoned half-way
            self.runner.skip(self.runner.batches_per_epoch - self.reader_batches)
            self.reader_batches = 0
        batch_size = self.runner.spec.batch_size
        left = self.samples
        while self.reader_batches < self.runner.batches_per_epoch:
            images, labels = self.runner.next_batch()
            self.reader_batches += 1
            keep = min(left, batch_size)
            left -= keep
            if keep:
                yield images[:keep], labels[:keep]
        self.reader_batches = 0


# ---------------------------------------------------------------------- devices


_announced = False


def decodes_on_cpu(dali_cpu: bool | str, cuda: bool) -> bool:
    """``preprocess.dali_cpu`` decided: "auto" decodes on the GPU whenever the run trains on one;
    without CUDA every setting decodes on the CPU (there is no GPU to decode on)."""
    return not cuda or dali_cpu is True


def describe_decoding(dali_cpu: bool | str, cuda: bool) -> str:
    """The start-up line saying where DALI decodes, and why."""
    value = str(dali_cpu).lower() if isinstance(dali_cpu, bool) else f'"{dali_cpu}"'
    setting = f"train.preprocess.dali_cpu = {value}"
    if not cuda:
        why = " (train.preprocess.dali_cpu = false does not apply)" if dali_cpu is False else f" ({setting})"
        return f"DALI: no CUDA device, so every operator runs on the CPU{why}"
    if decodes_on_cpu(dali_cpu, cuda):
        return f"DALI: JPEG decoding on the CPU, flip and normalisation on the GPU, as {setting}"
    return f"DALI: JPEG decoding on the GPU (DALI's mixed decoder), as {setting}"


def choose_device(dali_cpu: bool | str, fmt: BatchFormat) -> tuple[int | None, bool]:
    """(the GPU DALI hands its batches over on, None when training on the CPU; whether it
    decodes on the CPU), said once in the log."""
    global _announced
    if not _announced:
        _announced = True
        LOG.info(describe_decoding(dali_cpu, fmt.on_gpu))
    if not fmt.on_gpu:
        return None, True
    # Accelerate has made this process's GPU (its local index) the current device.
    device_id = fmt.device.index if fmt.device.index is not None else torch.cuda.current_device()
    return device_id, decodes_on_cpu(dali_cpu, True)


def make_loaders(train: FolderSource | ShardSource, val: FolderSource | ShardSource, preprocess: PreprocessConfig,
                 per_process_batch: int, num_processes: int, rank: int, seed: int, num_threads: int,
                 prefetch: int, fmt: BatchFormat, micro_batch: int) -> tuple[DaliTrainLoader, DaliValLoader, int]:
    """The training and validation loaders of this process, and the (optimizer) steps per epoch.

    The pipelines run batches of ``micro_batch``: with gradient accumulation, DALI decodes
    and holds one micro-batch at a time, not the whole per-process batch. Their batches come
    in ``fmt``: on its device, in its layout and dtype.
    """
    device_id, on_cpu = choose_device(preprocess.dali_cpu, fmt)
    common = dict(preprocess=preprocess, batch_size=micro_batch, num_threads=max(1, num_threads),
                  prefetch=prefetch, shard_id=rank, num_shards=num_processes, seed=seed, device_id=device_id,
                  decode_on_cpu=on_cpu and device_id is not None, channels_last=fmt.channels_last,
                  float16=fmt.dtype == torch.float16)
    steps_per_epoch = len(train) // (per_process_batch * num_processes)
    micro_batches_per_epoch = steps_per_epoch * (per_process_batch // micro_batch)
    crop = preprocess.train_crop_size
    train_loader = DaliTrainLoader(PipelineSpec(source=train, training=True, preallocate=True,
                                                crop_size=crop_size_at(crop, 0), **common),
                                   micro_batches_per_epoch, crop)
    val_loader = DaliValLoader(PipelineSpec(source=val, training=False, **common))
    return train_loader, val_loader, steps_per_epoch


def build_before_training(train: DaliTrainLoader, val: DaliValLoader, with_stats_stream: bool) -> str:
    """Build every pipeline the run will use now, before the model and its activations take
    the GPU's memory (a pipeline built at the first evaluation may find none left); returns
    what DALI reserved, for the log."""
    device = train.runner.spec.device_id
    free_before = torch.cuda.mem_get_info(device)[0] if device is not None else 0
    train.runner.ensure_built()
    val.runner.ensure_built()
    if with_stats_stream:
        train.reserve_copy()
    built = 3 if with_stats_stream else 2
    if device is None:
        return f"DALI: {built} pipelines built before training, on the CPU"
    reserved = free_before - torch.cuda.mem_get_info(device)[0]
    pinned = train.runner.spec.preallocated_bytes()[1]
    return (f"DALI: {built} pipelines built before training, {reserved / 2**30:.2f} GiB of device memory "
            f"reserved; pinned host memory for the decoder's buffers: {pinned / 2**30:.2f} GiB "
            f"({HOST_BUFFERS_PER_THREAD} x {HOST_MEMORY_PADDING / 2**20:.0f} MiB per thread, training pipeline only)")

