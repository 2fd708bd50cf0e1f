"""Fused optimizers on CUDA (issue 24), the lr schedule under fp16 skips with them, and the
logged gradient norm's multi-tensor kernel.

A fused step under fp16 decides on the device whether to skip (an overflow), and Accelerate
then reports every step as taken; the train step counts the skips on the device and the
loop puts the schedule back when it reads the count (``loop.correct_schedule``). The fused
kernels exist on the CPU too, so the real fused step runs here under a CPU GradScaler, which
stands in for fp16 (Accelerate gives a CPU run none) as in test_sam.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from test_validation import CountHostReads

from train.config import (
    AdamConfig,
    AdamWConfig,
    CosineScheduleConfig,
    SGDConfig,
    SGDSAMConfig,
    SGDScheduleFreeConfig,
)
from train.loop import correct_schedule
from train.optim import build_optimizer, build_schedule, build_train_step
from train.optim.schedules import lr_function
from train.tracking import gradient_norm

FUSED = [SGDConfig(), AdamConfig(), AdamWConfig()]
SCHEDULE = CosineScheduleConfig(warmup_epochs=1.0)  # the lr changes at every step
LR, STEPS_PER_EPOCH, EPOCHS = 0.1, 4, 3


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))


@pytest.mark.parametrize("cfg", FUSED, ids=lambda cfg: cfg.name)
def test_sgd_adam_adamw_are_fused_on_cuda_and_not_elsewhere(cfg):
    assert build_optimizer(model(), cfg, LR, STEPS_PER_EPOCH, "cuda").param_groups[0]["fused"] is True
    assert not build_optimizer(model(), cfg, LR, STEPS_PER_EPOCH, "cpu").param_groups[0]["fused"]


@pytest.mark.parametrize("cfg", [SGDSAMConfig(), SGDScheduleFreeConfig()], ids=lambda cfg: cfg.name)
def test_optimizers_without_a_fused_kernel_here_are_built_as_before(cfg):
    """SAM's base SGD stays unfused (its steps need the exact skip per step); Schedule-Free has none."""
    optimizer = build_optimizer(model(), cfg, LR, STEPS_PER_EPOCH, "cuda")
    assert not optimizer.param_groups[0].get("fused")


def fused_fp16_run(cfg, overflow_at: set[int], steps: int = 6):
    """``steps`` loop steps of a fused optimizer under a loss scaler, the scale pushed to
    overflow at the steps in ``overflow_at``; returns (schedule, train step, weights per step)."""
    accelerator = Accelerator(cpu=True)
    scaler = accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    net = model()
    optimizer = build_optimizer(net, cfg, LR, STEPS_PER_EPOCH, "cuda")  # fused, as on a GPU
    scheduler = build_schedule(optimizer, SCHEDULE, LR, STEPS_PER_EPOCH, EPOCHS)
    net, optimizer = accelerator.prepare(net, optimizer)
    step = build_train_step(cfg, net, optimizer, torch.nn.CrossEntropyLoss(), accelerator, 0.0)
    generator = torch.Generator().manual_seed(1)
    weights = []
    for index in range(steps):
        images, labels = torch.randn(8, 5, generator=generator), torch.randint(0, 3, (8,), generator=generator)
        if index in overflow_at:
            scaler.update(new_scale=3e38)  # a loss above 1.2 overflows when scaled
            images = images * 1e3
        elif index - 1 in overflow_at:
            scaler.update(new_scale=2.0 ** 10)
        _, updated = step(images, labels)
        if updated:  # as train_one_epoch does
            scheduler.step()
        weights.append([p.detach().clone() for p in net.parameters()])
    return scheduler, step, weights


@pytest.mark.parametrize("cfg", FUSED, ids=lambda cfg: cfg.name)
def test_a_skipped_fused_fp16_step_leaves_the_lr_schedule_where_it_was(cfg):
    """An overflow skips the step (weights unchanged) and, once the loop reads the device's
    count, the schedule stands at the steps really taken, with their lr."""
    scheduler, step, weights = fused_fp16_run(cfg, overflow_at={2})
    assert all(torch.equal(a, b) for a, b in zip(weights[1], weights[2]))  # step 3 was skipped
    assert not all(torch.equal(a, b) for a, b in zip(weights[2], weights[3]))
    correct_schedule(SimpleNamespace(scheduler=scheduler, train_step=step))
    assert scheduler.last_epoch == 5
    lr_at = lr_function(SCHEDULE, LR, STEPS_PER_EPOCH, EPOCHS)
    assert [group["lr"] for group in scheduler.optimizer.param_groups] == pytest.approx([lr_at(5)] * 2)
    assert scheduler.get_last_lr() == pytest.approx([lr_at(5)] * 2)
    correct_schedule(SimpleNamespace(scheduler=scheduler, train_step=step))  # read once: nothing more to undo
    assert scheduler.last_epoch == 5


def test_fused_fp16_steps_read_nothing_back_until_the_count_is_asked_for():
    """The skip is counted on the device: as many host reads for 6 steps as for 2."""
    calls = []
    for steps in (2, 6):
        with CountHostReads() as mode:
            fused_fp16_run(AdamWConfig(), overflow_at={1}, steps=steps)
        calls.append(mode.calls)
    assert calls[0] == calls[1]


def test_gradient_norm_is_the_global_l2_norm_by_one_multi_tensor_kernel(monkeypatch):
    """The logged train/grad_norm: all gradients as one vector, computed by torch._foreach_norm."""
    net = model()
    torch.nn.functional.cross_entropy(net(torch.randn(8, 5)), torch.randint(0, 3, (8,))).backward()
    expected = torch.cat([p.grad.flatten() for p in net.parameters()]).norm().item()
    calls = []
    foreach_norm = torch._foreach_norm
    monkeypatch.setattr(torch, "_foreach_norm", lambda *args, **kwargs: calls.append(1) or foreach_norm(*args,
                                                                                                        **kwargs))
    assert gradient_norm(net.parameters()) == pytest.approx(expected, rel=1e-6)
    assert calls == [1]
    assert gradient_norm(torch.nn.Linear(2, 2).parameters()) is None
