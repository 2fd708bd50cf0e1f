"""MixUp/CutMix (``[mixup]``, timm's Mixup and SoftTargetCrossEntropy): off by default, each
micro-batch mixed with its own draw, label smoothing folded into the soft targets, and a run with
gradient accumulation on 2 processes."""

from __future__ import annotations

import math
import tomllib

import pytest
import torch
from accelerate import Accelerator
from helpers import accelerate_launch, data_toml, free_port, launched_run, tiny_train_toml, write
from timm.loss import SoftTargetCrossEntropy

from train.config import ConfigError, MixupConfig, load_config_text
from train.mixing import BatchMixer, MixingStep, training_criterion, with_mixing
from train.optim.step import TrainStep
from train.rundir import read_metrics


def train_config(text: str = "", processes: int = 1, batch_size: int = 8):
    return load_config_text(f"[data]\ndata_dir = 'x'\nnum_classes = 3\n[train]\nbatch_size = {batch_size}\n{text}",
                            "t.toml", processes).train


def smoothed(labels: torch.Tensor, smoothing: float, classes: int) -> torch.Tensor:
    off = smoothing / classes
    return torch.nn.functional.one_hot(labels, classes).float() * (1 - smoothing) + off


def test_off_by_default_the_loss_is_the_label_smoothed_cross_entropy():
    """The seed's configs: no [mixup], the train step as the optimizer built it, the usual loss."""
    train = train_config("label_smoothing = 0.1\n")
    assert train.mixup == MixupConfig()
    criterion = training_criterion(train)
    assert type(criterion) is torch.nn.CrossEntropyLoss and criterion.label_smoothing == 0.1
    step = object()
    assert with_mixing(step, train, 3) is step


def test_mixup_blends_each_image_with_its_pair_and_the_soft_targets_alike():
    """MixUp: image i becomes lam * x_i + (1 - lam) * x_(n-1-i) and its target the same blend of the
    two label-smoothed one-hot vectors (lam read back from the images)."""
    train = train_config("label_smoothing = 0.1\n[train.mixup]\nmixup_alpha = 0.4\n")
    assert isinstance(training_criterion(train), SoftTargetCrossEntropy)
    mixer = BatchMixer(train.mixup, train.label_smoothing, 3)
    torch.manual_seed(0)
    images, labels = torch.rand(6, 3, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    mixed, targets = mixer(images.clone(), labels)
    pair = images.flip(0)
    lam = ((mixed - pair) / (images - pair)).mean().item()
    assert 0 < lam < 1
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * pair)
    expected = lam * smoothed(labels, 0.1, 3) + (1 - lam) * smoothed(labels.flip(0), 0.1, 3)
    torch.testing.assert_close(targets, expected)


def test_cutmix_pastes_a_box_and_weighs_the_targets_by_its_area():
    """CutMix: every pixel comes from the image or its pair; the pair's share of the pixels is the
    pair's weight in the target."""
    train = train_config("label_smoothing = 0.0\n[train.mixup]\ncutmix_alpha = 1.0\n")
    mixer = BatchMixer(train.mixup, 0.0, 3)
    torch.manual_seed(1)
    images, labels = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 1])
    for _ in range(5):
        mixed, targets = mixer(images.clone(), labels)
        from_pair = (mixed == images.flip(0)).all(dim=1) & (mixed != images).any(dim=1)
        assert ((mixed == images) | (mixed == images.flip(0))).all()
        share = from_pair[0].float().mean().item()
        assert targets[0, labels.flip(0)[0]] == pytest.approx(share, abs=1e-6)


class Recorder:
    """A stand-in train step that keeps what it was given."""

    def __init__(self):
        self.seen = []

    def on_micro_batches(self, micro_batches):
        self.seen.append([(images.clone(), labels.clone()) for images, labels in micro_batches])
        return torch.tensor(0.0), True


def test_each_micro_batch_of_an_accumulated_step_is_mixed_on_its_own():
    """With accumulation the step receives every micro-batch mixed (soft targets), each by its own draw."""
    train = train_config("[train.mixup]\nmixup_alpha = 1.0\n")
    recorder = Recorder()
    step = with_mixing(recorder, train, 3)
    assert isinstance(step, MixingStep)
    torch.manual_seed(2)
    micro = [(torch.rand(4, 3, 4, 4), torch.tensor([0, 1, 2, 0])) for _ in range(2)]
    step.on_micro_batches([(images.clone(), labels) for images, labels in micro])
    (first, second), = recorder.seen
    lams = []
    for (images, _), (mixed, targets) in zip(micro, (first, second)):
        assert targets.shape == (4, 3) and torch.allclose(targets.sum(1), torch.ones(4))
        pair = images.flip(0)
        lams.append(((mixed - pair) / (images - pair)).mean().item())
    assert lams[0] != pytest.approx(lams[1])


def test_the_train_step_learns_from_soft_targets():
    """The optimizer's step with the soft-target loss: a finite loss and an update."""
    train = train_config("[train.mixup]\nmixup_alpha = 0.2\ncutmix_alpha = 1.0\n")
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    step = with_mixing(TrainStep(model, optimizer, training_criterion(train), accelerator, 0.0), train, 3)
    before = [p.detach().clone() for p in model.parameters()]
    loss, updated = step(torch.rand(4, 3, 4, 4), torch.tensor([0, 1, 2, 0]))
    assert updated and math.isfinite(loss.item())
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_an_odd_micro_batch_is_refused_in_one_line():
    """timm pairs image i with image n-1-i: a micro-batch of odd size cannot be mixed."""
    with pytest.raises(ConfigError, match=r"train.mixup mixes images in pairs, but the micro-batch has 3 images"):
        train_config("[train.mixup]\nmixup_alpha = 0.2\n", processes=2, batch_size=6)
    with pytest.raises(ConfigError, match="train.mixup.mode must be one of"):
        train_config("[train.mixup]\nmode = 'box'\n")
    train_config(processes=2, batch_size=6)  # no mixing: any size


def test_mixing_runs_with_accumulation_on_two_processes(tiny_folder, tmp_path):
    """2 processes, 2 micro-batches of 2 per process per step, MixUp and CutMix both on: the run
    trains and evaluates, and its config keeps the [mixup] table."""
    data = write(tmp_path / "data.toml", data_toml(tiny_folder))
    train = write(tmp_path / "train.toml", tiny_train_toml(micro_batch_size=2, max_epochs=2)
                  + "\n[mixup]\nmixup_alpha = 0.2\ncutmix_alpha = 1.0\nswitch_prob = 0.5\n")
    run = launched_run(["--data-cfg", str(data), "--train-cfg", str(train)], tmp_path / "run",
                       launcher=accelerate_launch(2, free_port()))
    assert "each 2 micro-batches of 2 per process" in run.stdout
    records = read_metrics(run.dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [3, 6] and all(math.isfinite(r["train_loss"]) for r in records)
    assert records[-1]["val_samples"] == 15
    mixup = tomllib.loads((run.dir / "config.toml").read_text())["train"]["mixup"]
    assert mixup == {"mixup_alpha": 0.2, "cutmix_alpha": 1.0, "prob": 1.0, "switch_prob": 0.5, "mode": "batch"}
