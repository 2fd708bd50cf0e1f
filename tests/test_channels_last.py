"""``train.channels_last``: "auto" (the default) uses NHWC where it helps, CUDA and convolutional
models; true or false forces the choice."""

from __future__ import annotations

import pytest
from helpers import data_toml, tiny_train_toml, write

from train.config import load_config
from train.models import build_model, choose_channels_last, is_convolutional


@pytest.mark.parametrize("arch, convolutional", [("resnet18", True), ("test_convnext", True), ("vgg11", True),
                                                 ("test_vit", False), ("vit_tiny_patch16_224", False)])
def test_convolutional_models_are_told_from_vits(arch, convolutional):
    assert is_convolutional(build_model(arch, 10, 224, 224)) is convolutional


@pytest.mark.parametrize("setting, device, arch, expected", [
    ("auto", "cuda", "resnet18", True),
    ("auto", "cuda", "test_vit", False),
    ("auto", "cpu", "resnet18", False),
    (True, "cpu", "resnet18", True),  # forced
    (True, "cuda", "test_vit", True),
    (False, "cuda", "resnet18", False),
])
def test_auto_applies_on_cuda_to_convolutional_models_and_the_key_forces_it(setting, device, arch, expected):
    assert choose_channels_last(setting, device, build_model(arch, 10, 224, 224)) is expected


def test_the_default_is_auto_and_the_key_takes_true_false_or_auto(tmp_path):
    data = write(tmp_path / "data.toml", data_toml(tmp_path))
    train = write(tmp_path / "train.toml", tiny_train_toml())
    assert load_config(data, train).train.channels_last == "auto"
    for value, expected in (("true", True), ("false", False), ('"auto"', "auto")):
        assert load_config(data, train, [f"train.channels_last={value}"]).train.channels_last == expected


def test_a_cpu_run_decides_against_it_and_says_so(reference_run):
    assert "channels_last false" in (reference_run / "train.log").read_text()
    assert 'channels_last = "auto"' in (reference_run / "config.toml").read_text()  # as the user wrote it
