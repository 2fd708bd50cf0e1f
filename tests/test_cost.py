"""A run's cost while it runs: time left and device-hours at each evaluation, total at the end.

Read back from real runs (metrics.jsonl, TensorBoard, the log); the arithmetic of ``cost.py``
is checked on its own below.
"""

from __future__ import annotations

import re

import pytest
from helpers import data_toml, run_train, tiny_train_toml, write
from test_tracking import scalars

from train.cost import device_hours, estimate_run, evaluations_left, time_left_s
from train.rundir import read_metrics


def configs(tmp_path, folder, **train_overrides) -> list[str]:
    data = write(tmp_path / "data.toml", data_toml(folder))
    train = write(tmp_path / "train.toml", tiny_train_toml(**train_overrides))
    return ["--data-cfg", str(data), "--train-cfg", str(train)]


def spent_hours(records: list[dict], processes: int) -> list[float]:
    """Device-hours after each record: its training time plus every evaluation so far, per process."""
    evaluations = [sum(r["eval_time_s"] for r in records[:i + 1]) for i in range(len(records))]
    return [(r["train_time_s"] + e) * processes / 3600 for r, e in zip(records, evaluations, strict=True)]


@pytest.fixture(scope="module")
def extended_run(tiny_folder, tmp_path_factory):
    """A 2-epoch run, then the same command with max_epochs 3: it resumes from the finished
    run's checkpoint and trains one more epoch."""
    tmp = tmp_path_factory.mktemp("cost")
    args = configs(tmp, tiny_folder, max_epochs=2) + ["--output-dir", str(tmp / "out")]
    first = run_train(args)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_train(args + ["--set", "train.max_epochs=3"])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout
    return tmp / "out", first, second


def test_each_evaluation_records_the_time_left_and_the_hours_spent(extended_run):
    out, _, _ = extended_run
    records = read_metrics(out / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert all(r["eval_time_s"] > 0 for r in records)
    # The resumed attempt counts on from the evaluations the checkpoint recorded.
    assert [r["gpu_hours"] for r in records] == pytest.approx(spent_hours(records, 1), rel=1e-9)
    # Time left: the epochs still to train at the last epoch's pace, and their evaluations.
    (first, second, third) = records
    assert first["eta_s"] == pytest.approx(first["epoch_time_s"] + first["eval_time_s"], rel=1e-9)  # of 2 epochs
    assert third["eta_s"] == 0.0  # of 3 epochs: nothing left


def test_tensorboard_and_the_log_show_the_cost_at_each_evaluation(extended_run):
    out, first, second = extended_run
    records = read_metrics(out / "metrics.jsonl")
    logged = scalars(out)
    for tag, key in (("time/eta_s", "eta_s"), ("cost/gpu_hours", "gpu_hours"), ("time/eval_s", "eval_time_s")):
        assert [s for s, _ in logged[tag]] == [3, 6, 9], tag
        assert [v for _, v in logged[tag]] == pytest.approx([r[key] for r in records], rel=1e-6), tag
    printed = re.findall(r"epoch (\d)/\d step \d+: .* run eta (\d+:\d\d:\d\d), ([\d.]+) process-hours so far",
                         first.stdout + second.stdout)
    assert [int(epoch) for epoch, _, _ in printed] == [1, 2, 3]
    assert [float(hours) for _, _, hours in printed] == pytest.approx([r["gpu_hours"] for r in records], abs=6e-4)
    # The summary of each attempt gives the total so far.
    assert f"cost         {records[-1]['gpu_hours']:.3f} process-hours in all" in second.stdout
    assert f"cost         {records[1]['gpu_hours']:.3f} process-hours in all" in first.stdout


def test_with_two_processes_the_hours_count_both(two_process_run):
    records = read_metrics(two_process_run.dir / "metrics.jsonl")
    assert [r["gpu_hours"] for r in records] == pytest.approx(spent_hours(records, 2), rel=1e-9)
    assert "process-hours in all" in two_process_run.stdout


# --------------------------------------------------------------------------- the arithmetic


def test_evaluations_left_counts_every_eval_freq_epoch_and_the_last():
    assert evaluations_left(0, 90, 1) == 90
    assert evaluations_left(0, 10, 4) == 3  # after epochs 4, 8 and 10
    assert evaluations_left(8, 10, 4) == 1
    assert evaluations_left(10, 10, 4) == 0


def test_time_left_and_hours():
    assert time_left_s(100, 0.5, 2, 10.0) == 70.0
    assert device_hours(1800, 8) == 4.0


def test_the_estimate_counts_requeues_under_a_time_limit():
    # 90 epochs of 5005 steps at 0.2 s, 90 evaluations of 60 s: 95,490 s, about 26.5 h.
    estimate = estimate_run(5005, 90, 1, 0.2, 60.0, 4, time_limit_s=24 * 3600)
    assert estimate.steps == 450_450
    assert estimate.wall_s == pytest.approx(450_450 * 0.2 + 90 * 60)
    assert estimate.device_hours == pytest.approx(estimate.wall_s * 4 / 3600)
    assert estimate.requeues == 1
    assert estimate_run(5005, 90, 1, 0.2, 60.0, 4, time_limit_s=None).requeues is None
    assert estimate_run(10, 1, 1, 1.0, 0.0, 1, time_limit_s=10.0).requeues == 0  # fits exactly
