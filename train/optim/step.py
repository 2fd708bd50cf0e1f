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

    A fused optimizer (SGD/Adam/AdamW on CUDA) under fp16 skips an overflowed step inside
    its kernel, with no read-back, and Accelerate then reports every step as taken. The
    skip is counted here on the device instead (the loss scale falls exactly when a step is
    skipped); ``take_skipped_steps`` reads the count, once per log interval, so that the
    loop can put the lr schedule back by as many steps.
    """

    def __init__(self, model: torch.nn.Module, optimizer, criterion, accelerator: Accelerator, grad_clip_norm: float):
        self.model = model
        self.optimizer = optimizer
        self.criterion = criterion
        self.accelerator = accelerator
        self.grad_clip_norm = grad_clip_norm
        self.params = [p for p in model.parameters() if p.requires_grad]
        scaler = accelerator.scaler
        self.inner_optimizer = getattr(optimizer, "optimizer", optimizer)  # the torch one inside Accelerate's
        self.counts_skips_on_device = bool(scaler is not None and scaler.is_enabled()
                                           and getattr(self.inner_optimizer, "_step_supports_amp_scaling", False))
        self.skipped_steps: torch.Tensor | None = None  # skips not yet read back (fused fp16 only)

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
        """Clip (when configured) and step with the gradients in ``.grad``; False if the step
        was skipped. A fused fp16 step always says True: its skip is counted on the device."""
        if self.grad_clip_norm > 0:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.grad_clip_norm)  # unscales first
        if not self.counts_skips_on_device:
            self.optimizer.step()
            return not self.accelerator.optimizer_step_was_skipped
        scaler = self.accelerator.scaler
        if self.grad_clip_norm <= 0:
            # Unscaled in place (one device kernel, as clipping does it) rather than inside the
            # fused step: the gradients left in .grad, which the logged norm reads, are the true ones.
            scaler.unscale_(self.inner_optimizer)
        scale_before = scaler._scale.clone()  # GradScaler's scale tensor, which update() changes in place
        self.optimizer.step()
        skipped = (scaler._scale < scale_before).int()
        self.skipped_steps = skipped if self.skipped_steps is None else self.skipped_steps + skipped
        return True

    def take_skipped_steps(self) -> int:
        """Steps skipped since the last call that ``update`` reported as taken: a host read, made
        only when something is counted on the device (fused fp16), else 0."""
        if self.skipped_steps is None:
            return 0
        count, self.skipped_steps = int(self.skipped_steps.item()), None
        return count

    def on_micro_batches(self, micro_batches: MicroBatches) -> tuple[torch.Tensor, bool]:
        """One optimizer step on the batch made of ``micro_batches``.

        Returns (the batch's mean loss, whether the weights were updated).
        """
        loss = self.backward(micro_batches)
        return loss, self.update()

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """One optimizer step on a batch taken whole (no accumulation)."""
        return self.on_micro_batches([(images, labels)])
