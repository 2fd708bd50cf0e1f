"""Batches handed to the training device in the form the model takes.

Both loaders end here. DALI's batches come out of its pipeline finished: on the training
device, normalised, in the model's memory layout and dtype (``dali.py``), so ``to_device``
leaves them as they are. The HF loader's workers hand over uint8 pixels (a quarter of
float32's bytes through shared memory and the copy), pinned by the DataLoader when training
on a GPU; ``DeviceBatches`` copies each batch to the device and normalises it there. On a
GPU it does so one batch ahead, on a side stream, so that the copy overlaps the step in
progress (as timm's ``PrefetchLoader`` and NVIDIA's ``data_prefetcher`` do).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from .transforms import normalize

CPU = torch.device("cpu")


@dataclass(frozen=True)
class BatchFormat:
    """Where and how the model takes its images."""
    device: torch.device = CPU
    channels_last: bool = False  # NHWC memory order (train.channels_last, decided)
    # DALI's images: float16 under fp16 or bf16 autocast on a GPU, where the model's first layer
    # casts its input to the autocast dtype anyway (float16 holds the normalised pixels, which
    # lie within +-3, more finely than bfloat16); float32 otherwise.
    dtype: torch.dtype = torch.float32

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"


CPU_FLOAT32 = BatchFormat()  # the default: float32 NCHW batches on the CPU


def batch_format_for(device: torch.device, channels_last: bool, mixed_precision: str | None) -> BatchFormat:
    """The format for a run on ``device`` with Accelerate's ``mixed_precision`` ("no", "fp16", "bf16")."""
    half = device.type == "cuda" and mixed_precision in ("fp16", "bf16")
    return BatchFormat(device, channels_last, torch.float16 if half else torch.float32)


def to_device(images: torch.Tensor, labels: torch.Tensor, device: torch.device,
              channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch on the training device; 4-D images in NHWC memory order when ``channels_last``.

    uint8 images (N x H x W x 3, the HF loader's) are copied as bytes and normalised on the
    device; float images are moved and laid out only where they are not yet (a batch in the
    right place and layout, as DALI's are, is returned as it is: no copy)."""
    if images.dtype == torch.uint8:
        images = images.to(device, non_blocking=True).permute(0, 3, 1, 2)  # NCHW, with NHWC's strides
        # Laid out while still one byte per value; normalize keeps the layout.
        images = normalize(images.contiguous(memory_format=torch.channels_last if channels_last
                                             else torch.contiguous_format))
    else:
        images = images.to(device, non_blocking=True)
        if images.ndim == 4 and channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True)


class DeviceBatches:
    """``batches`` (host tensors) on the device in the model's format, converted one batch ahead:
    when a batch is handed over, the next one has been taken from ``batches`` and, on a GPU, its
    copy and normalisation are queued on a side stream, where they run while the handed-over
    batch's step computes. The compute stream waits for that stream before it uses a batch.

    Reading one batch ahead is safe for the HF loader, whose position in an epoch is the count of
    batches the loop has taken (``set_epoch``), not what its iterator has read."""

    def __init__(self, batches: Iterable, fmt: BatchFormat):
        self.batches = batches
        self.format = fmt

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        fmt = self.format
        stream = torch.cuda.Stream(fmt.device) if fmt.on_gpu else None
        ready = None
        for images, labels in self.batches:
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                upcoming = to_device(images, labels, fmt.device, fmt.channels_last)
            if ready is not None:
                yield ready
            ready = self._for_compute_stream(upcoming, stream)
        if ready is not None:
            yield ready

    def _for_compute_stream(self, batch: tuple[torch.Tensor, torch.Tensor],
                            stream: torch.cuda.Stream | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Queued after the step handed over last (the caller has queued it by now): the compute
        stream waits for ``batch``'s copy, and the caching allocator keeps ``batch``'s memory, made
        on the side stream, until the compute stream is done with it."""
        if stream is not None:
            compute = torch.cuda.current_stream(self.format.device)
            compute.wait_stream(stream)
            for tensor in batch:
                tensor.record_stream(compute)
        return batch
