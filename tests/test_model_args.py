"""`[model]`: keyword arguments for timm.create_model, checked at start-up and kept with the model
(run config, exported config.json, model card, the export command)."""

from __future__ import annotations

import json
import tomllib

import pytest
import timm
import torch
from helpers import data_toml, tiny_train_toml, write
from safetensors.torch import load_file

from train import checkpoint as ckpt
from train.cli import main
from train.export import main as export_main


def configs(tmp_path, data_dir, model_table: str) -> list[str]:
    data = write(tmp_path / "data.toml", data_toml(data_dir))
    train = write(tmp_path / "train.toml", tiny_train_toml() + "\n[model]\n" + model_table)
    return ["--data-cfg", str(data), "--train-cfg", str(train), "--output-dir", str(tmp_path / "run")]


@pytest.mark.parametrize("table, expected", [
    ("zero_init_lst = false", "train.model.zero_init_lst: resnet18 takes no argument 'zero_init_lst'; "
                              "did you mean 'zero_init_last'?"),
    ("zero_init_last = 1", "train.model.zero_init_last must be true or false, got 1"),
    ('drop_rate = "high"', "train.model.drop_rate must be a number, got 'high'"),
    ("num_classes = 5", "train.model.num_classes: set from data.num_classes; remove it from [model]"),
    ('global_pool = "middle"', "train.model: timm cannot build resnet18 with {'global_pool': 'middle'}: "
                               "Invalid pool type: middle"),
])
def test_a_bad_argument_is_one_line_naming_the_file_and_key_before_any_data_is_read(table, expected, tmp_path,
                                                                                    capsys):
    args = configs(tmp_path, tmp_path / "no-such-folder", table)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path / 'train.toml'}: {expected}"
    assert not (tmp_path / "run").exists()


def test_set_reaches_the_table(tmp_path, capsys):
    args = configs(tmp_path, tmp_path / "no-such-folder", "") + ["--set", "train.model.zero_init_lst=false"]
    assert main(args) == 2
    assert "(with --set): train.model.zero_init_lst: resnet18 takes no argument" in capsys.readouterr().err


@pytest.fixture(scope="module")
def deep_stem_run(tiny_folder, tmp_path_factory):
    """A run whose [model] changes the network's shape (a 3-convolution stem) and its dropout."""
    tmp = tmp_path_factory.mktemp("model_args")
    assert main(configs(tmp, tiny_folder, 'stem_type = "deep"\ndrop_rate = 0.25\n')) == 0
    return tmp / "run"


def test_the_arguments_build_the_trained_model_and_are_recorded_with_it(deep_stem_run):
    config = tomllib.loads((deep_stem_run / "config.toml").read_text())
    assert config["train"]["model"] == {"stem_type": "deep", "drop_rate": 0.25}
    exported = json.loads((deep_stem_run / "model" / "config.json").read_text())
    assert exported["model_args"] == {"stem_type": "deep", "drop_rate": 0.25}
    card = (deep_stem_run / "model" / "README.md").read_text()
    assert '`resnet18`, `stem_type = "deep"`, `drop_rate = 0.25`' in card
    # timm rebuilds the same network from the folder alone: the weights load (strictly) into a deep stem.
    model = timm.create_model(f"local-dir:{deep_stem_run / 'model'}", pretrained=True)
    assert isinstance(model.conv1, torch.nn.Sequential) and model.drop_rate == 0.25


def test_the_export_command_rebuilds_the_same_model(deep_stem_run, tmp_path):
    """From a checkpoint, the export builds the deep-stem network (the weights load into it strictly)
    and writes the folder the run wrote at its end."""
    last = ckpt.list_checkpoints(deep_stem_run)[-1]
    assert export_main([str(last), "--output", str(tmp_path / "m")]) == 0
    folders = (tmp_path / "m", deep_stem_run / "model")
    exported, final = (json.loads((folder / "config.json").read_text()) for folder in folders)
    assert exported["model_args"] == final["model_args"] == {"stem_type": "deep", "drop_rate": 0.25}
    exported, final = (load_file(str(folder / "model.safetensors")) for folder in folders)
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)
