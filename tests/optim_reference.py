"""Reference maths for the optimizer tests: a linear model with a squared loss, by hand.

Everything here is plain tensor algebra written from the papers' equations, independent of
torch.optim, the schedulefree package and the project's steps, so the tests compare the
real code against an independent computation. The model trains in float32; the references
compute in float64 from the same starting values.
"""

from __future__ import annotations

import torch

INPUTS, OUTPUTS, BATCH = 5, 3, 8


def tiny_problem(seed: int = 0, steps: int = 4):
    """Initial (W, b) and `steps` batches (x, t) for y = x W^T + b, in float32."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(OUTPUTS, INPUTS, generator=g) * 0.5
    bias = torch.randn(OUTPUTS, generator=g) * 0.5
    batches = [(torch.randn(BATCH, INPUTS, generator=g), torch.randn(BATCH, OUTPUTS, generator=g))
               for _ in range(steps)]
    return weight, bias, batches


def as_float64(weight, bias, batches):
    return weight.double(), bias.double(), [(x.double(), t.double()) for x, t in batches]


def linear_model(weight: torch.Tensor, bias: torch.Tensor) -> torch.nn.Linear:
    model = torch.nn.Linear(INPUTS, OUTPUTS)
    with torch.no_grad():
        model.weight.copy_(weight)
        model.bias.copy_(bias)
    return model


def gradient(weight, bias, x, t):
    """d/d(W, b) of mean((x W^T + b - t)^2) over all B*O entries (torch.nn.MSELoss)."""
    weight, bias, ((x, t),) = as_float64(weight, bias, [(x, t)])
    residual = x @ weight.T + bias - t
    scale = 2.0 / residual.numel()
    return scale * residual.T @ x, scale * residual.sum(0)


class SGDReference:
    """Heavy-ball SGD as torch documents it; weight decay on the matrix only (our grouping)."""

    def __init__(self, lr: float, momentum: float, weight_decay: float):
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.buffers = None

    def step(self, weight, bias, grad_w, grad_b):
        directions = [grad_w + self.weight_decay * weight, grad_b]
        if self.buffers is None:
            self.buffers = directions
        else:
            self.buffers = [self.momentum * buf + d for buf, d in zip(self.buffers, directions)]
        return weight - self.lr * self.buffers[0], bias - self.lr * self.buffers[1]


def sam_e(weight, bias, grad_w, grad_b, rho: float, adaptive: bool):
    """e = rho g / ||g||, or rho w^2 g / || |w| g || (one norm over W and b together)."""
    if adaptive:
        norm = torch.sqrt(((weight.abs() * grad_w) ** 2).sum() + ((bias.abs() * grad_b) ** 2).sum())
        return rho * weight ** 2 * grad_w / norm, rho * bias ** 2 * grad_b / norm
    norm = torch.sqrt((grad_w ** 2).sum() + (grad_b ** 2).sum())
    return rho * grad_w / norm, rho * grad_b / norm


def sam_v1_trajectory(weight, bias, batches, lr, momentum, weight_decay, rho, adaptive):
    weight, bias, batches = as_float64(weight, bias, batches)
    sgd, path = SGDReference(lr, momentum, weight_decay), []
    for x, t in batches:
        e_w, e_b = sam_e(weight, bias, *gradient(weight, bias, x, t), rho, adaptive)
        weight, bias = sgd.step(weight, bias, *gradient(weight + e_w, bias + e_b, x, t))
        path.append((weight, bias))
    return path


def sam_v2_trajectory(weight, bias, batches, lr, momentum, weight_decay, rho, adaptive):
    weight, bias, batches = as_float64(weight, bias, batches)
    sgd, path, previous = SGDReference(lr, momentum, weight_decay), [], None
    for x, t in batches:
        e_w, e_b = (0.0, 0.0) if previous is None else sam_e(weight, bias, *previous, rho, adaptive)
        grads = gradient(weight + e_w, bias + e_b, x, t)
        weight, bias = sgd.step(weight, bias, *grads)
        previous = grads
        path.append((weight, bias))
    return path


def schedule_free_trajectory(weight, bias, batches, lr, beta1, weight_decay, warmup_steps, r, weight_lr_power,
                             adam_beta2: float | None = None, eps: float = 1e-8):
    """Schedule-Free SGD (adam_beta2 None) or AdamW, in the paper's three sequences.

    y = (1 - beta1) z + beta1 x is where gradients are taken (the trained weights);
    z takes the base optimizer's step; x, the weights to evaluate, averages z with weights
    c_t = w_t / sum(w), w_t = t^r * max_lr_so_far^weight_lr_power; the lr warms up linearly.
    Returns per step: (y, x, scheduled lr), each of y and x as (W, b).
    """
    weight, bias, batches = as_float64(weight, bias, batches)
    x, z = [weight, bias], [weight, bias]
    decay = [weight_decay, 0.0]
    second_moment = [torch.zeros_like(weight), torch.zeros_like(bias)]
    weight_sum, lr_max, path = 0.0, -1.0, []
    for k, (inputs, targets) in enumerate(batches, start=1):
        lr_t = lr * min(1.0, k / warmup_steps) if warmup_steps else lr
        lr_max = max(lr_max, lr_t)
        c = (k ** r) * lr_max ** weight_lr_power
        weight_sum += c
        c /= weight_sum
        y = [(1 - beta1) * zi + beta1 * xi for zi, xi in zip(z, x)]
        grads = gradient(*y, inputs, targets)
        if adam_beta2 is not None:
            second_moment = [adam_beta2 * v + (1 - adam_beta2) * g ** 2 for v, g in zip(second_moment, grads)]
            correction = 1 - adam_beta2 ** k
            grads = [g / ((v / correction).sqrt() + eps) for g, v in zip(grads, second_moment)]
        z = [zi - lr_t * (g + d * yi) for zi, g, d, yi in zip(z, grads, decay, y)]
        x = [(1 - c) * xi + c * zi for xi, zi in zip(x, z)]
        y_next = [(1 - beta1) * zi + beta1 * xi for zi, xi in zip(z, x)]
        path.append((y_next, x, lr_t))
    return path
