"""BlurPool (anti-aliased downsampling) through ``[model] aa_layer``: it reaches timm's model, is
recorded in the export's config.json, and timm rebuilds the same network from the folder; where
timm's constructor cannot take a name (ResNets), one line says which architecture has it built in."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from helpers import data_toml, tiny_train_toml, write

from train.cli import main
from train.config import load_config_text
from train.export import write_model_folder
from train.models import build_model, check_model

SMALL_NET = "mobilenetv2_050"  # its blocks build their downsampling from a layer name


def config_for(arch: str, model_table: str):
    return load_config_text(f"[data]\ndata_dir = 'x'\nnum_classes = 3\n[train]\narch = '{arch}'\n"
                            "[train.preprocess]\ntrain_crop_size = 32\nval_image_size = 36\nval_crop_size = 32\n"
                            f"[train.model]\n{model_table}", "t.toml")


def blur_layers(model: torch.nn.Module) -> int:
    return sum(isinstance(module, timm.layers.BlurPool2d) for module in model.modules())


def rebuilt_from_export(model: torch.nn.Module, config, folder) -> torch.nn.Module:
    write_model_folder(folder, model, config, ("a", "b", "c"), [], "test")
    return timm.create_model(f"local-dir:{folder}", pretrained=True).eval()


def test_aa_layer_reaches_the_model_and_the_export_rebuilds_it(tmp_path):
    """``aa_layer = "blur"``: the trained model has BlurPool2d layers, config.json's model_args
    record the name, and timm's rebuild from the folder has the same layers and outputs."""
    config = config_for(SMALL_NET, 'aa_layer = "blur"\n')
    check_model(config.train, 3, "t.toml")
    torch.manual_seed(0)
    model = build_model(SMALL_NET, 3, 32, 32, config.train.model).eval()
    plain = build_model(SMALL_NET, 3, 32, 32, {})
    assert blur_layers(model) > 0 and blur_layers(plain) == 0
    rebuilt = rebuilt_from_export(model, config, tmp_path / "model")
    assert json.loads((tmp_path / "model" / "config.json").read_text())["model_args"] == {"aa_layer": "blur"}
    assert blur_layers(rebuilt) == blur_layers(model)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(images), model(images))


def test_a_resnet_with_blurpool_built_in_exports_and_rebuilds(tmp_path):
    """timm's resnetblur18 (BlurPool2d in each strided block and after the stem's max-pool) trains
    and exports as any architecture: the rebuild has the same blur layers and outputs."""
    config = config_for("resnetblur18", "")
    torch.manual_seed(0)
    model = build_model("resnetblur18", 3, 32, 32, {}).eval()
    assert blur_layers(model) == 4
    rebuilt = rebuilt_from_export(model, config, tmp_path / "model")
    assert blur_layers(rebuilt) == 4
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(images), model(images))


@pytest.mark.parametrize("arch, value, suggestion", [("resnet18", "blur", "arch = 'resnetblur18'"),
                                                     ("resnet50", "blurpc", "arch = 'resnetblur50'"),
                                                     ("resnet50d", "avg", "arch = 'resnetaa50d'")])
def test_a_resnet_given_a_layer_name_is_one_line_naming_the_built_in_architecture(arch, value, suggestion,
                                                                                   tmp_path, capsys):
    """timm's ResNet stem takes a layer class only; the refusal names the key and the architecture
    that has the layer built in, with exit status 2, before any data is read."""
    data = write(tmp_path / "data.toml", data_toml(tmp_path / "no-such-folder"))
    train = write(tmp_path / "train.toml", tiny_train_toml(arch=f'"{arch}"') + f'\n[model]\naa_layer = "{value}"\n')
    assert main(["--data-cfg", str(data), "--train-cfg", str(train), "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {train}: train.model.aa_layer: timm's {arch} takes a layer class here")
    assert err.endswith(suggestion) and "\n" not in err
