"""BatchNorm running statistics: recomputed for other weights, or left alone for one pass.

Schedule-Free evaluates weights (an average of past iterates) that were never trained on
directly, so the running statistics gathered during training do not describe them and are
recomputed before each evaluation. Two-step SAM runs a second forward pass at perturbed
weights, which must not count as another batch of statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch.nn.modules.batchnorm import _BatchNorm


def batchnorm_layers(model: torch.nn.Module) -> list[_BatchNorm]:
    """Every BatchNorm layer that keeps running statistics (SyncBatchNorm and timm's included)."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@contextmanager
def running_stats_frozen(layers: list[_BatchNorm]) -> Iterator[None]:
    """Forward passes inside use batch statistics as usual but update no running statistics.

    With ``track_running_stats`` off, a layer in training mode normalises with the batch's
    statistics and is given no buffers to update (nor counts the batch), which leaves the
    buffers bit for bit as they were; setting ``momentum = 0`` instead would still count it.
    """
    for layer in layers:
        layer.track_running_stats = False
    try:
        yield
    finally:
        for layer in layers:
            layer.track_running_stats = True


@torch.no_grad()
def recompute_running_stats(model: torch.nn.Module, image_batches: Iterable[torch.Tensor],
                            average_over_processes: Callable[[torch.Tensor], torch.Tensor],
                            autocast: Callable[[], object]) -> int:
    """Reset the running statistics and recompute them over ``image_batches``; returns the batch count.

    ``model`` is the plain module (not the DDP wrapper: its forward would broadcast buffers
    and expect a backward pass). Each process takes the cumulative average over its own
    batches (``momentum = None``, every batch weighs the same), then the processes' averages
    are averaged, which is the average over all batches since every process sees as many, and
    leaves the same buffers on every process.
    """
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    momenta = [layer.momentum for layer in layers]
    was_training = model.training
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None
    model.train()
    batches = 0
    try:
        for images in image_batches:
            with autocast():
                model(images)
            batches += 1
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        model.train(was_training)
    for layer in layers:
        layer.running_mean.copy_(average_over_processes(layer.running_mean))
        layer.running_var.copy_(average_over_processes(layer.running_var))
    return batches
