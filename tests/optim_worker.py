"""Run by test_optim_distributed.py under ``accelerate launch`` with 2 processes:

    optim_worker.py OUT [TRAINER ARGS...]

Each process writes ``OUT/rank<r>.pt`` with what it saw, for the test to check against a
reference computed from both processes' data:

- two-step SAM on a DDP-wrapped linear model, each process with its own batch: the
  gradient the perturbation was computed from, and the gradient the base step used;
- BatchNorm statistics recomputed over each process's own batches.

Then, with TRAINER ARGS, it trains as ``python -m train TRAINER ARGS`` would, in the same
two processes (one launch instead of two keeps the test suite fast).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from helpers import save_then_train  # noqa: E402
from optim_reference import linear_model, tiny_problem  # noqa: E402

from train.config import SGDSAMConfig  # noqa: E402
from train.optim import build_optimizer, build_train_step  # noqa: E402
from train.optim.batchnorm import recompute_running_stats  # noqa: E402

SAM = SGDSAMConfig(momentum=0.9, weight_decay=0.01, rho=0.3, adaptive=False, v2=False)
LR = 0.1


def two_step_sam(accelerator: Accelerator) -> dict:
    weight, bias, _ = tiny_problem(seed=0)
    _, _, (batch,) = tiny_problem(seed=10 + accelerator.process_index, steps=1)  # this process's data
    model = linear_model(weight, bias)
    optimizer = build_optimizer(model, SAM, LR, steps_per_epoch=1)
    model, optimizer = accelerator.prepare(model, optimizer)
    assert isinstance(model, torch.nn.parallel.DistributedDataParallel)
    step = build_train_step(SAM, model, optimizer, torch.nn.MSELoss(), accelerator, grad_clip_norm=0.0)

    seen = {}
    perturb = step.perturb

    def record_first_gradient(weights, grads):
        seen["first_grads"] = [g.clone() for g in grads]
        perturb(weights, grads)

    step.perturb = record_first_gradient
    _, updated = step(*batch)
    net = accelerator.unwrap_model(model)
    return {"batch": batch, "updated": updated, "first_grads": seen["first_grads"],
            "second_grads": [net.weight.grad.clone(), net.bias.grad.clone()],
            "weights_after": [net.weight.detach().clone(), net.bias.detach().clone()]}


def batchnorm_statistics(accelerator: Accelerator) -> dict:
    torch.manual_seed(0)  # the same model on both processes
    net = torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    generator = torch.Generator().manual_seed(100 + accelerator.process_index)
    batches = [torch.randn(5, 3, 6, 6, generator=generator) * (1 + accelerator.process_index) for _ in range(2)]
    before = net[0].running_mean.clone()
    used = recompute_running_stats(net, batches, lambda buffer: accelerator.reduce(buffer, "mean"),
                                   accelerator.autocast)
    return {"batches": batches, "used": used, "before": before,
            "buffers": {name: b.clone() for name, b in net.named_buffers()}}


def main() -> None:
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2
    result = {"sam": two_step_sam(accelerator), "batchnorm": batchnorm_statistics(accelerator)}
    save_then_train(accelerator, result, sys.argv)


if __name__ == "__main__":
    main()
