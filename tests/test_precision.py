"""Mixed precision: which precision a run chooses, and fp16's loss scaling through the real loop.

Accelerate gives a CPU run no GradScaler (it has no fp16 there), so the fp16 runs below hand
the run's Accelerator a real CPU GradScaler as it is created: the loss is then scaled in the
backward pass, the optimizer step unscales, skips steps whose gradients overflowed and
updates the scale, and checkpoints save and load the scaler, by the same code paths as fp16
on a GPU.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import checkpointing_configs, without_timing

from train import startup
from train.checkpoint import SCHEDULE_STATE
from train.cli import main
from train.config import load_config_text
from train.optim.schedules import lr_function
from train.rundir import read_metrics
from train.startup import choose_mixed_precision

A100, A40, H100, V100, T4 = (8, 0), (8, 6), (9, 0), (7, 0), (7, 5)


@pytest.mark.parametrize("use_amp, launcher, cuda, capability, expected", [
    (False, None, True, A100, "no"),  # use_amp = false is fp32 whatever else is said
    (False, "bf16", True, A100, "no"),
    (True, "fp16", True, A100, None),  # the launcher's choice: Accelerate applies it
    (True, "bf16", True, V100, None),
    (True, "no", True, H100, None),
    (True, None, False, None, "no"),  # no GPU: CPU autocast is slower than fp32 for these models
    (True, None, True, V100, "fp16"),  # no bf16 units before Ampere
    (True, None, True, T4, "fp16"),
    (True, None, True, A100, "bf16"),
    (True, None, True, A40, "bf16"),
    (True, None, True, H100, "bf16"),
])
def test_mixed_precision_follows_the_config_the_launcher_and_the_gpu(use_amp, launcher, cuda, capability, expected):
    assert choose_mixed_precision(use_amp, launcher, cuda, capability) == expected


# ------------------------------------------------------------------------------ fp16 steps

# The largest float32: any loss above 1 (the tiny runs start near ln 3) overflows when scaled,
# so the first step is skipped. Each overflow halves the scale, and a scale only grows after
# 2,000 steps without one, so the number of steps skipped is log2(start / end).
OVERFLOWING_SCALE = torch.finfo(torch.float32).max


def give_runs_a_cpu_grad_scaler(patch: pytest.MonkeyPatch, init_scale: float) -> None:
    real = startup.make_accelerator

    def make_accelerator(train, options):
        accelerator = real(train, options)
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)  # before prepare() and load_state()
        return accelerator

    patch.setattr(startup, "make_accelerator", make_accelerator)


@pytest.fixture(scope="module")
def fp16_run(tiny_folder, tmp_path_factory) -> tuple[Path, list[str]]:
    """2 epochs of 3 steps with a cosine schedule; checkpoints at steps 3 and 6. Returns the run
    directory and the config arguments."""
    tmp = tmp_path_factory.mktemp("fp16")
    args = checkpointing_configs(tmp, tiny_folder, max_epochs=2) + ["--set", "train.log.checkpoint_every_steps=3"]
    with pytest.MonkeyPatch.context() as patch:
        give_runs_a_cpu_grad_scaler(patch, OVERFLOWING_SCALE)
        assert main(args + ["--output-dir", str(tmp / "run")]) == 0
    return tmp / "run", args


def scaler_state(run: Path, step: int) -> dict:
    return torch.load(run / "checkpoints" / f"{step:08d}" / "scaler.pt")


def schedule_steps(run: Path, step: int) -> int:
    return json.loads((run / "checkpoints" / f"{step:08d}" / SCHEDULE_STATE).read_text())["last_epoch"]


def test_the_lr_schedule_does_not_advance_on_a_skipped_fp16_step(fp16_run):
    run, _ = fp16_run
    skipped = {step: round(math.log2(OVERFLOWING_SCALE / scaler_state(run, step)["scale"])) for step in (3, 6)}
    assert 1 <= skipped[6] < 6, skipped  # some steps skipped, some taken: otherwise this proves nothing
    for step in (3, 6):
        assert schedule_steps(run, step) == step - skipped[step]
    # The lr the run reports is the schedule's after as many updates as were made.
    config = load_config_text((run / "config.toml").read_text(), "config.toml")
    lr_at = lr_function(config.train.lr_scheduler, config.train.lr, 3, config.train.max_epochs)
    records = read_metrics(run / "metrics.jsonl")
    assert [r["lr"] for r in records] == pytest.approx([lr_at(3 - skipped[3]), lr_at(6 - skipped[6])])


def test_the_grad_scaler_state_survives_a_checkpoint(fp16_run, tmp_path, monkeypatch):
    """Resumed at step 3 by a run whose new scaler starts elsewhere, it continues with the saved
    scale and growth count, and ends as the uninterrupted run did."""
    run, args = fp16_run
    give_runs_a_cpu_grad_scaler(monkeypatch, 2.0 ** 8)
    resumed = tmp_path / "resumed"
    assert main(args + ["--output-dir", str(resumed), "--resume", str(run / "checkpoints" / "00000003")]) == 0
    assert scaler_state(resumed, 6) == scaler_state(run, 6)
    assert without_timing(read_metrics(resumed / "metrics.jsonl")) == \
        without_timing(read_metrics(run / "metrics.jsonl"))
