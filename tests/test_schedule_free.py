"""Schedule-Free SGD and AdamW against the paper's equations; modes, checkpoints, BatchNorm statistics;
what the training loop evaluates, saves and exports."""

from __future__ import annotations

import contextlib
import io
import itertools

import pytest
import torch
from accelerate import Accelerator
from helpers import Snapshot, WatchedRun, run_configs, schedule_free_toml, watched_run
from optim_reference import linear_model, schedule_free_trajectory, tiny_problem
from safetensors.torch import load_file

from train.config import AdamWScheduleFreeConfig, DataConfig, PreprocessConfig, SGDScheduleFreeConfig, UserError
from train.data import build_loaders
from train.models import build_model
from train.optim import build_optimizer, build_train_step, check_supported, evaluation_weights, reported_lr
from train.optim.batchnorm import recompute_running_stats
from train.rundir import read_metrics

LR, STEPS_PER_EPOCH = 0.2, 10
SGD_SF = SGDScheduleFreeConfig(momentum=0.8, weight_decay=0.05, warmup_epochs=0.3, r=0.75, weight_lr_power=2.0)
ADAMW_SF = AdamWScheduleFreeConfig(beta1=0.85, beta2=0.95, weight_decay=0.05, warmup_epochs=0.3, r=0.5,
                                   weight_lr_power=1.0)


def prepared(model, cfg):
    accelerator = Accelerator(cpu=True)
    optimizer = build_optimizer(model, cfg, LR, steps_per_epoch=STEPS_PER_EPOCH)  # warm-up: 3 steps
    model, optimizer = accelerator.prepare(model, optimizer)
    step = build_train_step(cfg, model, optimizer, torch.nn.MSELoss(), accelerator, grad_clip_norm=0.0)
    return step, model, optimizer


def reference(cfg, weight, bias, batches):
    if isinstance(cfg, SGDScheduleFreeConfig):
        return schedule_free_trajectory(weight, bias, batches, LR, cfg.momentum, cfg.weight_decay, 3, cfg.r,
                                        cfg.weight_lr_power)
    return schedule_free_trajectory(weight, bias, batches, LR, cfg.beta1, cfg.weight_decay, 3, cfg.r,
                                    cfg.weight_lr_power, adam_beta2=cfg.beta2, eps=cfg.epsilon)


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual.detach().double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cfg", [SGD_SF, ADAMW_SF], ids=["sgd", "adamw"])
def test_schedule_free_trains_at_y_evaluates_at_x_and_reports_the_warmed_up_lr(cfg):
    weight, bias, batches = tiny_problem(steps=5)
    step, model, optimizer = prepared(linear_model(weight, bias), cfg)
    weights = evaluation_weights(cfg, optimizer)
    weights.before_training()
    trajectory = reference(cfg, weight, bias, batches)
    for (x, t), (y_ref, _, lr_ref) in zip(batches, trajectory):
        step(x, t)
        close(model.weight, y_ref[0])
        close(model.bias, y_ref[1])
        assert reported_lr(optimizer) == pytest.approx(lr_ref)
    x_ref = trajectory[-1][1]  # the average after the last step
    with weights.while_saving():
        close(model.weight, x_ref[0])
        close(model.bias, x_ref[1])
    close(model.weight, y_ref[0])  # back to the trained weights


def test_checkpoints_hold_the_evaluation_weights_and_resume_in_training_mode():
    weight, bias, batches = tiny_problem(steps=4)
    step, model, optimizer = prepared(linear_model(weight, bias), SGD_SF)
    weights = evaluation_weights(SGD_SF, optimizer)
    weights.before_training()
    for x, t in batches[:3]:
        step(x, t)
    with weights.while_saving():
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    x_ref = reference(SGD_SF, weight, bias, batches[:3])[-1][1]
    step(*batches[3])

    buffer.seek(0)
    saved = torch.load(buffer)
    close(saved["model"]["weight"], x_ref[0])  # what a checkpoint holds: the averaged weights
    resumed_step, resumed_model, resumed_optimizer = prepared(linear_model(weight * 0, bias * 0), SGD_SF)
    resumed_model.load_state_dict(saved["model"])
    resumed_optimizer.load_state_dict(saved["optimizer"])
    evaluation_weights(SGD_SF, resumed_optimizer).before_training()
    resumed_step(*batches[3])
    assert torch.equal(resumed_model.weight, model.weight) and torch.equal(resumed_model.bias, model.bias)


def test_schedule_free_rejects_values_it_would_divide_by():
    with pytest.raises(UserError, match=r"t.toml: train.optim.momentum must be > 0 for 'sgd-schedule-free'"):
        check_supported(SGDScheduleFreeConfig(momentum=0.0), "t.toml")
    with pytest.raises(UserError, match=r"train.optim.beta1 must be > 0"):
        check_supported(AdamWScheduleFreeConfig(beta1=0.0), "t.toml")


def test_recomputed_statistics_are_the_cumulative_average_of_the_batches():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.Conv2d(3, 2, 3), torch.nn.BatchNorm2d(2)).eval()
    batches = [torch.randn(4, 3, 5, 5) * (i + 1) + i for i in range(3)]
    used = recompute_running_stats(net, iter(batches), lambda b: b, contextlib.nullcontext)
    assert used == 3
    bn = net[0]
    torch.testing.assert_close(bn.running_mean, torch.stack([b.mean(dim=(0, 2, 3)) for b in batches]).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack([b.var(dim=(0, 2, 3)) for b in batches]).mean(0))
    assert bn.num_batches_tracked.item() == 3
    assert bn.momentum == 0.1 and not net.training  # the layer's momentum and the model's mode are as found


def test_the_statistics_stream_leaves_the_training_iterator_where_it_was(tiny_folder):
    """Recomputing statistics mid-epoch (before a checkpoint) must not move the training batches."""
    data = DataConfig(data_dir=str(tiny_folder), num_classes=3)
    data.dataloader.name, data.dataloader.num_data_workers = "hf", 1  # persistent workers: the risky case
    preprocess = PreprocessConfig(train_crop_size=16, val_image_size=16, val_crop_size=16)

    def labels_of_epoch(interrupt: bool) -> list[list[int]]:
        loaders = build_loaders(data, preprocess, 4, 1, 0, seed=5)
        loaders.set_epoch(1, 0)
        seen = []
        for i, (_, labels) in enumerate(loaders.train):
            seen.append(labels.tolist())
            if interrupt and i == 1:
                assert sum(1 for _ in loaders.train_stats()) == loaders.steps_per_epoch
        return seen

    assert labels_of_epoch(interrupt=True) == labels_of_epoch(interrupt=False)


# ------------------------------------------------------------------ through the real loop
#
# resnet18 (BatchNorm) trained with Schedule-Free SGD by `python -m train` in this process,
# the loop watched at its own moments (helpers.watched_run): the end of each epoch's
# training, each evaluation, each checkpoint. The optimizer's y (trained) and z sequences are
# read there; x, the weights to evaluate, is computed from them by the paper's relation
# y = (1 - beta) z + beta x, independently of the optimizer's eval().

MOMENTUM = 0.9  # schedule_free_toml's


def averaged(y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """x from y and z, in float64."""
    y, z = y.double(), z.double()
    return (y - (1 - MOMENTUM) * z) / MOMENTUM


def the_average(trained: Snapshot) -> dict[str, torch.Tensor]:
    assert trained.train_mode and trained.z.keys() == trained.params.keys()
    return {name: averaged(y, trained.z[name]) for name, y in trained.params.items()}


@torch.no_grad()
def statistics_for(weights: dict[str, torch.Tensor], batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """BatchNorm running mean and variance of resnet18 with ``weights``, the plain average over
    ``batches`` (``momentum = None``), as torch documents it."""
    model = build_model("resnet18", 3, 32, 32).to(memory_format=torch.channels_last)
    for name, parameter in model.named_parameters():
        parameter.copy_(weights[name])
    for layer in model.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.reset_running_stats()
            layer.momentum = None
    model.train()
    for images in batches:
        model(images)
    return {n: b.clone() for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var"))}


def sf_run(folder, tmp, **overrides) -> WatchedRun:
    """2 epochs of 3 steps, checkpoints every 2 steps (2, 4, 6 mid-epoch; 6 again at the end)."""
    args = run_configs(tmp, folder, schedule_free_toml(max_epochs=2, **overrides))
    return watched_run(args + ["--output-dir", str(tmp / "run")])


@pytest.fixture(scope="module")
def evaluated_run(tiny_folder, tmp_path_factory) -> WatchedRun:
    """Evaluated after each epoch."""
    return sf_run(tiny_folder, tmp_path_factory.mktemp("sf_evaluated"))


@pytest.fixture(scope="module")
def unevaluated_run(tiny_folder, tmp_path_factory) -> WatchedRun:
    """The same, evaluated after the last epoch only."""
    return sf_run(tiny_folder, tmp_path_factory.mktemp("sf_unevaluated"), eval_freq=2)


def test_the_loop_evaluates_the_averaged_weights(evaluated_run):
    assert [t.step for t in evaluated_run.trained] == [e.step for e in evaluated_run.evaluated] == [3, 6]
    for trained, evaluated in zip(evaluated_run.trained, evaluated_run.evaluated):
        x = the_average(trained)
        for name, value in evaluated.params.items():
            close(value, x[name])
        # y and x differ by far more than the tolerance: otherwise this would prove nothing.
        assert not torch.allclose(trained.params["conv1.weight"].double(), x["conv1.weight"], rtol=1e-3, atol=0)


def test_batchnorm_statistics_evaluated_are_those_of_the_averaged_weights(evaluated_run):
    run = evaluated_run.run
    # The batches the loop recomputes statistics over: num_samples_for_stats = 16, batch 8.
    batches = [images.contiguous(memory_format=torch.channels_last)
               for images, _ in itertools.islice(run.loaders.train_stats(), 2)]
    for trained, evaluated in zip(evaluated_run.trained, evaluated_run.evaluated):
        expected = statistics_for({n: x.float() for n, x in the_average(trained).items()}, batches)
        for name, value in expected.items():
            torch.testing.assert_close(evaluated.buffers[name], value, rtol=1e-4, atol=1e-5, msg=name)
        # ... and not those of the trained weights.
        of_y = statistics_for(trained.params, batches)
        assert not torch.allclose(of_y["bn1.running_var"], expected["bn1.running_var"], rtol=1e-3, atol=0)


def test_checkpoints_and_the_export_hold_the_averaged_weights_and_their_statistics(evaluated_run):
    saved = evaluated_run.saved
    assert [s.step for s in saved] == [2, 4, 6, 6]
    assert [s.train_mode for s in saved] == [True, True, True, False]  # three mid-epoch, one after evaluating
    for save in saved:
        x = the_average(save) if save.train_mode else save.params
        for name, value in x.items():
            close(save.stored[name], value.double())
        for name, value in save.buffers.items():  # the statistics the model holds at that moment
            assert torch.equal(save.stored[name], value), name
    # The checkpoint after the last evaluation, and the exported model, hold what was evaluated:
    # the average of the last trained weights and the statistics recomputed for it.
    last_trained, last_evaluated = evaluated_run.trained[-1], evaluated_run.evaluated[-1]
    exported = load_file(str(evaluated_run.run.run_dir / "model" / "model.safetensors"))
    for state in (saved[-1].stored, exported):
        for name, value in the_average(last_trained).items():
            close(state[name], value)
        for name, value in last_evaluated.buffers.items():
            assert torch.equal(state[name], value), name


def test_training_after_an_evaluation_continues_from_the_trained_weights(evaluated_run, unevaluated_run):
    """The next step after an evaluation equals the step of a run that never evaluated."""
    assert [e.step for e in unevaluated_run.evaluated] == [6]
    (after_evaluation,) = [s for s in evaluated_run.saved if s.step == 4]
    (never_evaluated,) = [s for s in unevaluated_run.saved if s.step == 4]
    for name, y in never_evaluated.params.items():
        torch.testing.assert_close(after_evaluation.params[name], y, rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(after_evaluation.z[name], never_evaluated.z[name], rtol=1e-5, atol=1e-7, msg=name)
    last = read_metrics(evaluated_run.run.run_dir / "metrics.jsonl")[-1]
    only = read_metrics(unevaluated_run.run.run_dir / "metrics.jsonl")[-1]
    assert last["step"] == only["step"] == 6
    for key in ("train_loss", "val_loss"):
        assert last[key] == pytest.approx(only[key], rel=1e-5)
