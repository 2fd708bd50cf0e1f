"""Test-time horizontal flip (``train.eval_hflip``, ``python -m train.evaluate --hflip``): the
logits evaluated are the mean of those of each image and of its mirror image."""

from __future__ import annotations

import timm
import torch
from accelerate import Accelerator
from helpers import data_toml, write

from train.config import DataConfig, DataloaderConfig, PreprocessConfig, load_config_text, to_dict
from train.data import build_loaders
from train.validation import evaluate, predict


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet18", num_classes=3).eval()


def test_flip_averaged_logits_are_the_mean_of_both_passes():
    """predict(hflip=True) is (net(x) + net(mirror of x)) / 2, computed here pass by pass; the model
    is not mirror-symmetric, so either pass alone differs from it."""
    net = small_model()
    images = torch.randn(4, 3, 32, 32)
    mirrored = torch.stack([image[:, :, torch.arange(31, -1, -1)] for image in images])  # column j <- 31 - j
    with torch.no_grad():
        by_hand = (net(images) + net(mirrored)) / 2
        averaged = predict(net, images, hflip=True)
        plain = predict(net, images, hflip=False)
        assert torch.allclose(averaged, by_hand, atol=1e-6)
        assert torch.equal(plain, net(images))
        assert not torch.allclose(averaged, plain, atol=1e-4)
        # In NHWC memory the flip is along the same (width) axis.
        channels_last = predict(net.to(memory_format=torch.channels_last),
                                images.to(memory_format=torch.channels_last), hflip=True)
        assert torch.allclose(channels_last, by_hand, atol=1e-5)


def hand_metrics(net: torch.nn.Module, loader, label_smoothing: float) -> dict:
    """Loss and top-1 over ``loader`` from the mean of the two passes' logits."""
    loss = hits = count = 0
    with torch.no_grad():
        for images, labels in loader:
            logits = (net(images) + net(images.flip(3))) / 2
            loss += torch.nn.functional.cross_entropy(logits, labels, label_smoothing=label_smoothing,
                                                      reduction="sum").item()
            hits += (logits.argmax(1) == labels).sum().item()
            count += len(labels)
    return {"val_loss": loss / count, "val_acc1": 100 * hits / count, "val_samples": count}


def tiny_loaders(folder):
    data = DataConfig(data_dir=str(folder), num_classes=3, dataloader=DataloaderConfig(name="hf", num_data_workers=0))
    preprocess = PreprocessConfig(train_crop_size=32, val_image_size=36, val_crop_size=32)
    return build_loaders(data, preprocess, 8, 1, 0, seed=0)


def test_evaluation_with_hflip_scores_the_averaged_logits(tiny_folder):
    """evaluate(hflip=True) over the validation set: loss and top-1 are those of the averaged logits."""
    net = small_model()
    loaders = tiny_loaders(tiny_folder)
    result = evaluate(net, loaders.val, Accelerator(cpu=True), 0.1, 3, channels_last=False, hflip=True)
    expected = hand_metrics(net, loaders.val, 0.1)
    assert result["val_samples"] == expected["val_samples"] == 15
    assert abs(result["val_loss"] - expected["val_loss"]) < 1e-5
    assert result["val_acc1"] == expected["val_acc1"]
    plain = evaluate(net, loaders.val, Accelerator(cpu=True), 0.1, 3, channels_last=False)
    assert abs(plain["val_loss"] - expected["val_loss"]) > 1e-4


def test_eval_hflip_is_off_by_default_and_read_from_the_train_file():
    """The seed's configs evaluate one pass per image; ``eval_hflip = true`` turns the flip on."""
    assert load_config_text("[data]\ndata_dir = 'x'\n[train]\n", "t.toml").train.eval_hflip is False
    config = load_config_text("[data]\ndata_dir = 'x'\n[train]\neval_hflip = true\n", "t.toml")
    assert config.train.eval_hflip is True and to_dict(config)["train"]["eval_hflip"] is True


def test_evaluate_command_flag_uses_the_averaged_logits(tiny_folder, tmp_path, capsys):
    """``python -m train.evaluate MODEL --hflip`` prints the loss of the averaged logits."""
    from train.evaluate import main as evaluate_main
    from train.export import write_model_folder
    net = small_model()
    config = load_config_text(f"[data]\ndata_dir = '{tiny_folder}'\nnum_classes = 3\n[train]\narch = 'resnet18'\n"
                              "[train.preprocess]\ntrain_crop_size = 32\nval_image_size = 36\nval_crop_size = 32\n",
                              "t.toml")
    model_dir = write_model_folder(tmp_path / "model", net, config, ("a", "b", "c"), [], "test")
    data = write(tmp_path / "data.toml", data_toml(tiny_folder))
    assert evaluate_main([str(model_dir), "--data-cfg", str(data), "--batch-size", "8", "--hflip"]) == 0
    expected = hand_metrics(net, tiny_loaders(tiny_folder).val, 0.0)
    out = capsys.readouterr().out
    assert f"loss {expected['val_loss']:.4f}" in out and f"top-1 {expected['val_acc1']:.2f}%" in out, out
