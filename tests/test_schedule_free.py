"""Schedule-Free SGD and AdamW against the paper's equations; modes, checkpoints, BatchNorm statistics."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
from accelerate import Accelerator
from optim_reference import linear_model, schedule_free_trajectory, tiny_problem

from train.config import AdamWScheduleFreeConfig, DataConfig, PreprocessConfig, SGDScheduleFreeConfig, UserError
from train.data import build_loaders
from train.optim import build_optimizer, build_train_step, check_supported, evaluation_weights, reported_lr
from train.optim.batchnorm import recompute_running_stats

LR, STEPS_PER_EPOCH = 0.2, 10
SGD_SF = SGDScheduleFreeConfig(momentum=0.8, weight_decay=0.05, warmup_epochs=0.3, r=0.75, weight_lr_power=2.0)
ADAMW_SF = AdamWScheduleFreeConfig(beta1=0.85, beta2=0.95, weight_decay=0.05, warmup_epochs=0.3, r=0.5,
                                   weight_lr_power=1.0)


def prepared(model, cfg):
    accelerator = Accelerator(cpu=True)
    optimizer = build_optimizer(model, cfg, LR, steps_per_epoch=STEPS_PER_EPOCH)  # warm-up: 3 steps
    model, optimizer = accelerator.prepare(model, optimizer)
    step = build_train_step(cfg, model, optimizer, torch.nn.MSELoss(), accelerator, grad_clip_norm=0.0)
    return step, model, optimizer


def reference(cfg, weight, bias, batches):
    if isinstance(cfg, SGDScheduleFreeConfig):
        return schedule_free_trajectory(weight, bias, batches, LR, cfg.momentum, cfg.weight_decay, 3, cfg.r,
                                        cfg.weight_lr_power)
    return schedule_free_trajectory(weight, bias, batches, LR, cfg.beta1, cfg.weight_decay, 3, cfg.r,
                                    cfg.weight_lr_power, adam_beta2=cfg.beta2, eps=cfg.epsilon)


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual.detach().double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cfg", [SGD_SF, ADAMW_SF], ids=["sgd", "adamw"])
def test_schedule_free_trains_at_y_evaluates_at_x_and_reports_the_warmed_up_lr(cfg):
    weight, bias, batches = tiny_problem(steps=5)
    step, model, optimizer = prepared(linear_model(weight, bias), cfg)
    weights = evaluation_weights(cfg, optimizer)
    weights.before_training()
    trajectory = reference(cfg, weight, bias, batches)
    for (x, t), (y_ref, _, lr_ref) in zip(batches, trajectory):
        step(x, t)
        close(model.weight, y_ref[0])
        close(model.bias, y_ref[1])
        assert reported_lr(optimizer) == pytest.approx(lr_ref)
    x_ref = trajectory[-1][1]  # the average after the last step
    with weights.while_saving():
        close(model.weight, x_ref[0])
        close(model.bias, x_ref[1])
    close(model.weight, y_ref[0])  # back to the trained weights


def test_checkpoints_hold_the_evaluation_weights_and_resume_in_training_mode():
    weight, bias, batches = tiny_problem(steps=4)
    step, model, optimizer = prepared(linear_model(weight, bias), SGD_SF)
    weights = evaluation_weights(SGD_SF, optimizer)
    weights.before_training()
    for x, t in batches[:3]:
        step(x, t)
    with weights.while_saving():
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    x_ref = reference(SGD_SF, weight, bias, batches[:3])[-1][1]
    step(*batches[3])

    buffer.seek(0)
    saved = torch.load(buffer)
    close(saved["model"]["weight"], x_ref[0])  # what a checkpoint holds: the averaged weights
    resumed_step, resumed_model, resumed_optimizer = prepared(linear_model(weight * 0, bias * 0), SGD_SF)
    resumed_model.load_state_dict(saved["model"])
    resumed_optimizer.load_state_dict(saved["optimizer"])
    evaluation_weights(SGD_SF, resumed_optimizer).before_training()
    resumed_step(*batches[3])
    assert torch.equal(resumed_model.weight, model.weight) and torch.equal(resumed_model.bias, model.bias)


def test_schedule_free_rejects_values_it_would_divide_by():
    with pytest.raises(UserError, match=r"t.toml: train.optim.momentum must be > 0 for 'sgd-schedule-free'"):
        check_supported(SGDScheduleFreeConfig(momentum=0.0), "t.toml")
    with pytest.raises(UserError, match=r"train.optim.beta1 must be > 0"):
        check_supported(AdamWScheduleFreeConfig(beta1=0.0), "t.toml")


def test_recomputed_statistics_are_the_cumulative_average_of_the_batches():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.Conv2d(3, 2, 3), torch.nn.BatchNorm2d(2)).eval()
    batches = [torch.randn(4, 3, 5, 5) * (i + 1) + i for i in range(3)]
    used = recompute_running_stats(net, iter(batches), lambda b: b, contextlib.nullcontext)
    assert used == 3
    bn = net[0]
    torch.testing.assert_close(bn.running_mean, torch.stack([b.mean(dim=(0, 2, 3)) for b in batches]).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack([b.var(dim=(0, 2, 3)) for b in batches]).mean(0))
    assert bn.num_batches_tracked.item() == 3
    assert bn.momentum == 0.1 and not net.training  # the layer's momentum and the model's mode are as found


def test_the_statistics_stream_leaves_the_training_iterator_where_it_was(tiny_folder):
    """Recomputing statistics mid-epoch (before a checkpoint) must not move the training batches."""
    data = DataConfig(data_dir=str(tiny_folder), num_classes=3)
    data.dataloader.name, data.dataloader.num_data_workers = "hf", 1  # persistent workers: the risky case
    preprocess = PreprocessConfig(train_crop_size=16, val_image_size=16, val_crop_size=16)

    def labels_of_epoch(interrupt: bool) -> list[list[int]]:
        loaders = build_loaders(data, preprocess, 4, 1, 0, seed=5, pin_memory=False)
        loaders.set_epoch(1, 0)
        seen = []
        for i, (_, labels) in enumerate(loaders.train):
            seen.append(labels.tolist())
            if interrupt and i == 1:
                assert sum(1 for _ in loaders.train_stats()) == loaders.steps_per_epoch
        return seen

    assert labels_of_epoch(interrupt=True) == labels_of_epoch(interrupt=False)
