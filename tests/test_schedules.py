"""Learning-rate schedules: values at chosen steps, stepped per iteration."""

import math

import pytest
import torch
from helpers import data_toml, tiny_train_toml, write

from train.config import (
    ConfigError,
    ConstantScheduleConfig,
    CosineScheduleConfig,
    TriangularScheduleConfig,
    load_config,
)
from train.optim.schedules import build_schedule, cosine_with_warmup, lr_function


def test_cosine_warmup_starts_at_decay_fraction_and_reaches_peak():
    lr_at = cosine_with_warmup(peak_lr=1.0, warmup_steps=10, total_steps=110, warmup_decay=0.01, eta_min=1e-5)
    assert lr_at(0) == pytest.approx(0.01)
    assert lr_at(5) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_at(10) == pytest.approx(1.0)
    # Half-way through the cosine part: the mean of peak and floor.
    assert lr_at(60) == pytest.approx(1e-5 + (1.0 - 1e-5) * 0.5)
    assert lr_at(35) == pytest.approx(1e-5 + (1.0 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert lr_at(110) == pytest.approx(1e-5)
    assert lr_at(200) == pytest.approx(1e-5)


def test_seed_recipe_in_epochs():
    # 5 warm-up epochs of 100 steps, 90 epochs in all.
    cfg = CosineScheduleConfig(warmup_epochs=5, warmup_decay=0.01, eta_min=1e-5)
    lr_at = lr_function(cfg, peak_lr=1.0, steps_per_epoch=100, max_epochs=90)
    assert lr_at(0) == pytest.approx(0.01)
    assert lr_at(250) == pytest.approx(0.505)
    assert lr_at(500) == pytest.approx(1.0)
    assert lr_at(9000) == pytest.approx(1e-5)


def test_no_warmup():
    lr_at = cosine_with_warmup(peak_lr=0.5, warmup_steps=0, total_steps=100, warmup_decay=0.01, eta_min=0.0)
    assert lr_at(0) == pytest.approx(0.5)
    assert lr_at(50) == pytest.approx(0.25)


def test_constant():
    lr_at = lr_function(ConstantScheduleConfig(), peak_lr=0.3, steps_per_epoch=10, max_epochs=5)
    assert [lr_at(s) for s in (0, 7, 49)] == [0.3, 0.3, 0.3]


def test_scheduler_object_follows_the_function_per_step():
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2, 2))]
    optimizer = torch.optim.SGD([{"params": params[:1], "weight_decay": 0.0}, {"params": params[1:]}], lr=123.0)
    cfg = CosineScheduleConfig(warmup_epochs=1, warmup_decay=0.1, eta_min=0.0)
    scheduler = build_schedule(optimizer, cfg, peak_lr=2.0, steps_per_epoch=4, max_epochs=3)
    lr_at = lr_function(cfg, 2.0, 4, 3)
    seen = []
    for _ in range(12):
        seen.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    assert seen == [[pytest.approx(lr_at(s))] * 2 for s in range(12)]
    assert seen[0][0] == pytest.approx(0.2) and seen[4][0] == pytest.approx(2.0)


def test_triangular_ramps_up_to_the_peak_epoch_then_down_to_end_lr():
    """FFCV's triangle: linear from lr * start_factor at step 0 to lr at peak_epoch, then linear
    to end_lr at the end of training (steps_per_epoch * max_epochs), per step, not per epoch."""
    cfg = TriangularScheduleConfig(peak_epoch=2, start_factor=0.1, end_lr=0.2)
    lr_at = lr_function(cfg, peak_lr=1.7, steps_per_epoch=10, max_epochs=12)  # peak at step 20, end at 120
    assert lr_at(0) == pytest.approx(0.17)
    assert lr_at(5) == pytest.approx(0.17 + (1.7 - 0.17) * 5 / 20)
    assert lr_at(19) == pytest.approx(0.17 + (1.7 - 0.17) * 19 / 20)
    assert lr_at(20) == pytest.approx(1.7)
    assert lr_at(70) == pytest.approx((1.7 + 0.2) / 2)
    assert lr_at(119) == pytest.approx(0.2 + (1.7 - 0.2) / 100)
    assert lr_at(120) == pytest.approx(0.2)
    assert lr_at(130) == pytest.approx(0.2)


def test_triangular_defaults_and_a_fractional_peak():
    """Defaults (start 1e-4 of the peak, end at 0) and a peak epoch that is not whole (round to a step)."""
    lr_at = lr_function(TriangularScheduleConfig(peak_epoch=0.5), peak_lr=2.0, steps_per_epoch=8, max_epochs=3)
    assert lr_at(0) == pytest.approx(2e-4)
    assert lr_at(4) == pytest.approx(2.0)
    assert lr_at(14) == pytest.approx(1.0)
    assert lr_at(24) == 0.0


def test_triangular_peak_at_step_zero_starts_at_the_peak():
    """peak_epoch = 0: no ramp up, the first step uses train.lr."""
    lr_at = lr_function(TriangularScheduleConfig(peak_epoch=0, end_lr=0.0), peak_lr=1.0, steps_per_epoch=5,
                        max_epochs=2)
    assert [lr_at(s) for s in (0, 5, 10)] == [pytest.approx(1.0), pytest.approx(0.5), pytest.approx(0.0)]


def test_triangular_is_chosen_by_name_and_its_peak_must_precede_the_end(tmp_path):
    """``name = "triangular"`` reads its own keys; a peak at or after max_epochs is one line naming both keys."""
    data = write(tmp_path / "data.toml", data_toml("/some/folder"))
    train = write(tmp_path / "train.toml", tiny_train_toml(max_epochs=4))
    triangular = ["train.lr_scheduler={name = 'triangular', peak_epoch = 1.5, end_lr = 0.01}"]
    schedule = load_config(data, train, triangular).train.lr_scheduler
    assert schedule == TriangularScheduleConfig(peak_epoch=1.5, start_factor=1e-4, end_lr=0.01)
    expected = r"train.lr_scheduler.peak_epoch \(4\.0\) must be below train.max_epochs \(4\)"
    with pytest.raises(ConfigError, match=expected):
        load_config(data, train, [*triangular, "train.lr_scheduler.peak_epoch=4"])
