"""The weights' moving average ([train.ema]): its values over the real loop's steps against a hand
computation, its place in every checkpoint and in the export, its evaluation beside the trained
weights (metrics.jsonl, TensorBoard), exact resumption on 1 and 2 processes, and its config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import (
    accelerate_launch,
    assert_mid_epoch,
    assert_rerun_reproduces,
    checkpointing_configs,
    data_toml,
    free_port,
    kill_after_checkpoint,
    launched_run,
    run_configs,
    tiny_train_toml,
    write,
)
from safetensors import safe_open
from safetensors.torch import load_file
from test_tracking import scalars

from train import checkpoint as ckpt
from train import evaluate as evaluate_command
from train.cli import main
from train.config import EmaConfig
from train.export import main as export_main
from train.optim.ema import WeightAverage
from train.rundir import read_metrics

DECAY = 0.6
# Warm-up with power 1 and gamma 1: update k uses decay 1 - 1/k (a plain mean of the weights so
# far), capped at DECAY from the third update on.
EMA = ["--set", "train.ema.enabled=true", "--set", f"train.ema.decay={DECAY}", "--set", "train.ema.warmup=true",
       "--set", "train.ema.warmup_power=1.0"]


def hand_decay(update: int) -> float:
    """timm's rule, written out: the first update copies the weights, later ones decay."""
    return 0.0 if update == 1 else min(DECAY, 1 - (1 + (update - 1)) ** -1.0)


def stored_updates(path: Path) -> int:
    with safe_open(str(path), framework="pt") as f:
        return int(f.metadata()["updates"])


@pytest.fixture(scope="module")
def ema_run(tiny_folder, tmp_path_factory) -> Path:
    """2 epochs of 3 steps, each step 2 micro-batches of 4, a checkpoint after every step (all kept),
    the average exported."""
    tmp = tmp_path_factory.mktemp("ema")
    args = checkpointing_configs(tmp, tiny_folder, every_steps=1, max_epochs=2, micro_batch_size=4)
    return launched_run(args + EMA + ["--set", "train.log.keep_last=100", "--set", "train.ema.export=ema"],
                        tmp / "out").dir


def test_the_average_is_the_hand_computed_one_at_every_step(ema_run):
    """After optimizer step k the checkpoint's average is decay_k * average_{k-1} + (1 - decay_k) *
    weights_k for every weight and BatchNorm statistic (integer buffers copied), with k counted
    once per optimizer step, not per micro-batch: the update count in the checkpoint is the step."""
    folders = ckpt.list_checkpoints(ema_run)
    assert [int(f.name) for f in folders] == [1, 2, 3, 4, 5, 6]
    average = None
    for step, folder in enumerate(folders, start=1):
        trained = load_file(str(folder / "model.safetensors"))
        stored = load_file(str(folder / ckpt.EMA_WEIGHTS))
        assert stored.keys() == trained.keys() and stored_updates(folder / ckpt.EMA_WEIGHTS) == step
        decay = hand_decay(step)
        average = {name: (tensor.clone() if average is None or not tensor.is_floating_point()
                          else decay * average[name] + (1 - decay) * tensor) for name, tensor in trained.items()}
        for name, expected in average.items():
            torch.testing.assert_close(stored[name], expected, rtol=1e-5, atol=1e-6, msg=f"step {step}: {name}")
    # The test means something only if the average has left the weights behind.
    last = load_file(str(folders[-1] / "model.safetensors"))
    assert not torch.allclose(average["fc.weight"], last["fc.weight"], atol=1e-4)


def test_both_weights_are_evaluated_and_the_average_is_exported(ema_run, tiny_folder, tmp_path, capsys):
    """metrics.jsonl and TensorBoard hold both evaluations; <run>/model and `python -m train.export`
    hold the average (export = "ema"), and evaluating that folder gives the run's EMA figures."""
    records = read_metrics(ema_run / "metrics.jsonl")
    assert len(records) == 2 and all({"val_loss_ema", "val_acc1_ema", "val_acc5_ema", "val_acc1"} <= r.keys()
                                     for r in records)
    assert records[-1]["val_loss_ema"] != records[-1]["val_loss"]
    tags = scalars(ema_run)
    assert [value for _, value in tags["val_ema/acc1"]] == pytest.approx([r["val_acc1_ema"] for r in records])

    last = ckpt.list_checkpoints(ema_run)[-1]
    average = load_file(str(last / ckpt.EMA_WEIGHTS))
    exported = load_file(str(ema_run / "model" / "model.safetensors"))
    assert exported.keys() == average.keys() and all(torch.equal(exported[n], average[n]) for n in average)
    assert "moving average of the trained weights (decay 0.6" in (ema_run / "model" / "README.md").read_text()

    assert export_main([str(last), "--output", str(tmp_path / "exported")]) == 0
    again = load_file(str(tmp_path / "exported" / "model.safetensors"))
    assert all(torch.equal(again[n], average[n]) for n in average)

    data = write(tmp_path / "data.toml", data_toml(tiny_folder))
    capsys.readouterr()
    assert evaluate_command.main([str(ema_run / "model"), "--data-cfg", str(data), "--batch-size", "8",
                                  "--label-smoothing", "0.1"]) == 0
    assert f"loss {records[-1]['val_loss_ema']:.4f}" in capsys.readouterr().out


def test_killed_mid_epoch_then_rerun_gives_the_same_metrics_and_exports_the_trained_weights(tiny_folder, tmp_path):
    """The average and its update count come back from the checkpoint: the resumed run's
    metrics, EMA ones included, are the uninterrupted run's; export = "trained" (the default)
    exports the trained weights, not the average."""
    args = checkpointing_configs(tmp_path, tiny_folder, every_steps=4, max_epochs=2) + EMA
    reference = launched_run(args, tmp_path / "reference").dir
    out = tmp_path / "out"
    newest = kill_after_checkpoint(args, out, step=4)
    assert_mid_epoch(newest)
    assert_rerun_reproduces(args, out, newest, reference)
    assert "val_acc1_ema" in read_metrics(out / "metrics.jsonl")[-1]

    last = ckpt.list_checkpoints(reference)[-1]
    trained, exported = load_file(str(last / "model.safetensors")), load_file(str(reference / "model" /
                                                                                  "model.safetensors"))
    assert all(torch.equal(exported[n], trained[n]) for n in trained)
    assert not torch.equal(exported["fc.weight"], load_file(str(last / ckpt.EMA_WEIGHTS))["fc.weight"])


def test_two_processes_killed_mid_epoch_then_rerun_give_the_same_metrics(tiny_folder, tmp_path):
    """On 2 processes (gloo) the average is kept on each, stored once, restored on both, and the
    resumed run's metrics are the uninterrupted run's."""
    args = run_configs(tmp_path, tiny_folder, tiny_train_toml(max_epochs=2, lr=0.02), workers=1) + EMA
    cache = str(tmp_path / "cache")
    reference = launched_run(args, tmp_path / "reference", accelerate_launch(2, port=free_port()),
                             XDG_CACHE_HOME=cache).dir
    records = read_metrics(reference / "metrics.jsonl")
    assert len(records) == 2 and records[-1]["val_samples"] == 15 and "val_acc1_ema" in records[-1]
    out = tmp_path / "out"
    newest = kill_after_checkpoint(args, out, step=2, launcher=accelerate_launch(2, port=free_port()),
                                   XDG_CACHE_HOME=cache)
    assert_mid_epoch(newest)
    assert stored_updates(newest / ckpt.EMA_WEIGHTS) == 2
    assert_rerun_reproduces(args, out, newest, reference, accelerate_launch(2, port=free_port()),
                            XDG_CACHE_HOME=cache)


def test_buffers_copy_averages_the_parameters_only():
    """buffers = "copy": the BatchNorm statistics are the trained model's after each update, while
    the parameters are averaged; "average" averages both."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    averages = {mode: WeightAverage(model, EmaConfig(enabled=True, decay=0.5, buffers=mode))
                for mode in ("copy", "average")}
    for _ in range(2):
        with torch.no_grad():
            model(torch.randn(8, 3) * 3 + 1)  # moves the running statistics
            model[0].weight.add_(1.0)
        for average in averages.values():
            average.update()
    copied, averaged = averages["copy"].module, averages["average"].module
    assert torch.equal(copied[1].running_mean, model[1].running_mean)
    assert not torch.allclose(averaged[1].running_mean, model[1].running_mean)
    for module in (copied, averaged):  # update 1 copies, update 2 halves the last step of +1
        torch.testing.assert_close(module[0].weight, model[0].weight - 0.5)


def test_exporting_an_average_that_is_not_kept_is_a_one_line_error(tiny_folder, tmp_path, capsys):
    args = checkpointing_configs(tmp_path, tiny_folder) + ["--set", "train.ema.export=ema",
                                                           "--output-dir", str(tmp_path / "o")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.ema.export = 'ema' needs train.ema.enabled = true" in err[0]
    assert str(tmp_path / "train.toml") in err[0]


def test_the_checkpoint_names_its_average_in_the_manifest(ema_run):
    """The average is covered by the checkpoint's checksums like every other file."""
    manifest = json.loads((ckpt.list_checkpoints(ema_run)[-1] / ckpt.MANIFEST).read_text())
    assert ckpt.EMA_WEIGHTS in manifest["files"]
