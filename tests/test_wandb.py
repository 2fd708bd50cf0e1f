"""Weights & Biases (``[log] wandb_on``) in offline mode, read back from the run's files: the
same scalars and config as TensorBoard, the run named after the run directory, and a resumed
run continuing the same W&B run with every step once. (That only the main process of several
logs is tested in test_seed_features.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import wandb
from accelerate import PartialState
from helpers import checkpointing_configs as configs
from helpers import run_train
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from wandb_offline import offline_runs

from train import wandb_tracking
from train.cli import main
from train.config import LogConfig
from train.errors import UserError
from train.rundir import read_metrics
from train.tracking import TRACKER_FOLDER

WANDB = ["--set", "train.log.wandb_on=true", "--set", 'train.log.wandb_project="reproduce_resnet"']
# A constant lr: extending the run then leaves the steps it trains again exactly as they were.
CONSTANT_LR = ["--set", 'train.lr_scheduler={name="constant"}']
# The same in both attempts on the CPU; the others measure time.
EXACT_TAGS = ["train/loss", "train/lr", "train/grad_norm", "val/loss", "val/acc1", "val/acc5", "train/epoch_loss"]
TIMED_TAGS = ["train/images_per_s", "train/peak_rss_gib", "time/epoch_s", "time/train_s"]


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard shows for the run."""
    accumulator = EventAccumulator(str(run_dir / TRACKER_FOLDER))
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def assert_same_series(logged: list[tuple[int, float]], expected: list[tuple[int, float]], tag: str) -> None:
    """The same steps, and values equal up to TensorBoard's float32 (for the timings: the steps)."""
    assert [step for step, _ in logged] == [step for step, _ in expected], tag
    if tag in EXACT_TAGS:
        assert [value for _, value in logged] == pytest.approx([value for _, value in expected], rel=1e-6), tag


def test_a_run_and_its_resumption_log_to_one_wandb_run_with_each_step_once(tiny_folder, tmp_path):
    out = tmp_path / "out"
    args = configs(tmp_path, tiny_folder, max_epochs=2) + ["--output-dir", str(out)] + WANDB + CONSTANT_LR
    first = run_train(args, WANDB_MODE="offline")
    assert first.returncode == 0, first.stderr[-3000:]
    (attempt,) = offline_runs(out)
    assert (attempt.name, attempt.project) == ("out", "reproduce_resnet")  # named after the run directory
    assert attempt.config["train.lr"] == 0.02 and attempt.config["train.optim.name"] == "sgd"
    tensorboard = scalars(out)
    for tag in EXACT_TAGS + TIMED_TAGS:  # what TensorBoard got, at the same steps
        assert_same_series(attempt.series(tag), tensorboard[tag], tag)
    assert [v for _, v in attempt.series("val/acc1")] == \
        pytest.approx([r["val_acc1"] for r in read_metrics(out / "metrics.jsonl")])

    # Resumed from an earlier checkpoint (step 4, as after a crash) and extended to 4 epochs:
    # steps 5 and 6 are trained again, and W&B, which holds them, is sent only steps 7 to 12.
    resumed = run_train(args + ["--resume", str(out / "checkpoints" / "00000004"), "--set", "train.max_epochs=4"],
                        WANDB_MODE="offline")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    first_attempt, second = offline_runs(out)
    assert second.run_id == first_attempt.run_id == attempt.run_id and second.name == "out"
    assert [s for s, _ in second.series("train/loss")] == [8, 10, 12]
    assert [s for s, _ in second.series("val/acc1")] == [9, 12]
    tensorboard = scalars(out)  # each step once (a resumed run replaces what came after its checkpoint)
    for tag in EXACT_TAGS + TIMED_TAGS:
        assert_same_series(first_attempt.series(tag) + second.series(tag), tensorboard[tag], tag)


def test_the_seeds_project_keys_name_the_wandb_project():
    assert wandb_tracking.project_name(LogConfig(project="reproduce_resnet")) == "reproduce_resnet"
    assert wandb_tracking.project_name(LogConfig(project="a", wandb_project="b")) == "b"


def test_asking_for_wandb_without_the_package_names_the_extra(tiny_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(wandb_tracking, "_wandb_installed", lambda: False)
    args = configs(tmp_path, tiny_folder) + ["--output-dir", str(tmp_path / "out")] + WANDB
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {args[3]} (with --set): train.log.wandb_on = true needs the wandb package, which is not "
                   "installed: pip install 'imagenet-trainer[wandb]' (or pip install wandb)")
    assert not (tmp_path / "out").exists()  # stopped before anything started


def test_no_login_online_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no saved login (~/.netrc)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    tracker = wandb_tracking.ResumingWandBTracker(tmp_path, "p")
    with pytest.raises(UserError) as error:
        tracker.start()
    message = str(error.value)
    assert len(message.splitlines()) == 1
    assert message.startswith("Weights & Biases: ") and "WANDB_MODE=offline" in message


def test_wandb_dir_set_by_the_user_holds_wandbs_files(tmp_path, monkeypatch):
    """W&B's convention: WANDB_DIR, when set, is where its files go; the resume state stays in the run."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "scratch"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    (tmp_path / "scratch").mkdir()
    PartialState(cpu=True)  # Accelerate's trackers log through its state
    wandb.teardown()  # W&B keeps its settings per process: drop those of an earlier test (WANDB_MODE=online)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tracker = wandb_tracking.ResumingWandBTracker(run_dir, "p")
    tracker.start()
    tracker.log({"train/loss": 1.5}, step=3)
    tracker.finish()
    # W&B's service process writes the run file: it is complete once the service has ended, as
    # at the end of a training process (a loaded machine showed it without its history before).
    wandb.teardown()
    (attempt,) = offline_runs(tmp_path / "scratch")
    assert attempt.series("train/loss") == [(3, 1.5)]
    assert not (run_dir / "wandb").exists() and (run_dir / wandb_tracking.STATE_FILE).is_file()
