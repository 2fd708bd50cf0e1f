"""The shipped Schedule-Free and SAM configs: valid as written, and they train on the built-in data."""

from __future__ import annotations

import dataclasses

import pytest
from helpers import REPO

from train.cli import BUILTIN_DATA, main
from train.config import load_config
from train.optim import check_supported
from train.rundir import read_metrics

SCHEDULE_FREE = ["resnet50-sf-sgd", "resnet50-sf-adamw"]
SAM = ["resnet50-sgd-sam-v1", "resnet50-sgd-sam-v2", "resnet18-sgd-sam-v1", "resnet18-sgd-sam-v2"]
# A few steps on the built-in data set (2,000 images): 4 steps of 500 images at 8 px, one
# batch for the BatchNorm statistics. Everything about the optimizer stays as shipped.
SMALL = ["train.batch_size=500", "train.max_epochs=1", "train.preprocess.train_crop_size=8",
         "train.preprocess.val_image_size=8", "train.preprocess.val_crop_size=8", "train.num_samples_for_stats=500",
         "train.use_amp=false"]


def shipped(name: str):
    path = REPO / "configs" / "train" / f"{name}.toml"
    config = load_config(REPO / "configs/data/imagenet.toml", path, num_processes=8)
    check_supported(config.train.optim, str(path))
    return config.train


@pytest.mark.parametrize("name", SCHEDULE_FREE + SAM)
def test_shipped_config_is_valid_and_supported(name):
    train = shipped(name)
    assert (train.batch_size, train.max_epochs, train.label_smoothing, train.preprocess.train_crop_size) == (
        1024, 90, 0.1, 176)
    assert (train.preprocess.val_image_size, train.preprocess.val_crop_size) == (224, 224)
    assert train.lr_scheduler.name == ("constant" if name in SCHEDULE_FREE else "cosine")


def test_resnet50_sam_configs_differ_from_the_resnet18_ones_only_in_the_model():
    """Which is why only the ResNet-18 ones are trained below (the seed trained ResNet-18 SAM v2 in fp32)."""
    for version in ("v1", "v2"):
        small, large = shipped(f"resnet18-sgd-sam-{version}"), shipped(f"resnet50-sgd-sam-{version}")
        assert dataclasses.replace(large, arch="resnet18", use_amp=small.use_amp) == small


# lr after the 4 steps: Schedule-Free warms up over 5 epochs of 4 steps inside the optimizer
# (10 * 4/20, 0.0025 * 4/20); SAM's base SGD follows the cosine warm-up from 1% of 1.0.
@pytest.mark.parametrize("name, lr", [("resnet50-sf-sgd", 2.0), ("resnet50-sf-adamw", 0.0005),
                                      ("resnet18-sgd-sam-v1", 0.01 + 0.99 * 4 / 20),
                                      ("resnet18-sgd-sam-v2", 0.01 + 0.99 * 4 / 20)])
def test_shipped_config_trains_on_the_builtin_data(name, lr, tmp_path, capsys):
    args = ["--data-cfg", str(BUILTIN_DATA), "--train-cfg", str(REPO / "configs" / "train" / f"{name}.toml"),
            "--output-dir", str(tmp_path / "run")]
    for override in SMALL:
        args += ["--set", override]
    assert main(args) == 0, capsys.readouterr().err
    (record,) = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert record["step"] == 4 and record["val_samples"] == 500
    assert record["lr"] == pytest.approx(lr)
