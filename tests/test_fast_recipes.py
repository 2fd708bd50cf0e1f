"""The fast ResNet-50 recipes (configs/train/resnet50-fast-*ep.toml) train what FFCV's files say.

FFCV's values are written out here as its ResNet-50 YAML files give them, and its per-epoch crop
side and per-iteration learning rate are computed here the way its train_imagenet.py computes
them (np.interp, rounding to a multiple of 32); the shipped files must give the same numbers
through this project's own code (CropRamp, the triangular schedule).
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import REPO

from train.config import crop_size_at, load_config
from train.optim.schedules import lr_function

# epochs -> (start_ramp, end_ramp) of rn50_configs/rn50_<epochs>_epochs.yaml; the rest is shared.
FFCV_RAMPS = {16: (11, 13), 24: (17, 20), 32: (23, 27), 40: (29, 34), 88: (65, 76)}
FFCV_SHARED = {"lr": 1.7, "lr_peak_epoch": 2, "min_res": 160, "max_res": 192, "batch_size_per_gpu": 512,
               "world_size": 8, "momentum": 0.9, "weight_decay": 1e-4, "label_smoothing": 0.1,
               "val_resolution": 256}


def ffcv_resolution(epoch: int, start_ramp: int, end_ramp: int) -> int:
    low, high = FFCV_SHARED["min_res"], FFCV_SHARED["max_res"]
    if epoch <= start_ramp:
        return low
    if epoch >= end_ramp:
        return high
    return int(np.round(np.interp([epoch], [start_ramp, end_ramp], [low, high])[0] / 32)) * 32


def ffcv_lrs(epochs: int, iters: int) -> np.ndarray:
    """The lr of every iteration: per epoch, np.interp between the epoch's and the next one's value."""
    lr, peak = FFCV_SHARED["lr"], FFCV_SHARED["lr_peak_epoch"]
    at = lambda epoch: np.interp([epoch], [0, peak, epochs], [1e-4 * lr, lr, 0])[0]  # noqa: E731
    return np.concatenate([np.interp(np.arange(iters), [0, iters], [at(e), at(e + 1)]) for e in range(epochs)])


def recipe(epochs: int):
    path = REPO / f"configs/train/resnet50-fast-{epochs}ep.toml"
    return load_config(REPO / "configs/data/imagenet.toml", path, num_processes=8).train


def test_the_family_is_the_five_files_the_docs_list():
    shipped = sorted(p.name for p in (REPO / "configs/train").glob("resnet50-fast-*ep.toml"))
    assert shipped == sorted(f"resnet50-fast-{e}ep.toml" for e in FFCV_RAMPS)
    page = (REPO / "docs/faster-training.md").read_text()
    assert all(f"configs/train/{name}" in page for name in shipped)


@pytest.mark.parametrize("epochs", sorted(FFCV_RAMPS))
def test_each_epoch_trains_at_ffcvs_crop_side(epochs):
    train = recipe(epochs)
    assert train.max_epochs == epochs
    ours = [crop_size_at(train.preprocess.train_crop_size, epoch) for epoch in range(epochs)]
    assert ours == [ffcv_resolution(epoch, *FFCV_RAMPS[epochs]) for epoch in range(epochs)]


@pytest.mark.parametrize("epochs", sorted(FFCV_RAMPS))
def test_each_step_has_ffcvs_learning_rate_and_the_rest_is_ffcvs_too(epochs):
    train = recipe(epochs)
    iters = 1_281_167 // train.batch_size  # ImageNet's training set at FFCV's global batch, last one dropped
    lr_at = lr_function(train.lr_scheduler, peak_lr=train.lr, steps_per_epoch=iters, max_epochs=epochs)
    ours = np.array([lr_at(step) for step in range(epochs * iters)])
    np.testing.assert_allclose(ours, ffcv_lrs(epochs, iters), rtol=1e-9, atol=1e-12)
    assert train.batch_size == FFCV_SHARED["batch_size_per_gpu"] * FFCV_SHARED["world_size"]
    assert (train.optim.name, train.optim.momentum, train.optim.weight_decay) == (
        "sgd", FFCV_SHARED["momentum"], FFCV_SHARED["weight_decay"])
    assert train.label_smoothing == FFCV_SHARED["label_smoothing"]
    assert train.preprocess.val_crop_size == FFCV_SHARED["val_resolution"] and train.eval_hflip
    # FFCV's centre crop is 224/256 of the shorter side, resized to 256: the side is first resized to 256 / (224/256).
    assert train.preprocess.val_image_size == int(256 / (224 / 256))
    assert train.arch == "resnetblur50" and train.model == {"zero_init_last": False}
