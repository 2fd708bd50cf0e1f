"""What one training step does with a batch: forward, backward, optimizer step.

The loop calls ``step.on_micro_batches(micro_batches)`` with this process's share of a global
batch, as one or more micro-batches (gradient accumulation), and steps the lr schedule when
the optimizer really moved; ``step(images, labels)`` is the same for a batch taken whole.
Which step object runs is the optimizer registry's choice (``optim.build_train_step``): this
plain one, or SAM's (``sam.py``), which need more than one gradient or a perturbation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from accelerate import Accelerator

MicroBatches = Sequence[tuple[torch.Tensor, torch.Tensor]]  # (images, labels), equal sizes


class TrainStep:
    """A forward and backward pass per micro-batch and one optimizer step, through Accelerate.

    ``model`` and ``optimizer`` are the prepared ones: Accelerate's backward scales the loss
    for fp16 (by the same factor for every micro-batch: the scale changes only in the
    optimizer step), its optimizer unscales the accumulated gradients, skips steps with
    inf/NaN gradients and updates the scale.
    """

    def __init__(self, model: torch.nn.Module, optimizer, criterion, accelerator: Accelerator, grad_clip_norm: float):
        self.model = model
        self.optimizer = optimizer
        self.criterion = criterion
        self.accelerator = accelerator
        self.grad_clip_norm = grad_clip_norm
        self.params = [p for p in model.parameters() if p.requires_grad]

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.criterion(self.model(images).float(), labels)

    def backward(self, micro_batches: MicroBatches, synchronize: bool = True) -> torch.Tensor:
        """Fresh gradients of the batch's mean loss at the current weights; returns that loss.

        Each micro-batch's mean loss is divided by their number, so the gradients summed in
        ``.grad`` are those of the whole batch's mean loss. Under DDP the processes' gradients
        are averaged once, in the last micro-batch's backward pass (the earlier ones, forward
        included, run under ``no_sync``), or never when ``synchronize`` is false.
        """
        self.optimizer.zero_grad(set_to_none=True)
        count = len(micro_batches)
        total = None
        for index, (images, labels) in enumerate(micro_batches):
            last = synchronize and index == count - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(self.model):
                loss = self.loss(images, labels)
                self.accelerator.backward(loss / count)
            total = loss.detach() if total is None else total + loss.detach()
        return total / count

    def update(self) -> bool:
        """Clip (when configured) and step with the gradients in ``.grad``; False if the step was skipped."""
        if self.grad_clip_norm > 0:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.grad_clip_norm)
        self.optimizer.step()
        return not self.accelerator.optimizer_step_was_skipped

    def on_micro_batches(self, micro_batches: MicroBatches) -> tuple[torch.Tensor, bool]:
        """One optimizer step on the batch made of ``micro_batches``.

        Returns (the batch's mean loss, whether the weights were updated).
        """
        loss = self.backward(micro_batches)
        return loss, self.update()

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """One optimizer step on a batch taken whole (no accumulation)."""
        return self.on_micro_batches([(images, labels)])
