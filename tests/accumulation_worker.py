"""Gradient accumulation, step by step, as the trainer's step objects do it.

``trained_weights`` trains a small model without BatchNorm for a few optimizer steps of a
global batch of 64, each process's share taken whole or as micro-batches; the test module
imports it for one process. Run under ``accelerate launch`` with 2 processes,

    accumulation_worker.py OUT [TRAINER ARGS...]

each process writes ``OUT/rank<r>.pt``: for every optimizer, the weights after 2 x 32 and
after 2 x 2 x 16, and how many gradient all-reduces DDP ran; then the micro-batch both
processes agree on when their GPUs (stand-ins here) allow different ones. With TRAINER ARGS
it then trains as ``python -m train TRAINER ARGS`` would, in the same two processes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from helpers import save_then_train  # noqa: E402

from train.config import (  # noqa: E402
                          AdamWConfig,
                          AdamWScheduleFreeConfig,
                          SGDConfig,
                          SGDSAMConfig,
                          SGDScheduleFreeConfig,
)
from train.micro_batch import search_micro_batch  # noqa: E402
from train.optim import build_optimizer, build_train_step, evaluation_weights  # noqa: E402

GLOBAL_BATCH, STEPS, FEATURES, CLASSES = 64, 4, 12, 5
OPTIMIZERS = {
    "sgd": SGDConfig(momentum=0.9, weight_decay=1e-3),
    "adamw": AdamWConfig(weight_decay=0.05),
    "sgd-schedule-free": SGDScheduleFreeConfig(warmup_epochs=1, momentum=0.9, weight_decay=1e-3),
    "adamw-schedule-free": AdamWScheduleFreeConfig(warmup_epochs=1, weight_decay=0.05),
    "sam-v1": SGDSAMConfig(momentum=0.9, weight_decay=1e-3, rho=0.2, adaptive=False, v2=False),
    "sam-v2": SGDSAMConfig(momentum=0.9, weight_decay=1e-3, rho=0.5, adaptive=True, v2=True),
}
LR = {"sgd": 0.1, "adamw": 0.01, "sgd-schedule-free": 0.5, "adamw-schedule-free": 0.01, "sam-v1": 0.1, "sam-v2": 0.1}


def global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(GLOBAL_BATCH, FEATURES, generator=g), torch.randint(0, CLASSES, (GLOBAL_BATCH,), generator=g))
            for _ in range(STEPS)]


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)  # the same weights on every process and for every split
    return torch.nn.Sequential(torch.nn.Linear(FEATURES, 32), torch.nn.GELU(), torch.nn.Linear(32, CLASSES))


def trained_weights(accelerator: Accelerator, name: str, micro_batch: int, grad_clip_norm: float = 0.0) -> dict:
    """The evaluated weights after STEPS optimizer steps, each process's share of every global
    batch in micro-batches of ``micro_batch``; also the number of DDP gradient all-reduces."""
    cfg = OPTIMIZERS[name]
    model = mlp()
    optimizer = build_optimizer(model, cfg, LR[name], steps_per_epoch=2)
    model, optimizer = accelerator.prepare(model, optimizer)
    all_reduces = [0]
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        def counting_allreduce(state, bucket):
            all_reduces[0] += 1
            return allreduce_hook(state, bucket)
        model.register_comm_hook(None, counting_allreduce)
    step = build_train_step(cfg, model, optimizer, torch.nn.CrossEntropyLoss(), accelerator, grad_clip_norm)
    weights = evaluation_weights(cfg, optimizer)
    weights.before_training()
    share = GLOBAL_BATCH // accelerator.num_processes
    first = accelerator.process_index * share
    for x, t in global_batches():
        x, t = x[first:first + share], t[first:first + share]
        micro_batches = [(x[i:i + micro_batch], t[i:i + micro_batch]) for i in range(0, share, micro_batch)]
        _, updated = step.on_micro_batches(micro_batches)
        assert updated
    weights.before_evaluation(lambda: 0, statistics_asked=False)  # the model has no BatchNorm
    net = accelerator.unwrap_model(model)
    return {"weights": {k: v.detach().clone() for k, v in net.state_dict().items()}, "all_reduces": all_reduces[0]}


def main() -> None:
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2
    result = {name: {micro: trained_weights(accelerator, name, micro) for micro in (32, 16)} for name in OPTIMIZERS}
    # Stand-ins for two GPUs of different sizes: rank 0's fits 32 per process, rank 1's 8.
    fits_up_to = 32 if accelerator.process_index == 0 else 8

    def peak_bytes_of(size: int) -> int:
        if size > fits_up_to:
            raise torch.OutOfMemoryError("stand-in")
        return size * 2**20

    result["agreed_micro_batch"] = search_micro_batch(accelerator, 64, peak_bytes_of, capacity=2**40)
    save_then_train(accelerator, result, sys.argv)


if __name__ == "__main__":
    main()
