"""The shipped Schedule-Free and SAM configs train on the built-in data."""

from __future__ import annotations

import dataclasses

import pytest
from helpers import REPO

from train.cli import BUILTIN_DATA, main
from train.rundir import read_metrics

# A few steps on the built-in data set (2,000 images): 4 steps of 500 images at 8 px, one
# batch for the BatchNorm statistics. Everything about the optimizer stays as shipped.
SMALL = ["train.batch_size=500", "train.max_epochs=1", "train.preprocess.train_crop_size=8",
         "train.preprocess.val_image_size=8", "train.preprocess.val_crop_size=8", "train.num_samples_for_stats=500",
         "train.use_amp=false"]


def test_resnet50_sam_configs_differ_from_the_resnet18_ones_only_in_the_model(shipped_configs):
    """Which is why only the ResNet-18 ones are trained below (the seed trained ResNet-18 SAM v2 in
    fp32; the files are checked in test_config.py and test_seed_recipes.py)."""
    for version in ("v1", "v2"):
        small = shipped_configs[f"resnet18-sgd-sam-{version}"].train
        large = shipped_configs[f"resnet50-sgd-sam-{version}"].train
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
