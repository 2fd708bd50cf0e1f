"""`recompute_bn_before_final_eval`: BatchNorm statistics recomputed over `num_samples_for_stats`
training images before the last evaluation, for any optimizer, as the seed does; said in the
metrics and the model card, and kept in the exported model."""

from __future__ import annotations

import pytest
from helpers import data_toml, tiny_train_toml, without_timing, write
from safetensors.torch import load_file

from train.cli import main
from train.evaluate import main as evaluate_main
from train.rundir import read_metrics

# 24 training images at batch 8: 3 steps an epoch; 16 images of statistics are 2 batches.
SCHEDULE_FREE = ['train.optim={name = "sgd-schedule-free", momentum = 0.9, warmup_epochs = 1}',
                 'train.lr_scheduler={name = "constant"}']


def run(folder, tmp, recompute: bool, *overrides: str):
    data = write(tmp / "data.toml", data_toml(folder))
    train = write(tmp / "train.toml", tiny_train_toml(max_epochs=2, num_samples_for_stats=16,
                                                      recompute_bn_before_final_eval=str(recompute).lower()))
    args = ["--data-cfg", str(data), "--train-cfg", str(train), "--output-dir", str(tmp / "run")]
    for override in overrides:
        args += ["--set", override]
    assert main(args) == 0
    return tmp / "run"


@pytest.fixture(scope="module")
def runs(tiny_folder, tmp_path_factory):
    return {recompute: run(tiny_folder, tmp_path_factory.mktemp(f"bn_{recompute}"), recompute)
            for recompute in (True, False)}


def test_only_the_last_evaluation_changes(runs):
    on, off = (read_metrics(runs[key] / "metrics.jsonl") for key in (True, False))
    assert [r["bn_stats_samples"] for r in on] == [0, 16] and [r["bn_stats_samples"] for r in off] == [0, 0]
    assert without_timing(on[:1]) == without_timing(off[:1])
    assert on[1]["val_loss"] != off[1]["val_loss"]
    assert "BatchNorm statistics recomputed over 16 training samples" in (runs[True] / "train.log").read_text()


def test_the_exported_model_holds_the_statistics_the_last_evaluation_used(runs, tiny_folder, tmp_path, capsys):
    # Recomputing starts the count afresh: 2 batches, against the 6 training steps of the run without it.
    for recompute, batches in ((True, 2), (False, 6)):
        weights = load_file(str(runs[recompute] / "model" / "model.safetensors"))
        assert weights["bn1.num_batches_tracked"].item() == batches
    # Evaluated again, the exported model gives the last record's figures: the statistics were in
    # the model when the run evaluated it.
    last = read_metrics(runs[True] / "metrics.jsonl")[-1]
    data = write(tmp_path / "data.toml", data_toml(tiny_folder))
    assert evaluate_main([str(runs[True] / "model"), "--data-cfg", str(data), "--batch-size", "8",
                          "--label-smoothing", "0.1"]) == 0
    out = capsys.readouterr().out
    assert f"top-1 {last['val_acc1']:.2f}%" in out and f"loss {last['val_loss']:.4f}" in out


def test_the_model_card_says_so(runs):
    said = "BatchNorm statistics recomputed over 16 training images before the last evaluation"
    assert said in (runs[True] / "model" / "README.md").read_text()
    assert "BatchNorm" not in (runs[False] / "model" / "README.md").read_text()


def test_schedule_free_recomputes_once_per_evaluation_with_the_key_on(tiny_folder, tmp_path):
    log = (run(tiny_folder, tmp_path, True, *SCHEDULE_FREE) / "train.log").read_text()
    assert log.count("BatchNorm statistics recomputed") == 2
    assert log.count("BatchNorm statistics recomputed for the averaged weights over 16 training samples") == 2
