"""Which weights a run evaluates, checkpoints and exports: the optimizer's evaluation hook.

Most optimizers evaluate the weights they train, and ``TrainedWeights`` does nothing.
An optimizer that evaluates other weights (Schedule-Free's average, ``schedule_free.py``)
gives its registry entry a subclass; the loop calls the hook at these three moments and
never asks which optimizer it runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

LOG = logging.getLogger("train")


class TrainedWeights:
    """The weights in the parameters are the ones to evaluate, save and export."""

    # Whether before_evaluation reads training batches (to recompute BatchNorm statistics):
    # the loaders then prepare that stream before training starts.
    reads_training_batches = False

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer  # as prepared by Accelerate

    def before_evaluation(self, recompute_batchnorm: Callable[[], int], statistics_asked: bool) -> int:
        """Put the weights to evaluate (and export) in the model; they stay until ``before_training``.

        ``recompute_batchnorm()`` resets the BatchNorm running statistics and recomputes them
        over training batches for the weights now in the model, the same on every process;
        it returns the number of samples used (0 for a model without BatchNorm).
        ``statistics_asked``: the run asks for recomputed statistics at this evaluation (the
        last one, with ``train.recompute_bn_before_final_eval``); weights that were never
        trained on directly recompute them anyway. Returns the samples used, 0 when not recomputed.
        """
        samples = recompute_batchnorm() if statistics_asked else 0
        if samples:
            LOG.info(f"BatchNorm statistics recomputed over {samples} training samples")
        return samples

    def before_training(self) -> None:
        """Put the weights to train in the model (at the start of each epoch's training)."""

    @contextmanager
    def while_saving(self) -> Iterator[None]:
        """Inside, the parameters hold the weights a checkpoint should store."""
        yield
