"""TensorBoard logging, console progress and the end-of-run summary, read back from real runs.

The event files are read with TensorBoard's own reader (EventAccumulator), as TensorBoard
itself would show them.
"""

from __future__ import annotations

import logging
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, clean_env, data_toml, run_train, tiny_train_toml, write
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from train import checkpoint as ckpt
from train.progress import EpochProgress, format_duration
from train.rundir import read_metrics
from train.tracking import MEMORY_WARNING_SHARE, TRACKER_FOLDER, flatten_config, memory_report

TRAIN_TAGS = {"train/loss", "train/lr", "train/images_per_s", "train/grad_norm", "train/peak_rss_gib"}
EVAL_TAGS = {"val/loss", "val/acc1", "val/acc5", "train/epoch_loss", "train/epoch", "time/epoch_s", "time/train_s",
             "time/eval_s", "time/eta_s", "cost/gpu_hours"}


def configs(tmp_path: Path, folder: Path, **train_overrides) -> list[str]:
    data = write(tmp_path / "data.toml", data_toml(folder))
    train = write(tmp_path / "train.toml", tiny_train_toml(**train_overrides))
    return ["--data-cfg", str(data), "--train-cfg", str(train)]


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    accumulator = EventAccumulator(str(run_dir / TRACKER_FOLDER))
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def hyperparameters(run_dir: Path) -> dict:
    """The hparams TensorBoard shows for the run (written to a sub-folder of their own)."""
    (event_file,) = (run_dir / TRACKER_FOLDER).glob("*/events.out.tfevents.*")
    folder = event_file.parent
    accumulator = EventAccumulator(str(folder))
    accumulator.Reload()
    content = accumulator.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    return {key: value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind"))
            for key, value in hparams.items()}


@pytest.fixture(scope="module")
def tiny_run(tiny_folder, tmp_path_factory):
    """2 epochs of 3 steps, a log line every 2 steps, gradient clipping at 0.5; stdout is a pipe."""
    tmp = tmp_path_factory.mktemp("tracked")
    out = tmp / "out"
    result = run_train(configs(tmp, tiny_folder, max_epochs=2, grad_clip_norm=0.5) + ["--output-dir", str(out)])
    assert result.returncode == 0, result.stderr
    return out, result


def test_tensorboard_holds_the_training_scalars_at_every_log_step(tiny_run):
    out, result = tiny_run
    logged = scalars(out)
    assert TRAIN_TAGS | EVAL_TAGS <= logged.keys()
    for tag in TRAIN_TAGS:
        assert [step for step, _ in logged[tag]] == [2, 4, 6], tag
    # The loss is the one the console printed at the same step (epoch 2's step 1 is step 4).
    printed = {(int(e) - 1) * 3 + int(s): float(loss) for e, s, loss in
               re.findall(r"epoch (\d)/2 step (\d)/3 loss ([\d.]+)", result.stdout)}
    assert printed.keys() == {2, 4, 6}
    assert [round(v, 4) for _, v in logged["train/loss"]] == [printed[s] for s in (2, 4, 6)]
    assert all(v > 0 for _, v in logged["train/images_per_s"])
    assert all(0 < v <= 0.5 + 1e-4 for _, v in logged["train/grad_norm"])  # clipped at 0.5
    assert all(0.05 < v < 64 for _, v in logged["train/peak_rss_gib"])  # a plausible process size in GiB


def test_tensorboard_evaluations_equal_the_metrics_file(tiny_run):
    out, _ = tiny_run
    logged = scalars(out)
    records = read_metrics(out / "metrics.jsonl")
    pairs = {"val/loss": "val_loss", "val/acc1": "val_acc1", "val/acc5": "val_acc5", "train/epoch_loss": "train_loss",
             "train/epoch": "epoch", "time/epoch_s": "epoch_time_s", "time/train_s": "train_time_s",
             "time/eval_s": "eval_time_s", "time/eta_s": "eta_s", "cost/gpu_hours": "gpu_hours"}
    for tag, key in pairs.items():
        assert [step for step, _ in logged[tag]] == [r["step"] for r in records] == [3, 6]
        assert [v for _, v in logged[tag]] == pytest.approx([r[key] for r in records], rel=1e-6), tag


def test_the_config_is_stored_as_hyperparameters(tiny_run):
    out, _ = tiny_run
    hparams = hyperparameters(out)
    assert hparams["train.lr"] == pytest.approx(0.05)
    assert hparams["train.optim.name"] == "sgd"
    assert hparams["train.grad_clip_norm"] == pytest.approx(0.5)
    assert hparams["data.num_classes"] == 3


def test_output_without_a_terminal_has_no_carriage_returns_and_ends_with_a_summary(tiny_run):
    out, result = tiny_run
    assert "\r" not in result.stdout and "\r" not in result.stderr
    assert re.search(r"epoch 1/2 step 2/3 loss [\d.]+ lr [\d.e-]+ \d+ img/s, epoch eta \d:\d\d:\d\d, "
                     r"run eta \d:\d\d:\d\d", result.stdout)
    summary = result.stdout[result.stdout.index("finished:"):]
    assert "finished: epoch 2/2, 6 steps" in summary
    last = read_metrics(out / "metrics.jsonl")[-1]
    assert f"top-1 {last['val_acc1']:.2f}%" in summary and f"top-5 {last['val_acc5']:.2f}%" in summary
    run = out.resolve()
    for where in (run, run / "checkpoints", run / "model", run / TRACKER_FOLDER):
        assert str(where) in summary
    assert "00000006" in summary  # the checkpoints kept are named
    assert len(summary.splitlines()) <= 12  # one screen


def test_a_resumed_run_shows_each_step_once_in_tensorboard(tiny_folder, tmp_path):
    """The killed attempt logged steps after its last checkpoint; the rerun logs them again."""
    out = tmp_path / "out"
    args = configs(tmp_path, tiny_folder, max_epochs=4, lr=0.02) + ["--output-dir", str(out),
                                                                    "--set", "train.log.log_freq=1",
                                                                    "--set", "train.log.checkpoint_every_steps=4"]
    process = subprocess.Popen([sys.executable, "-m", "train", *args], cwd=REPO, env=clean_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def logged_beyond_checkpoint() -> bool:
        newest = ckpt.latest_valid_checkpoint(out)
        if newest is None or not (out / TRACKER_FOLDER).is_dir():
            return False
        return max((s for s, _ in scalars(out).get("train/loss", [])), default=0) > int(newest.name)

    deadline = time.monotonic() + 180
    while not logged_beyond_checkpoint():
        assert process.poll() is None, f"training ended early: {process.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert logged_beyond_checkpoint(), "nothing was logged after the last checkpoint: the test proves nothing"
    assert not (out / "model").exists()

    result = run_train(args)
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stdout
    logged = scalars(out)
    assert [s for s, _ in logged["train/loss"]] == list(range(1, 13))
    assert [s for s, _ in logged["val/acc1"]] == [3, 6, 9, 12]
    records = read_metrics(out / "metrics.jsonl")
    assert [v for _, v in logged["val/acc1"]] == pytest.approx([r["val_acc1"] for r in records])


def test_with_two_processes_only_the_main_process_writes_events(two_process_run):
    out = two_process_run.dir
    assert "on 2 process(es)" in two_process_run.stdout
    assert len(list((out / TRACKER_FOLDER).glob("events.out.tfevents.*"))) == 1
    assert len(list((out / TRACKER_FOLDER).glob("*/events.out.tfevents.*"))) == 1  # the hyperparameters
    logged = scalars(out)
    assert [s for s, _ in logged["train/loss"]] == [2, 4, 6]  # log_freq 2, each once
    assert [s for s, _ in logged["val/acc1"]] == [3, 6]
    records = read_metrics(out / "metrics.jsonl")
    assert [v for _, v in logged["val/acc1"]] == pytest.approx([r["val_acc1"] for r in records])
    assert "\r" not in two_process_run.stdout and "\r" not in two_process_run.stderr
    # Each process's peak memory, gathered by the main process, which alone prints.
    assert re.search(r"^peak memory at step 2: [\d.]+-[\d.]+ GiB per process", two_process_run.stdout, re.MULTILINE)


# --------------------------------------------------------------------------- small parts


def test_flatten_config_gives_dotted_scalar_hyperparameters():
    flat = flatten_config({"train": {"lr": 0.1, "optim": {"name": "sgd", "nesterov": False}, "sizes": [1, 2]},
                           "data": {"classes": ("a", "b"), "workers": 4}})
    assert flat == {"train.lr": 0.1, "train.optim.name": "sgd", "train.optim.nesterov": False,
                    "train.sizes": "[1, 2]", "data.classes": "('a', 'b')", "data.workers": 4}


def test_format_duration():
    assert format_duration(3725.2) == "1:02:05"
    assert format_duration(59.6) == "0:01:00"
    assert format_duration(30 * 3600) == "30:00:00"


class FakeTerminal:
    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def test_the_terminal_bar_shows_loss_throughput_and_time_left(monkeypatch):
    monkeypatch.setattr(sys, "stdout", FakeTerminal())
    progress = EpochProgress(epoch=0, max_epochs=3, total_steps=10, global_batch=32, enabled=True)
    assert progress.bar is not None
    progress.bar.fp = FakeTerminal()
    progress.update(1, None, 0.1)
    progress.update(2, 1.2345, 0.1)
    assert progress.bar.n == 2
    postfix = progress.bar.postfix
    assert "loss=1.2345" in postfix and "img/s=" in postfix and "run eta=" in postfix
    assert progress.images_per_s > 0
    progress.close()


def test_plain_lines_measure_throughput_between_log_steps(monkeypatch):
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("train")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    clock = iter([100.0, 102.0, 103.2])  # start, log at step 4, log at step 6
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    try:
        progress = EpochProgress(epoch=1, max_epochs=3, total_steps=10, global_batch=16, enabled=True, start=2)
        progress.update(4, 0.5, 0.01)  # 2 steps of 16 images in 2 s
        assert progress.images_per_s == pytest.approx(16)
        progress.update(6, 0.4, 0.01)  # 2 steps in 1.2 s
        assert progress.images_per_s == pytest.approx(32 / 1.2)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    # 4 steps in 3.2 s since the (resumed) start: 4 steps left in this epoch, 10 in the last one.
    assert records[-1] == "epoch 2/3 step 6/10 loss 0.4000 lr 0.01 27 img/s, epoch eta 0:00:03, run eta 0:00:11"


def test_peak_memory_is_logged_after_the_first_steps_and_at_each_evaluation(tiny_run):
    out, result = tiny_run
    log = (out / "train.log").read_text()
    for when in ("at step 2", "at the evaluation of epoch 1", "at the evaluation of epoch 2"):
        assert re.search(rf"peak memory {when}: [\d.]+ GiB per process, at most \d+% of [\d.]+ GiB \(process 0\)",
                         log), when
    assert "warning: process" not in log


def test_memory_report_warns_about_processes_near_their_device_limit():
    gib = 2**30
    line, warning = memory_report("at step 100", [(10 * gib, 16 * gib), (15 * gib, 16 * gib), (12 * gib, 16 * gib)])
    assert line == "peak memory at step 100: 10.00-15.00 GiB per process, at most 94% of 16.0 GiB (process 1)"
    assert warning.startswith("warning: process(es) 1 used more than 90% of their memory (15.00 of 16.0 GiB)")
    assert "train.batch_size" in warning
    below = MEMORY_WARNING_SHARE * 16 * gib - 1
    assert memory_report("at step 100", [(below, 16 * gib)])[1] is None
