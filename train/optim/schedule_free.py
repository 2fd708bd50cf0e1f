"""Schedule-Free SGD and AdamW (Defazio et al., 2024, "The Road Less Scheduled").

These optimizers keep two sequences: the model trains at y, and evaluates at x, a weighted
average of past iterates. ``optimizer.train()`` puts y in the parameters and
``optimizer.eval()`` puts x there; which one the parameters hold is recorded in the
optimizer's state, so a checkpoint written in eval mode resumes correctly after ``train()``.
Warm-up happens inside the optimizer (``warmup_steps``), so the run's lr schedule is constant.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import schedulefree
import torch

from ..config import AdamWScheduleFreeConfig, SGDScheduleFreeConfig
from ..errors import UserError
from .weights import TrainedWeights

LOG = logging.getLogger("train")


def warmup_steps(warmup_epochs: float, steps_per_epoch: int) -> int:
    return round(warmup_epochs * steps_per_epoch)


def check_config(cfg: SGDScheduleFreeConfig | AdamWScheduleFreeConfig, source: str) -> None:
    """Values the package rejects or divides by: x = y + (1/beta - 1)(y - z) needs beta > 0."""
    beta_key, beta = ("momentum", cfg.momentum) if isinstance(cfg, SGDScheduleFreeConfig) else ("beta1", cfg.beta1)
    if beta <= 0:
        raise UserError(f"{source}: train.optim.{beta_key} must be > 0 for {cfg.name!r} (it interpolates "
                        f"between the averaged and the trained weights), got {beta}")


def sgd_schedule_free(param_groups: list[dict], cfg: SGDScheduleFreeConfig, lr: float,
                      steps_per_epoch: int) -> torch.optim.Optimizer:
    return schedulefree.SGDScheduleFree(param_groups, lr=lr, momentum=cfg.momentum,
                                        warmup_steps=warmup_steps(cfg.warmup_epochs, steps_per_epoch),
                                        r=cfg.r, weight_lr_power=cfg.weight_lr_power)


def adamw_schedule_free(param_groups: list[dict], cfg: AdamWScheduleFreeConfig, lr: float,
                        steps_per_epoch: int) -> torch.optim.Optimizer:
    return schedulefree.AdamWScheduleFree(param_groups, lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.epsilon,
                                          warmup_steps=warmup_steps(cfg.warmup_epochs, steps_per_epoch),
                                          r=cfg.r, weight_lr_power=cfg.weight_lr_power)


class AveragedWeights(TrainedWeights):
    """Evaluate, save and export x, the average; train y.

    BatchNorm running statistics gathered while training describe y, so they are recomputed
    for x before each evaluation (after the swap: recomputing them first would describe y).
    Checkpoints are written in eval mode, as the schedulefree package asks; the optimizer's
    state records the mode, so ``before_training`` puts a resumed run right.
    """

    reads_training_batches = True

    def before_evaluation(self, recompute_batchnorm: Callable[[], int], statistics_asked: bool) -> int:
        self.optimizer.eval()
        samples = recompute_batchnorm()  # asked for or not: the statistics gathered in training describe y
        if samples:
            LOG.info(f"BatchNorm statistics recomputed for the averaged weights over {samples} training samples")
        return samples

    def before_training(self) -> None:
        self.optimizer.train()

    @contextmanager
    def while_saving(self) -> Iterator[None]:
        was_training = self.optimizer.param_groups[0].get("train_mode", False)  # schedulefree's own flag
        self.optimizer.eval()
        try:
            yield
        finally:
            if was_training:
                self.optimizer.train()
