"""The micro-batch each process trains on: ``train.micro_batch_size``, searched for when "auto".

The global ``batch_size`` is the recipe. Each process takes its share of it (``batch_size /
processes``) as one or more micro-batches, whose gradients the train step accumulates before
its one optimizer step (``optim/step.py``): how the batch is split changes the memory a step
needs, not the step (BatchNorm aside, which normalises each micro-batch by its own statistics).

"auto" on a GPU tries micro-batch sizes before training: a forward and backward pass and an
optimizer step on random images at the train crop size, with the run's precision, memory
format and compile setting, on a model and optimizer of its own. It takes the largest divisor
of the per-process batch whose peak memory stays within 90% of the GPU's; the other 10% is
for what the trial leaves out (DDP's gradient buckets, SAM's copy of the weights, the input
micro-batches of a step, the loader's buffers, evaluation). Every process searches on its
own GPU and all take the smallest of their choices. On the CPU "auto" is the whole
per-process batch: accumulation saves memory, and CPU memory is rarely what limits a step.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from .config import TrainConfig, divisors, largest_crop
from .data.device import to_device
from .errors import UserError
from .models import build_model
from .optim import build_optimizer, evaluation_weights

LOG = logging.getLogger("train")

HEADROOM = 0.10  # share of the GPU's memory a trial step must leave free
GIB = 2**30

# One trial step on a micro-batch of the given size: its peak memory in bytes, or
# torch.OutOfMemoryError when it does not fit.
PeakBytes = Callable[[int], int]


def largest_that_fits(per_process_batch: int, peak_bytes_of: PeakBytes, capacity: int,
                      headroom: float = HEADROOM) -> tuple[int, dict[int, int | None]]:
    """The largest divisor of ``per_process_batch`` whose trial step peaks within
    ``(1 - headroom) * capacity`` bytes (0 when not even 1 does), and the trials: size -> peak
    bytes, None for out of memory.

    The whole per-process batch is tried first (no accumulation, the common case), then the
    divisors are bisected: a size that fits means every smaller one fits too.
    """
    candidates = divisors(per_process_batch)
    limit = (1 - headroom) * capacity
    trials: dict[int, int | None] = {}

    def fits(index: int) -> bool:
        size = candidates[index]
        try:
            trials[size] = peak_bytes_of(size)
        except torch.OutOfMemoryError:
            trials[size] = None  # leaving the except block frees what the failed trial held
        return trials[size] is not None and trials[size] <= limit

    if fits(len(candidates) - 1):
        return per_process_batch, trials
    fitting, failing = -1, len(candidates) - 1  # indices known to fit (-1: none yet) and not to
    while failing - fitting > 1:
        middle = (fitting + failing) // 2
        if fits(middle):
            fitting = middle
        else:
            failing = middle
    return (candidates[fitting] if fitting >= 0 else 0), trials


def smallest_over_processes(accelerator: Accelerator, value: int) -> int:
    return int(accelerator.gather(torch.tensor([value], device=accelerator.device)).min())


def describe_trials(trials: dict[int, int | None]) -> str:
    return ", ".join(f"{size}: {'out of memory' if peak is None else f'{peak / GIB:.1f} GiB'}"
                     for size, peak in trials.items())


def search_micro_batch(accelerator: Accelerator, batch_size: int, peak_bytes_of: PeakBytes, capacity: int) -> int:
    """The micro-batch every process trains on: the smallest of the processes' largest that fits."""
    per_process = batch_size // accelerator.num_processes
    own, trials = largest_that_fits(per_process, peak_bytes_of, capacity)
    chosen = smallest_over_processes(accelerator, own)
    if chosen == 0:
        raise UserError(f"train.micro_batch_size = \"auto\": not even a micro-batch of 1 fits in "
                        f"{(1 - HEADROOM) * capacity / GIB:.1f} GiB of GPU memory (90% of {capacity / GIB:.1f} GiB; "
                        f"tried {describe_trials(trials)}); use a smaller model, crop size or mixed precision")
    peak = trials.get(chosen)
    at_chosen = f"peak {peak / GIB:.1f} GiB" if peak is not None else f"this process could take {own}"
    LOG.info(f"train.micro_batch_size = \"auto\": {chosen} per process, {per_process // chosen} micro-batch(es) "
             f"per optimizer step at global batch {batch_size} ({at_chosen} of {capacity / GIB:.1f} GiB; "
             f"tried {describe_trials(trials)})")
    return chosen


def gpu_peak_bytes(train: TrainConfig, num_classes: int, accelerator: Accelerator) -> PeakBytes:
    """A trial step on this process's GPU, measured by PyTorch's caching allocator."""
    device = accelerator.device

    def peak_bytes_of(size: int) -> int:
        gc.collect()  # what an earlier trial (or its out-of-memory error) held
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        trial_step(train, num_classes, accelerator, size)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_reserved(device)
        gc.collect()
        torch.cuda.empty_cache()
        return peak

    return peak_bytes_of


def trial_step(train: TrainConfig, num_classes: int, accelerator: Accelerator, size: int) -> None:
    """Forward, backward and optimizer step on ``size`` random images, on a model of its own."""
    crop = largest_crop(train.preprocess.train_crop_size)  # a ramp's largest crops need the most memory
    model = build_model(train.arch, num_classes, train.preprocess.train_crop_size,
                        train.preprocess.val_crop_size).to(accelerator.device)
    if train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, train.optim, train.lr, steps_per_epoch=1)
    evaluation_weights(train.optim, optimizer).before_training()  # Schedule-Free steps in training mode only
    forward = torch.compile(model) if train.compile else model
    images, labels = to_device(torch.randn(size, 3, crop, crop), torch.randint(0, num_classes, (size,)),
                               accelerator.device, train.channels_last)
    with accelerator.autocast():
        loss = F.cross_entropy(forward(images).float(), labels)
    loss.backward()
    optimizer.step()


def choose_micro_batch(train: TrainConfig, num_classes: int, accelerator: Accelerator) -> int:
    """This run's micro-batch per process, as configured (0: the whole per-process batch)."""
    per_process = train.batch_size // accelerator.num_processes
    if train.micro_batch_size != "auto":
        return train.micro_batch_size or per_process
    if accelerator.device.type != "cuda":
        LOG.info(f"train.micro_batch_size = \"auto\" on the CPU: the whole per-process batch ({per_process}), "
                 "no gradient accumulation")
        return per_process
    capacity = torch.cuda.get_device_properties(accelerator.device).total_memory
    # The trials draw random numbers; the run's seeded model and data must not notice.
    with torch.random.fork_rng(devices=[accelerator.device]):
        return search_micro_batch(accelerator, train.batch_size, gpu_peak_bytes(train, num_classes, accelerator),
                                  capacity)
