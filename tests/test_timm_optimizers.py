"""`[optim] name` = any optimizer timm's create_optimizer_v2 knows: its own keys passed through and
checked against its class at start-up, the trainer's weight-decay groups, a real run."""

from __future__ import annotations

import json
import tomllib

import pytest
import timm.optim
import tomli_w
import torch
from accelerate import Accelerator
from helpers import data_toml, tiny_train_toml, write

from train.cli import main
from train.config import TimmOptimizerConfig, load_config_text, to_dict
from train.optim import build_optimizer, build_schedule, build_train_step, check_supported
from train.optim.step import TrainStep
from train.rundir import read_metrics

SGD_TABLE = '[optim]\nname = "sgd"\nmomentum = 0.9\nweight_decay = 1e-4\n'


def train_toml(optim_table: str) -> str:
    text = tiny_train_toml()
    assert SGD_TABLE in text
    return text.replace(SGD_TABLE, optim_table)


def config_with(optim_table: str):
    return load_config_text(f"[data]\ndata_dir = 'x'\n[train]\n[train.optim]\n{optim_table}", "t.toml")


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))


@pytest.mark.parametrize("table, cls, own", [
    ('name = "lamb"\nweight_decay = 0.02\nbetas = [0.8, 0.99]\ntrust_clip = true\n', timm.optim.Lamb,
     {"betas": (0.8, 0.99), "trust_clip": True}),
    ('name = "lion"\nweight_decay = 0.1\nbetas = [0.95, 0.98]\n', timm.optim.Lion, {"betas": (0.95, 0.98)}),
    ('name = "adopt"\nweight_decay = 0.01\neps = 1e-5\ndecoupled = true\n', timm.optim.Adopt,
     {"eps": 1e-5, "decoupled": True}),
])
def test_three_timm_optimizers_take_steps_with_their_own_keys_and_the_decay_groups(table, cls, own):
    """Each is built by timm with the table's keys, train.lr, and the two weight-decay groups
    (decay on kernels and matrices, none on BatchNorm and biases); a few scheduled steps move the
    weights and lower the loss of a batch it keeps seeing."""
    cfg = config_with(table).train.optim
    assert isinstance(cfg, TimmOptimizerConfig)
    check_supported(cfg, "t.toml")
    model = small_model()
    optimizer = build_optimizer(model, cfg, lr=0.01, steps_per_epoch=4)
    assert type(optimizer) is cls
    assert {key: optimizer.defaults[key] for key in own} == own
    decayed, exempt = optimizer.param_groups
    assert (decayed["weight_decay"], exempt["weight_decay"]) == (cfg.weight_decay, 0.0)
    assert {id(p) for p in decayed["params"]} == {id(model[0].weight), id(model[5].weight)}
    schedule = build_schedule(optimizer, config_with(table).train.lr_scheduler, 0.01, 4, 1)
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    step = build_train_step(cfg, model, optimizer, torch.nn.CrossEntropyLoss(), accelerator, 0.0)
    assert type(step) is TrainStep
    torch.manual_seed(1)
    images, labels = torch.randn(8, 3, 8, 8), torch.randint(0, 3, (8,))
    before = [p.detach().clone() for p in model.parameters()]
    losses = []
    for _ in range(4):
        loss, updated = step(images, labels)
        assert updated
        schedule.step()
        losses.append(loss.item())
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("table, expected", [
    ('name = "lamb"\nbetaz = [0.9, 0.99]\n', "train.optim.betaz: timm's lamb (Lamb) takes no argument 'betaz'; "
                                              "did you mean 'betas'?"),
    ('name = "lion"\nrho = 0.05\n', "train.optim.rho: timm's lion (Lion) takes no argument 'rho'; it takes betas, "
                                    "weight_decay, caution, corrected_weight_decay, maximize, foreach"),
    ('name = "lamb"\nbetas = [0.9]\n', "train.optim.betas must be a list of 2 numbers, like [0.9, 0.999], "
                                       "got [0.9]"),
    ('name = "lamb"\ntrust_clip = 1\n', "train.optim.trust_clip must be true or false, got 1"),
    ('name = "lamb"\nlr = 0.1\n', "train.optim.lr: set from train.lr (and the lr schedule); remove it from [optim]"),
    ('name = "lamb"\neps = -1.0\n', "train.optim: timm cannot build lamb with {'eps': -1.0}: Invalid epsilon: -1.0"),
    ('name = "lambb"\n', "train.optim.name: 'lambb' is neither 'sgd', 'adam', 'adamw', 'sgd-schedule-free', "
                         "'adamw-schedule-free', 'sgd-sam' nor an optimizer timm knows; did you mean 'lamb'?"),
    ('name = "adahessian"\n', "train.optim.name = 'adahessian' needs second-order gradients (create_graph), which "
                              "the train step does not compute"),
])
def test_a_bad_timm_optimizer_key_or_name_is_one_line_naming_it_before_any_data_is_read(table, expected, tmp_path,
                                                                                         capsys):
    """An unknown key, a value unlike the argument's default, a key the trainer sets, a value
    timm refuses, an unknown name: exit status 2 and one line naming the file and the key."""
    data = write(tmp_path / "data.toml", data_toml(tmp_path / "no-such-folder"))
    train = write(tmp_path / "train.toml", train_toml("[optim]\n" + table))
    assert main(["--data-cfg", str(data), "--train-cfg", str(train), "--output-dir", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {train}: {expected}"
    assert not (tmp_path / "run").exists()


def test_the_keys_round_trip_through_the_run_config():
    """config.toml holds the table as written (keys beside name), and reads back to the same config:
    a resumed run compares the two."""
    config = config_with('name = "lion"\nweight_decay = 0.1\nbetas = [0.95, 0.98]\n')
    table = to_dict(config)
    assert table["train"]["optim"] == {"name": "lion", "weight_decay": 0.1, "betas": [0.95, 0.98]}
    again = load_config_text(tomli_w.dumps(table), "config.toml")
    assert again == config and to_dict(again) == table


def test_a_run_trains_with_a_timm_optimizer(tiny_folder, tmp_path):
    """``python -m train`` with name = "lamb": trains, evaluates, records the table in config.toml
    and the model card; the lr reported is the schedule's."""
    data = write(tmp_path / "data.toml", data_toml(tiny_folder))
    train = write(tmp_path / "train.toml", train_toml('[optim]\nname = "lamb"\nweight_decay = 0.01\n'
                                                      'betas = [0.9, 0.99]\n'))
    out = tmp_path / "run"
    assert main(["--data-cfg", str(data), "--train-cfg", str(train), "--output-dir", str(out)]) == 0
    records = read_metrics(out / "metrics.jsonl")
    assert len(records) == 1 and records[0]["step"] == 3 and records[0]["val_samples"] == 15
    assert records[0]["train_loss"] == pytest.approx(records[0]["train_loss"])  # a number, not NaN
    recorded = tomllib.loads((out / "config.toml").read_text())["train"]["optim"]
    assert recorded == {"name": "lamb", "weight_decay": 0.01, "betas": [0.9, 0.99]}
    assert "optimizer: `lamb`" in (out / "model" / "README.md").read_text()
    assert json.loads((out / "model" / "config.json").read_text())["architecture"] == "resnet18"
