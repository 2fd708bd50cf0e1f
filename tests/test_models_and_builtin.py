"""Model factory and the built-in data set generator."""

import hashlib

import pytest
import torch

from train.config import UserError
from train.data.builtin import CLASS_NAMES, SPLIT_SIZES, ensure_builtin_dataset, render_image
from train.data.folder import scan_image_folder
from train.models import build_model, resolve_arch


def test_seed_alias_and_timm_names():
    assert resolve_arch("vit_base_16") == "vit_base_patch16_224"
    assert resolve_arch("vgg16_bn") == "vgg16_bn"


def test_unknown_arch_suggests_close_names():
    with pytest.raises(UserError, match="unknown model 'resnet-50'.*'resnet50'"):
        resolve_arch("resnet-50")


def test_model_has_the_data_sets_classes():
    model = build_model("resnet18", num_classes=7, train_crop_size=32, val_crop_size=32)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 7)


def test_fixed_size_models_accept_train_and_val_crops_that_differ():
    model = build_model("vit_tiny_patch16_224", num_classes=3, train_crop_size=64, val_crop_size=96).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 64)).shape == model(torch.zeros(1, 3, 96, 96)).shape == (1, 3)


def test_generated_images_are_deterministic_and_differ_between_seeds():
    def digest(image):
        return hashlib.sha256(image.tobytes()).hexdigest()

    assert digest(render_image(3, 11)) == digest(render_image(3, 11))
    assert digest(render_image(3, 11)) != digest(render_image(3, 12))


def test_builtin_data_set_is_an_imagenet_layout_folder_made_once(tmp_path):
    root = ensure_builtin_dataset("shapes", cache_root=tmp_path)
    train, val = scan_image_folder(root, len(CLASS_NAMES))
    assert len(train) == SPLIT_SIZES["train"] * len(CLASS_NAMES)
    assert len(val) == SPLIT_SIZES["val"] * len(CLASS_NAMES)
    assert train.class_names == tuple(sorted(CLASS_NAMES))
    stamp = (root / "COMPLETE").stat().st_mtime_ns
    assert ensure_builtin_dataset("shapes", cache_root=tmp_path) == root
    assert (root / "COMPLETE").stat().st_mtime_ns == stamp  # reused, not regenerated
    assert [p.name for p in tmp_path.iterdir()] == [root.name]  # no staging folder left behind


def test_unknown_builtin_name():
    with pytest.raises(UserError, match="unknown built-in data set 'builtin:digits'"):
        ensure_builtin_dataset("digits")
