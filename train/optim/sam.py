"""Sharpness-Aware Minimization (Foret et al., 2021) around the base SGD optimizer.

SAM steps with the gradient measured at ``w + e`` instead of ``w``, where
``e = rho * g / ||g||`` is the steepest ascent of length ``rho`` (adaptive SAM, Kwon et al.
2021: ``e = rho * w^2 * g / || |w| * g ||``, which scales the step per weight).

- v1, two-step: ``g`` is the gradient at ``w`` on the same batch, so each step takes two
  forward and backward passes.
- v2, single-step: ``g`` is the previous step's gradient, so each step costs one pass (the
  first step, with no previous gradient, is a plain step).

SAM only moves the point where the gradient is taken; the base optimizer (its param groups,
weight decay and lr schedule) steps exactly as it would alone, and ``rho = 0`` is plain SGD.
With gradient accumulation every gradient above is the whole batch's, accumulated over its
micro-batches, and the weights are perturbed once per step.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator

from .batchnorm import batchnorm_layers, running_stats_frozen
from .step import MicroBatches, TrainStep

# Keeps e finite when the gradient is zero (then e is zero too).
NORM_EPSILON = 1e-12
# Where single-step SAM keeps each parameter's previous gradient: in the base optimizer's
# state, so that checkpoints carry it and a resumed run perturbs exactly as it would have.
PREVIOUS_GRAD = "sam_previous_grad"


@torch.no_grad()
def perturbation(weights: list[torch.Tensor], grads: list[torch.Tensor], rho: float,
                 adaptive: bool) -> list[torch.Tensor]:
    """e for each weight: ``rho * g / ||g||``, or ``rho * w^2 * g / || |w| * g ||`` if adaptive.

    The norm is taken over all the tensors together, as one vector. The factor stays a
    tensor: reading it back would make the host wait for the device every step.
    """
    if not adaptive:
        return torch._foreach_mul(grads, rho / _norm_plus_epsilon(grads))
    abs_weights = torch._foreach_abs(weights)
    e = torch._foreach_mul(abs_weights, grads)  # |w| * g
    factor = rho / _norm_plus_epsilon(e)
    torch._foreach_mul_(e, abs_weights)  # w^2 * g
    torch._foreach_mul_(e, factor)
    return e


def _norm_plus_epsilon(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors))) + NORM_EPSILON


def unscale_local_gradients(grads: list[torch.Tensor], accelerator: Accelerator) -> torch.Tensor | None:
    """fp16: divide the gradients by the loss scale in place; returns whether any process found
    inf/NaN, as a boolean tensor on the device (None without a loss scaler: fp32, bf16).

    The check is GradScaler's own (the same kernel it runs in ``unscale_``). The result is
    agreed on by all processes, since these gradients were not all-reduced. It stays on the
    device: reading it here would make the host wait for the first pass before it can start
    the second, which leaves the GPU idle in every step.
    """
    scaler = accelerator.scaler
    if scaler is None or not scaler.is_enabled() or not grads:
        return None
    device = grads[0].device
    found_inf = torch.zeros(1, dtype=torch.float32, device=device)
    # _scale is GradScaler's scale tensor on the device (get_scale() would read it back).
    inv_scale = scaler._scale.double().reciprocal().float()
    torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)
    return accelerator.reduce(found_inf, "sum")[0] > 0


def mark_step_to_skip(grads: list[torch.Tensor], overflow: torch.Tensor) -> None:
    """After an overflow in the first pass, make the second pass's gradients non-finite (on the
    device): GradScaler then skips the step and backs off the scale, as for any overflow."""
    grads[0].view(-1)[:1].add_(torch.where(overflow, float("inf"), 0.0).to(grads[0].dtype))


class _SAMStep(TrainStep):
    """A train step that can move the weights to ``w + e`` and back to exactly ``w``."""

    def __init__(self, model, optimizer, criterion, accelerator: Accelerator, grad_clip_norm: float,
                 rho: float, adaptive: bool):
        super().__init__(model, optimizer, criterion, accelerator, grad_clip_norm)
        self.rho, self.adaptive = rho, adaptive
        # w is restored by copying, not by subtracting e, so that it comes back bit for bit.
        self.saved_weights = [torch.empty_like(p) for p in self.params]

    @torch.no_grad()
    def perturb(self, weights: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        e = perturbation(weights, grads, self.rho, self.adaptive)
        torch._foreach_copy_(self.saved_weights, self.params)
        torch._foreach_add_(weights, e)

    @torch.no_grad()
    def restore(self) -> None:
        torch._foreach_copy_(self.params, self.saved_weights)


class TwoStepSAM(_SAMStep):
    """SAM v1: gradient at w, ascend to w + e, gradient there, back to w, base step.

    The first pass runs under ``no_sync``: each process perturbs along its own batch's
    gradient (the paper's m-sharpness, with m the per-process batch) and only the second
    gradient is all-reduced, so the step costs one all-reduce as plain SGD does. The second
    pass leaves the BatchNorm running statistics alone: they describe the batch at w once.
    The reported loss is the first pass's, the loss at w. With accumulation both passes run
    over all the micro-batches: the first accumulates this process's gradient without any
    all-reduce, the second all-reduces once, after its last micro-batch.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batchnorm_layers = batchnorm_layers(self.model)

    def on_micro_batches(self, micro_batches: MicroBatches) -> tuple[torch.Tensor, bool]:
        loss = self.backward(micro_batches, synchronize=False)
        weights = [p for p in self.params if p.grad is not None]
        grads = [p.grad for p in weights]
        overflow = unscale_local_gradients(grads, self.accelerator)
        if overflow is not None:
            # fp16 overflow on any process: e = 0 (the second pass runs at w) and the step is
            # skipped, all decided on the device.
            for grad in grads:
                grad.masked_fill_(overflow, 0.0)
        self.perturb(weights, grads)
        with running_stats_frozen(self.batchnorm_layers):
            self.backward(micro_batches)
        self.restore()
        if overflow is not None:
            mark_step_to_skip([p.grad for p in self.params if p.grad is not None], overflow)
        return loss, self.update()


class SingleStepSAM(_SAMStep):
    """SAM v2: one pass per step, at w + e(previous step's gradient); back to w, base step.

    The gradient kept for the next step is the one the base optimizer used: all-reduced,
    unscaled (fp16) and clipped. The weights therefore move identically on every process.
    A skipped (fp16 overflow) step keeps the gradient from before. The reported loss is the
    loss at the perturbed weights, the only one computed. With accumulation the previous
    step's gradient is the previous global batch's, and all micro-batches share one perturbation.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        ddp = getattr(self.model, "_orig_mod", self.model)  # inside torch.compile's wrapper, if any
        self.grads_in_buckets = bool(getattr(ddp, "gradient_as_bucket_view", False))

    def on_micro_batches(self, micro_batches: MicroBatches) -> tuple[torch.Tensor, bool]:
        state = self.optimizer.state
        weights = [p for p in self.params if PREVIOUS_GRAD in state[p]]
        if weights:
            self.perturb(weights, [state[p][PREVIOUS_GRAD] for p in weights])
        loss = self.backward(micro_batches)
        if weights:
            self.restore()
        updated = self.update()
        if updated:
            self.remember_gradients()
        return loss, updated

    def remember_gradients(self) -> None:
        # A reference, not a copy: it is read when the next step perturbs, before that
        # step's backward pass writes gradients (into new tensors, after zero_grad). Under
        # DDP with gradient_as_bucket_view the next backward writes into the same buckets,
        # which a skipped (fp16) step must not overwrite the kept gradient with: a copy then.
        state = self.optimizer.state
        for p in self.params:
            if p.grad is not None:
                state[p][PREVIOUS_GRAD] = p.grad.clone() if self.grads_in_buckets else p.grad
