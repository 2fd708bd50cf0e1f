"""Run by test_optim_distributed.py under ``accelerate launch`` with 2 processes:

    optim_worker.py OUT [TRAINER ARGS...]

Each process writes ``OUT/rank<r>.pt`` with what it saw, for the test to check against a
reference computed from both processes' data:

- two-step SAM on a DDP-wrapped linear model, each process with its own batch: the
  gradient the perturbation was computed from, and the gradient the base step used;
- BatchNorm statistics recomputed over each process's own batches;
- an evaluation on both processes of a BatchNorm model whose statistics differ between them;
- the checkpoint policy's decision when the processes' clocks disagree.

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

from train import preemption  # noqa: E402
from train.config import SGDSAMConfig  # noqa: E402
from train.optim import build_optimizer, build_train_step  # noqa: E402
from train.optim.batchnorm import recompute_running_stats  # noqa: E402
from train.validation import evaluate  # noqa: E402

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


def evaluation_net() -> torch.nn.Module:
    """A small classifier with BatchNorm, the same on every process."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))


def batchnorm_evaluation(accelerator: Accelerator) -> dict:
    """Each process takes running statistics from a batch of its own, then evaluates its own
    share of a validation set (5 + 5 images here, 4 + 4 there)."""
    net = evaluation_net()
    rank = accelerator.process_index
    generator = torch.Generator().manual_seed(200 + rank)
    with torch.no_grad():
        net.train()(torch.randn(6, 3, 8, 8, generator=generator) * (1 + rank) + rank)
    state_before = {name: value.clone() for name, value in net.state_dict().items()}
    batches = [(torch.randn(n, 3, 8, 8, generator=generator), torch.randint(0, 3, (n,), generator=generator))
               for n in ((5, 5) if rank == 0 else (4, 4))]
    result = evaluate(net, batches, accelerator, 0.0, 3, channels_last=False)
    return {"state_before": state_before, "buffers_before": {n: b.clone() for n, b in state_before.items()
                                                             if "running" in n},
            "buffers_after": {name: value.clone() for name, value in net.state_dict().items() if "running" in name},
            "batches": batches, "result": result}


def checkpoint_policy(accelerator: Accelerator) -> dict:
    """checkpoint_every_minutes = 1 with each process's clock set by hand: who decides?"""
    cases = {"main's time is up": {0}, "only process 1's time is up": {1}, "nobody's time is up": set()}
    real_time, decisions, now = preemption.time, {}, [0.0]
    preemption.time = type("Clock", (), {"monotonic": staticmethod(lambda: now[0])})
    try:
        for case, late in cases.items():
            now[0] = 0.0
            policy = preemption.CheckpointPolicy(preemption.StopRequests(), every_steps=0, every_minutes=1,
                                                 max_interval=10, is_main_process=accelerator.is_main_process,
                                                 device=accelerator.device)
            now[0] = 61.0 if accelerator.process_index in late else 30.0
            decisions[case] = policy.after_step(1).name
    finally:
        preemption.time = real_time
    return decisions


def main() -> None:
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2
    result = {"sam": two_step_sam(accelerator), "batchnorm": batchnorm_statistics(accelerator),
              "evaluation": batchnorm_evaluation(accelerator), "policy": checkpoint_policy(accelerator)}
    save_then_train(accelerator, result, sys.argv)


if __name__ == "__main__":
    main()
