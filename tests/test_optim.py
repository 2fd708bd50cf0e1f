"""Optimizer construction and weight-decay grouping."""

from typing import get_args

import pytest
import schedulefree
import timm
import torch

from train.config import (
    AdamConfig,
    AdamWConfig,
    AdamWScheduleFreeConfig,
    OptimConfig,
    SGDConfig,
    SGDSAMConfig,
    SGDScheduleFreeConfig,
    TimmOptimizerConfig,
)
from train.optim import OPTIMIZERS, build_optimizer, param_groups


def test_no_weight_decay_on_normalization_and_bias_parameters():
    model = timm.create_model("resnet18", num_classes=5)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    decay_ids = {id(p) for p in decay["params"]}
    no_decay_ids = {id(p) for p in no_decay["params"]}
    for name, p in model.named_parameters():
        owner = dict(model.named_modules())[name.rsplit(".", 1)[0]]
        if isinstance(owner, torch.nn.BatchNorm2d) or name.endswith(".bias"):
            assert id(p) in no_decay_ids, name
        else:
            assert id(p) in decay_ids, name
    assert len(decay_ids) + len(no_decay_ids) == len(list(model.parameters()))


def test_one_dimensional_parameters_are_exempt_whatever_their_name():
    model = torch.nn.Module()
    model.oddly_named_scale = torch.nn.Parameter(torch.ones(4))  # 1-D: a norm-like parameter
    model.bias_looking_matrix = torch.nn.Parameter(torch.ones(4, 4))  # 2-D and not "<...>.bias": decayed
    decay, no_decay = param_groups(model, 0.5)
    assert decay["params"] == [model.bias_looking_matrix] and no_decay["params"] == [model.oddly_named_scale]


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "vgg16", "vgg16_bn"])
def test_resnet_and_vgg_groups_are_those_of_the_shape_rule(arch):
    """Using timm's grouping changed nothing for these models: decay exactly on the parameters
    of two or more dimensions, in the same order (checkpoints store the state by position)."""
    model = timm.create_model(arch, num_classes=10)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["params"] == [p for p in model.parameters() if p.ndim > 1]
    assert no_decay["params"] == [p for p in model.parameters() if p.ndim <= 1]


def test_vit_position_embedding_and_class_token_get_no_weight_decay():
    model = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32)
    named = dict(model.named_parameters())
    decay, no_decay = param_groups(model, 0.3)
    exempt = {id(p) for p in no_decay["params"]}
    assert id(named["pos_embed"]) in exempt and id(named["cls_token"]) in exempt  # 3-D, named by no_weight_decay()
    assert id(named["patch_embed.proj.weight"]) not in exempt and id(named["blocks.0.norm1.weight"]) in exempt
    assert len(decay["params"]) + len(no_decay["params"]) == len(named)


def test_both_groups_exist_without_weight_decay():
    decay, no_decay = param_groups(torch.nn.Linear(3, 2), 0.0)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.0, 0.0) and len(decay["params"]) == 1


@pytest.mark.parametrize("cfg, cls", [(SGDConfig(momentum=0.8, nesterov=True), torch.optim.SGD),
                                      (AdamConfig(beta1=0.8), torch.optim.Adam),
                                      (AdamWConfig(weight_decay=0.02), torch.optim.AdamW),
                                      (SGDSAMConfig(momentum=0.8, weight_decay=0.02), torch.optim.SGD),
                                      (SGDScheduleFreeConfig(momentum=0.8, warmup_epochs=2.5, r=0.5),
                                       schedulefree.SGDScheduleFree),
                                      (AdamWScheduleFreeConfig(beta1=0.8, weight_decay=0.02, weight_lr_power=1.0),
                                       schedulefree.AdamWScheduleFree)])
def test_builds_each_optimizer_with_its_keys(cfg, cls):
    model = torch.nn.Linear(3, 2)
    optimizer = build_optimizer(model, cfg, lr=0.3, steps_per_epoch=10)
    assert isinstance(optimizer, cls)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [cfg.weight_decay, 0.0]
    assert optimizer.param_groups[0]["lr"] == 0.3
    if isinstance(cfg, SGDConfig):
        assert optimizer.defaults["momentum"] == 0.8 and optimizer.defaults["nesterov"]
    if isinstance(cfg, (AdamConfig, AdamWScheduleFreeConfig)):
        assert optimizer.defaults["betas"] == (0.8, 0.999)
    if isinstance(cfg, SGDSAMConfig):  # SAM's base optimizer: plain SGD, as the lr schedule expects
        assert optimizer.defaults["momentum"] == 0.8 and not optimizer.defaults["nesterov"]
    if isinstance(cfg, SGDScheduleFreeConfig):
        assert (optimizer.defaults["momentum"], optimizer.defaults["r"]) == (0.8, 0.5)
        assert optimizer.defaults["warmup_steps"] == 25  # warmup_epochs * steps_per_epoch
    if isinstance(cfg, AdamWScheduleFreeConfig):
        assert optimizer.defaults["weight_lr_power"] == 1.0


def test_every_optimizer_of_the_config_schema_is_in_the_registry():
    """Each built-in choice of the schema has its entry; the open member (any timm name) has none."""
    builtin = {cls().name for cls in get_args(OptimConfig) if cls is not TimmOptimizerConfig}
    assert builtin == set(OPTIMIZERS)
