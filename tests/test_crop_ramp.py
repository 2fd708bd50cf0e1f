"""Training crops that change size over the epochs ([preprocess] train_crop_size as a table): the
sizes of each epoch, config errors, both loaders' batches, the size in the log and metrics.jsonl,
exact resumption across a size change (HF and DALI), and the largest size for "auto" and the preflight."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from accelerate import Accelerator
from helpers import (
    assert_mid_epoch,
    assert_rerun_reproduces,
    checkpointing_configs,
    kill_after_checkpoint,
    launched_run,
    tiny_train_toml,
    write,
)
from test_tracking import scalars

from train import micro_batch
from train.config import ConfigError, CropRamp, DataConfig, DataloaderConfig, PreprocessConfig, load_config_text
from train.data import build_loaders
from train.preflight import miniature
from train.rundir import read_metrics

# 3 epochs of the tiny run: 32 px in epoch 1, 48 px in epochs 2 and 3.
RAMP = "{start = 32, end = 48, start_epoch = 1, end_epoch = 2, step = 16}"
SIZES = [32, 48, 48]


def test_the_size_of_each_epoch_follows_the_ramp():
    """At or before start_epoch the start size, from end_epoch on the end size, in between a linear
    ramp rounded to the nearest multiple of step; epochs count from 1 in the config, 0 in the loop."""
    ffcv_16 = CropRamp(start=160, end=192, start_epoch=12, end_epoch=14, step=32)  # FFCV's 16 epochs, 1-based
    assert [ffcv_16.size_at(e) for e in range(16)] == [160] * 12 + [192] * 4  # 176 rounds to 192, half to even
    fine = CropRamp(start=128, end=192, start_epoch=2, end_epoch=6, step=16)
    assert [fine.size_at(e) for e in range(8)] == [128, 128, 144, 160, 176, 192, 192, 192]
    down = CropRamp(start=192, end=128, start_epoch=1, end_epoch=3, step=32)
    assert [down.size_at(e) for e in range(4)] == [192, 160, 128, 128]


CONFIG = '[data]\ndata_dir = "d"\n[train]\n[train.preprocess]\n'


@pytest.mark.parametrize("value, message", [
    ("{start = 160, end = 200, end_epoch = 3}", "train.preprocess.train_crop_size.end (200) is not a multiple of "
                                                 "step (32)"),
    ("{start_epoch = 4, end_epoch = 2}", "train.preprocess.train_crop_size.end_epoch (2) is before start_epoch (4)"),
    ("{start = 0}", "train.preprocess.train_crop_size.start must be > 0, got 0"),
    ("{strat = 160}", "unknown key 'train.preprocess.train_crop_size.strat'"),
    ('"big"', "train.preprocess.train_crop_size must be an integer or a table, got 'big'"),
])
def test_a_bad_ramp_is_a_one_line_error_naming_the_key(value, message):
    with pytest.raises(ConfigError) as error:
        load_config_text(CONFIG + f"train_crop_size = {value}\n", "t.toml")
    assert message in str(error.value) and str(error.value).startswith("t.toml: ")
    assert "\n" not in str(error.value)


def test_a_plain_integer_is_still_a_fixed_size():
    config = load_config_text(CONFIG + "train_crop_size = 96\n", "t.toml")
    assert config.train.preprocess.train_crop_size == 96


@pytest.mark.parametrize("loader", ["hf", "dali"])
def test_both_loaders_crop_each_epoch_at_its_size(loader, tiny_folder):
    """The training batches of each epoch have that epoch's side; the statistics stream (BatchNorm
    recalibration before evaluations) has the ramp's last."""
    ramp = CropRamp(start=32, end=48, start_epoch=2, end_epoch=3, step=16)
    preprocess = PreprocessConfig(train_crop_size=ramp, val_image_size=36, val_crop_size=32)
    data = DataConfig(data_dir=str(tiny_folder), num_classes=3, dataloader=DataloaderConfig(name=loader,
                                                                                            num_data_workers=1))
    loaders = build_loaders(data, preprocess, 8, 1, 0, seed=3)
    seen = []
    for epoch in range(4):
        loaders.set_epoch(epoch, 0)
        seen.append({tuple(images.shape[-2:]) for images, _ in loaders.train})
    assert seen == [{(side, side)} for side in (32, 32, 48, 48)]  # epochs 1-4 of this ramp
    images, _ = next(iter(loaders.train_stats()))
    assert images.shape[-2:] == (48, 48)


@pytest.fixture(scope="module")
def ramp_runs(tiny_folder, tmp_path_factory):
    """By loader: the config arguments of a tiny 3-epoch run on the ramp (checkpoints every 2 steps),
    and that run, uninterrupted (made on first use)."""
    made = {}

    def make(loader: str):
        if loader not in made:
            tmp = tmp_path_factory.mktemp(f"ramp_{loader}")
            train = tiny_train_toml(max_epochs=3, lr=0.02).replace("train_crop_size = 32", f"train_crop_size = {RAMP}")
            args = checkpointing_configs(tmp, tiny_folder, loader, every_steps=2)
            write(tmp / "train.toml", train + "checkpoint_every_steps = 2\n")
            made[loader] = args, launched_run(args, tmp / "reference")
        return made[loader]
    return make


@pytest.mark.parametrize("loader, killed_at", [("hf", 2), ("dali", 2), ("dali", 4)])
def test_killed_mid_epoch_then_rerun_gives_the_same_metrics_across_a_size_change(loader, killed_at, ramp_runs,
                                                                                  tmp_path):
    """Checkpoint 2 is inside epoch 1 (32 px): the rerun resumes there and grows the crops at epoch
    2. Checkpoint 4 is inside epoch 2 (48 px): the rerun resumes at 48 px at the same position.
    Either way the metrics are the uninterrupted run's, and each record names its epoch's size."""
    args, reference = ramp_runs(loader)
    records = read_metrics(reference.dir / "metrics.jsonl")
    assert [r["train_crop_size"] for r in records] == SIZES
    assert "epoch 2/3: training crops of 48 px" in reference.stdout
    assert [value for _, value in scalars(reference.dir)["train/crop_size"]] == SIZES
    out = tmp_path / "out"
    newest = kill_after_checkpoint(args, out, step=killed_at)
    assert_mid_epoch(newest)
    assert_rerun_reproduces(args, out, newest, reference.dir)


def test_auto_micro_batch_tries_the_largest_crop(monkeypatch):
    """The "auto" search's trial step runs on images of the ramp's largest side."""
    shapes = []
    real = micro_batch.to_device
    monkeypatch.setattr(micro_batch, "to_device", lambda images, *args: shapes.append(images.shape) or
                        real(images, *args))
    ramp = CropRamp(start=64, end=32, start_epoch=1, end_epoch=2, step=32)  # shrinking: the largest comes first
    config = load_config_text(CONFIG.replace('[train]\n', '[train]\narch = "resnet18"\n'), "t.toml")
    train = dataclasses.replace(config.train, preprocess=dataclasses.replace(config.train.preprocess,
                                                                             train_crop_size=ramp))
    micro_batch.trial_step(train, 3, Accelerator(cpu=True), 2)
    assert shapes == [torch.Size([2, 3, 64, 64])]


def test_the_preflight_trains_at_the_largest_crop():
    config = load_config_text(CONFIG + "train_crop_size = {start = 160, end = 224, end_epoch = 5}\n", "t.toml")
    assert miniature(config).train.preprocess.train_crop_size == 224


def test_a_fixed_size_adds_nothing_to_the_metrics(reference_run):
    """The seed's configs (a plain integer) record what they recorded before: no crop size field."""
    assert all("train_crop_size" not in record for record in read_metrics(reference_run / "metrics.jsonl"))


def test_the_model_card_describes_the_ramp(ramp_runs):
    _, reference = ramp_runs("hf")
    card = (reference.dir / "model" / "README.md").read_text()
    assert "training crops 32 -> 48 px over epochs 1-2 (multiples of 16)" in card
