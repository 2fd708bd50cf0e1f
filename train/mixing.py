"""MixUp and CutMix (``[mixup]``): timm's ``Mixup`` on each micro-batch, timm's soft-target loss.

Off unless an alpha is above 0; then each micro-batch the train step receives is mixed within
itself (image i with image n-1-i, timm's pairing) before its forward pass, its labels become
soft targets (``train.label_smoothing`` smoothed into them by ``Mixup``), and the training
loss is ``SoftTargetCrossEntropy``. Mixing happens before the step, so SAM's two passes see
the same mixed images, and each micro-batch of an accumulated step is mixed on its own.
Validation keeps the plain labels and the label-smoothed cross-entropy.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy

from .config import MixupConfig, TrainConfig
from .errors import UserError
from .optim.step import MicroBatches, TrainStep


def mixing_on(cfg: MixupConfig) -> bool:
    return cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0


def training_criterion(train: TrainConfig) -> torch.nn.Module:
    """The training loss: soft-target cross-entropy on mixed batches, else the label-smoothed one."""
    if mixing_on(train.mixup):
        return SoftTargetCrossEntropy()
    return torch.nn.CrossEntropyLoss(label_smoothing=train.label_smoothing)


class BatchMixer:
    """(images, class indices) -> (mixed images, soft targets), a fresh draw per call."""

    def __init__(self, cfg: MixupConfig, label_smoothing: float, num_classes: int):
        self.mixup = Mixup(mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha, prob=cfg.prob,
                           switch_prob=cfg.switch_prob, mode=cfg.mode, label_smoothing=label_smoothing,
                           num_classes=num_classes)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if len(images) % 2:  # timm pairs image i with image n-1-i
            raise UserError(f"train.mixup: a micro-batch of {len(images)} images cannot be mixed in pairs; choose "
                            "train.batch_size and train.micro_batch_size that give an even micro-batch")
        return self.mixup(images, labels)


class MixingStep:
    """The optimizer's train step, each micro-batch mixed first: callers see a train step as before."""

    def __init__(self, step: TrainStep, mix: Callable[[torch.Tensor, torch.Tensor], tuple]):
        self.step = step
        self.mix = mix

    def on_micro_batches(self, micro_batches: MicroBatches) -> tuple[torch.Tensor, bool]:
        return self.step.on_micro_batches([self.mix(images, labels) for images, labels in micro_batches])

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, bool]:
        return self.on_micro_batches([(images, labels)])

    def take_skipped_steps(self) -> int:
        """The wrapped step's count of skipped fp16 steps (the loop puts the lr schedule back by it)."""
        return self.step.take_skipped_steps()


def with_mixing(step: TrainStep, train: TrainConfig, num_classes: int) -> TrainStep | MixingStep:
    """``step`` as it is when mixing is off; else wrapped so that it mixes each micro-batch."""
    if not mixing_on(train.mixup):
        return step
    return MixingStep(step, BatchMixer(train.mixup, train.label_smoothing, num_classes))
