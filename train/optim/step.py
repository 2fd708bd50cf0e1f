"""What one training step does with a batch: forward, backward, optimizer step.

The loop calls ``step(images, labels)`` and steps the lr schedule when the optimizer really
moved. Which step object runs is the optimizer registry's choice (``optim.build_train_step``):
this plain one, or SAM's (``sam.py``), which need more than one gradient or a perturbation.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator


class TrainStep:
    """One forward and backward pass and one optimizer step, through Accelerate.

    ``model`` and ``optimizer`` are the prepared ones: Accelerate's backward scales the loss
    for fp16, its optimizer unscales, skips steps with inf/NaN gradients and updates the scale.
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

    def backward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Fresh gradients of the loss on this batch at the current weights; returns the loss."""
        loss = self.loss(images, labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        return loss.detach()

    def update(self) -> bool:
        """Clip (when configured) and step with the gradients in ``.grad``; False if the step was skipped."""
        if self.grad_clip_norm > 0:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.grad_clip_norm)
        self.optimizer.step()
        return not self.accelerator.optimizer_step_was_skipped

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Returns (the batch's loss, whether the weights were updated)."""
        loss = self.backward(images, labels)
        return loss, self.update()
