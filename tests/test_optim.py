"""Optimizer construction and weight-decay grouping."""

import pytest
import timm
import torch

from train.config import AdamConfig, AdamWConfig, SGDConfig, SGDSAMConfig, UserError
from train.optim import build_optimizer, check_supported, param_groups


def test_no_weight_decay_on_normalization_and_bias_parameters():
    model = timm.create_model("resnet18", num_classes=5)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    decay_ids = {id(p) for p in decay["params"]}
    no_decay_ids = {id(p) for p in no_decay["params"]}
    for name, p in model.named_parameters():
        if isinstance(dict(model.named_modules())[name.rsplit(".", 1)[0]], torch.nn.BatchNorm2d) or name.endswith(".bias"):
            assert id(p) in no_decay_ids, name
        else:
            assert id(p) in decay_ids, name
    assert len(decay_ids) + len(no_decay_ids) == len(list(model.parameters()))


def test_grouping_is_by_shape_not_name():
    model = torch.nn.Module()
    model.oddly_named_scale = torch.nn.Parameter(torch.ones(4))  # 1-D: a norm-like parameter
    model.bias_looking_matrix = torch.nn.Parameter(torch.ones(4, 4))  # 2-D: decayed whatever its name
    decay, no_decay = param_groups(model, 0.5)
    assert decay["params"] == [model.bias_looking_matrix] and no_decay["params"] == [model.oddly_named_scale]


@pytest.mark.parametrize("cfg, cls", [(SGDConfig(momentum=0.8, nesterov=True), torch.optim.SGD),
                                      (AdamConfig(beta1=0.8), torch.optim.Adam),
                                      (AdamWConfig(weight_decay=0.02), torch.optim.AdamW)])
def test_builds_each_optimizer_with_its_keys(cfg, cls):
    model = torch.nn.Linear(3, 2)
    optimizer = build_optimizer(model, cfg, lr=0.3)
    assert isinstance(optimizer, cls)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [cfg.weight_decay, 0.0]
    assert optimizer.param_groups[0]["lr"] == 0.3
    if isinstance(cfg, SGDConfig):
        assert optimizer.defaults["momentum"] == 0.8 and optimizer.defaults["nesterov"]
    if isinstance(cfg, AdamConfig):
        assert optimizer.defaults["betas"] == (0.8, 0.999)


def test_later_optimizers_are_reported_as_not_yet_supported():
    with pytest.raises(UserError, match="not yet supported"):
        check_supported(SGDSAMConfig(), "t.toml")
