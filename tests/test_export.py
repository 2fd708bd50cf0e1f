"""Exported models: the timm folder at the end of a run, the export command for any checkpoint,
evaluation of an exported model, and the Hub push command (dry run and refusals)."""

from __future__ import annotations

import hashlib
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, clean_env, data_toml, write

from train import checkpoint as ckpt
from train.config import DataConfig, DataloaderConfig
from train.data import build_loaders
from train.rundir import read_metrics


def test_exported_model_loads_through_timm_and_reproduces_the_accuracy(reference_run, tiny_folder, tmp_path):
    import timm
    model_dir = reference_run / "model"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architecture"] == "resnet18" and config["num_classes"] == 3
    assert config["label_names"] == ["n00000000", "n00000001", "n00000002"]
    assert config["pretrained_cfg"]["crop_pct"] == pytest.approx(32 / 36)
    card = (model_dir / "README.md").read_text()
    assert "val_acc1" not in card and "python -m train" in card
    model = timm.create_model(f"local-dir:{model_dir}", pretrained=True)
    assert model.num_classes == 3 and tuple(model.pretrained_cfg["input_size"]) == (3, 32, 32)

    data = write(tmp_path / "data.toml", data_toml(tiny_folder))
    result = subprocess.run([sys.executable, "-m", "train.evaluate", str(model_dir), "--data-cfg", str(data),
                             "--label-smoothing", "0.1", "--batch-size", "8"],
                            cwd=REPO, env=clean_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    last = read_metrics(reference_run / "metrics.jsonl")[-1]
    assert f"top-1 {last['val_acc1']:.2f}%" in result.stdout and f"top-5 {last['val_acc5']:.2f}%" in result.stdout
    assert f"loss {last['val_loss']:.4f}" in result.stdout and "(15 images)" in result.stdout


def test_evaluate_can_recalibrate_batchnorm_first(reference_run, tiny_folder, tmp_path, monkeypatch, capsys):
    """--recalibrate-bn 16: the model is evaluated with statistics recomputed for its weights over
    16 training images (2 batches of 8), checked on the first BatchNorm layer, whose input is
    computed here by hand."""
    import train.evaluate as command
    evaluated_with = {}
    real_evaluate = command.evaluate

    def watch(model, *args, **kwargs):
        evaluated_with.update({name: buffer.clone() for name, buffer in model.named_buffers()})
        return real_evaluate(model, *args, **kwargs)

    monkeypatch.setattr(command, "evaluate", watch)
    data = write(tmp_path / "data.toml", data_toml(tiny_folder))
    assert command.main([str(reference_run / "model"), "--data-cfg", str(data), "--batch-size", "8",
                         "--recalibrate-bn", "16"]) == 0
    out = capsys.readouterr().out
    assert "recomputed over 16 training images" in out and "(15 images)" in out

    model = command.load_model(str(reference_run / "model"))
    data_config = DataConfig(data_dir=str(tiny_folder), num_classes=3,
                             dataloader=DataloaderConfig(name="hf", num_data_workers=0))  # data.toml's
    loaders = build_loaders(data_config, command.preprocess_of(model), 8, 1, 0, seed=0)
    with torch.no_grad():
        first_layer_inputs = [model.conv1(images) for images, _ in itertools.islice(loaders.train_stats(), 2)]
    # Every batch weighs the same: the average of the batches' means and (unbiased) variances.
    mean = torch.stack([x.mean(dim=(0, 2, 3)) for x in first_layer_inputs]).mean(0)
    var = torch.stack([x.var(dim=(0, 2, 3)) for x in first_layer_inputs]).mean(0)
    torch.testing.assert_close(evaluated_with["bn1.running_mean"], mean)
    torch.testing.assert_close(evaluated_with["bn1.running_var"], var)
    assert evaluated_with["bn1.num_batches_tracked"].item() == 2
    assert not torch.allclose(model.bn1.running_mean, mean, rtol=1e-3)  # the exported statistics differ


def test_evaluate_reports_a_missing_model_folder_in_one_line(tmp_path, tiny_folder, capsys):
    from train.evaluate import main as evaluate_main
    data = write(tmp_path / "data.toml", data_toml(tiny_folder))
    missing = tmp_path / "nothing"
    assert evaluate_main([str(missing), "--data-cfg", str(data)]) == 2
    assert capsys.readouterr().err == (f"error: {missing}: not a model folder (no config.json); "
                                       "give RUN/model or hf-hub:<repo id>\n")


def test_export_command_turns_a_checkpoint_into_a_model_folder(reference_run, tmp_path):
    import timm
    first = ckpt.list_checkpoints(reference_run)[-1]
    from train.export import main as export_main
    assert export_main([str(first), "--output", str(tmp_path / "m")]) == 0
    a = timm.create_model(f"local-dir:{tmp_path / 'm'}", pretrained=True).eval()
    b = timm.create_model(f"local-dir:{reference_run / 'model'}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(a(x), b(x))  # the last checkpoint holds the final weights


def digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_push_dry_run_lists_files_without_network(reference_run):
    result = subprocess.run([sys.executable, "-m", "train.hub", str(reference_run / "model"),
                             "--repo-id", "me/resnet18", "--private", "--dry-run"],
                            env=clean_env(HF_HUB_OFFLINE="1"), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "would upload 3 files to private repo me/resnet18" in result.stdout
    assert "model.safetensors" in result.stdout and "config.json" in result.stdout and "README.md" in result.stdout


@pytest.mark.parametrize("env, expected", [
    ({"HF_TOKEN": "hf_not_a_real_token", "HF_HUB_OFFLINE": "1"}, "push to 'me/resnet18' failed"),
    ({"HF_TOKEN": ""}, "no Hugging Face token"),
])
def test_push_without_network_or_token_is_one_line_and_touches_nothing(reference_run, tmp_path, env, expected):
    before = digest(reference_run / "model")
    environment = clean_env(HF_HOME=str(tmp_path / "hf"), **env)
    result = subprocess.run([sys.executable, "-m", "train.hub", str(reference_run / "model"),
                             "--repo-id", "me/resnet18"], env=environment, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and "hf_not_a_real_token" not in result.stderr
    assert digest(reference_run / "model") == before
