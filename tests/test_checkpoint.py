"""Checkpoints: atomic saves, pruning, automatic resume, exactness after SIGKILL, preemption,
refused configs and damaged checkpoints."""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import tomli_w
from helpers import (
    REPO,
    accelerate_launch,
    assert_mid_epoch,
    assert_rerun_reproduces,
    batches_done,
    clean_env,
    free_port,
    kill_after_checkpoint,
    launched_run,
    run_train,
    without_timing,
    write,
)
from helpers import checkpointing_configs as configs

from train import checkpoint as ckpt
from train.cli import BUILTIN_DATA, BUILTIN_TRAIN, main
from train.config import load_config
from train.preemption import EXIT_PREEMPTED, StopRequests
from train.rundir import read_metrics, write_config


def start_train(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "train", *args], cwd=REPO, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, f"training ended early: {process.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


# ------------------------------------------------------------------------ exact resume


# Checkpoints every 4 steps of 3-step epochs: 4 and 8 inside epochs 2 and 3, 12 at the end. A
# run killed as soon as checkpoint 4 is complete can only have left mid-epoch ones. (Saving a
# checkpoint changes nothing in an SGD run, so its metrics are the reference run's.)
MID_EPOCH_ONLY = 4


@pytest.mark.parametrize("loader", ["hf", "dali"])
def test_sigkill_mid_epoch_then_rerun_gives_the_same_metrics(loader, reference_run, tiny_folder, tmp_path):
    args = configs(tmp_path, tiny_folder, loader, every_steps=MID_EPOCH_ONLY)
    reference = reference_run
    if loader == "dali":
        reference = launched_run(args, tmp_path / "reference").dir
    out = tmp_path / "out"
    newest = kill_after_checkpoint(args, out, step=4)
    assert_mid_epoch(newest)
    assert_rerun_reproduces(args, out, newest, reference)


@pytest.mark.parametrize("loader", ["hf", "dali"])
def test_two_processes_killed_mid_epoch_then_rerun_give_the_same_metrics(loader, request, tmp_path):
    """Both processes resume at their own place in the epoch (and DALI's readers at theirs)."""
    reference = request.getfixturevalue("two_process_run" if loader == "hf" else "two_process_dali_run")
    out, cache = tmp_path / "out", str(tmp_path / "cache")
    newest = kill_after_checkpoint(reference.args, out, step=2, launcher=accelerate_launch(2, port=free_port()),
                                   XDG_CACHE_HOME=cache)
    assert_mid_epoch(newest)
    assert batches_done(newest, rank=1) == batches_done(newest, rank=0)
    assert_rerun_reproduces(reference.args, out, newest, reference.dir, accelerate_launch(2, port=free_port()),
                            XDG_CACHE_HOME=cache)


def test_explicit_resume_continues_from_that_checkpoint(reference_run, tiny_folder, tmp_path, capsys):
    """--resume CHECKPOINT into a new run directory: the records before it come with it, the
    steps after it are trained again, and the result is the uninterrupted run's."""
    chosen = reference_run / "checkpoints" / "00000010"  # inside epoch 4, after batch 1 of 3
    args = configs(tmp_path, tiny_folder) + ["--output-dir", str(tmp_path / "out"), "--resume", str(chosen)]
    assert main(args) == 0
    assert f"resumed from {chosen}: epoch 4, batch 1" in capsys.readouterr().out
    assert without_timing(read_metrics(tmp_path / "out" / "metrics.jsonl")) == \
        without_timing(read_metrics(reference_run / "metrics.jsonl"))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "out")] == ["00000012"]  # its own, after step 10


def test_kills_at_random_moments_never_leave_a_damaged_checkpoint(tiny_folder, tmp_path):
    """Checkpoints are written after every step, so random kills often land inside a save."""
    out = tmp_path / "out"
    args = configs(tmp_path, tiny_folder, max_epochs=6) + ["--output-dir", str(out),
                                                           "--set", "train.log.checkpoint_every_steps=1"]
    rng = random.Random(1234)
    for _ in range(3):
        process = start_train(args)
        first = ckpt.latest_valid_checkpoint(out)
        wait_for(lambda first=first: ckpt.latest_valid_checkpoint(out) not in (None, first), process)
        time.sleep(rng.uniform(0.0, 0.3))
        process.send_signal(signal.SIGKILL)
        process.communicate()
        for folder in ckpt.list_checkpoints(out):
            assert ckpt.checkpoint_problem(folder) is None, folder
    result = run_train(args)
    assert result.returncode == 0, result.stderr
    assert [r["epoch"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert not list((out / "checkpoints").glob(ckpt.TMP_PREFIX + "*"))  # leftovers of killed saves are gone


def test_a_save_interrupted_before_its_rename_leaves_the_previous_checkpoint(reference_run, tmp_path, monkeypatch):
    """A failure at the last moment of a save (after every file is written) must not count as a checkpoint."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    before = ckpt.latest_valid_checkpoint(run)

    class Boom(Exception):
        pass

    def explode(folder):
        raise Boom

    monkeypatch.setattr(ckpt, "_fsync_tree", explode)
    trainer = ckpt.read_trainer_state(before)
    fake_accelerator = type("A", (), {"is_main_process": True, "process_index": 0, "num_processes": 1,
                                      "wait_for_everyone": lambda self: None,
                                      "save_state": lambda self, path: Path(path, "model.safetensors")
                                      .write_bytes(b"x")})()
    scheduler = type("S", (), {"state_dict": lambda self: {}})()
    with pytest.raises(Boom):
        ckpt.save(fake_accelerator, run, ckpt.TrainerState(epoch=trainer.epoch, step=trainer.step + 100),
                  ckpt.EpochState(), scheduler, keep_last=2)
    assert ckpt.latest_valid_checkpoint(run) == before
    assert list((run / "checkpoints").glob(ckpt.TMP_PREFIX + "*"))  # the partial save is only a staging folder


# -------------------------------------------------------------------------- preemption


def test_checkpoint_every_minutes_writes_checkpoints_on_the_wall_clock(tiny_folder, tmp_path, capsys):
    """An interval shorter than any step: every agreement between the processes finds it past,
    so each writes a checkpoint. They agree at the first step, then every log_freq (2) steps
    when steps are fast: steps 1 and 2, then the run's end at 3 (the interval itself, and who
    reads the clock, are checked with 2 processes in test_optim_distributed.py)."""
    args = configs(tmp_path, tiny_folder, max_epochs=1) + [
        "--output-dir", str(tmp_path / "out"), "--set", "train.log.checkpoint_every_steps=0",
        "--set", "train.log.checkpoint_every_minutes=1e-9"]
    assert main(args) == 0
    written = re.findall(r"^checkpoint: .*/(\d+)$", capsys.readouterr().out, re.M)
    assert written == ["00000001", "00000002", "00000003"]


def test_sigterm_checkpoints_and_exits_with_the_preempted_status(reference_run, tiny_folder, tmp_path):
    out = tmp_path / "out"
    args = configs(tmp_path, tiny_folder) + ["--output-dir", str(out), "--set", "train.log.checkpoint_every_steps=0"]
    process = start_train(args)
    wait_for(lambda: (out / "train.log").exists() and "epoch 2/4 step" in (out / "train.log").read_text(), process)
    process.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    process.send_signal(signal.SIGTERM)  # a second signal during the stop changes nothing
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == EXIT_PREEMPTED, stderr
    assert "preempted" in stderr
    saved = ckpt.latest_valid_checkpoint(out)
    assert saved is not None and not (out / "model").exists()
    result = run_train(args)
    assert result.returncode == 0, result.stderr
    assert without_timing(read_metrics(out / "metrics.jsonl")) == \
        without_timing(read_metrics(reference_run / "metrics.jsonl"))


LATE_SIGNAL = """
import os, signal, sys
from train.preemption import StopRequests
stopping = StopRequests().install()
os.kill(os.getpid(), signal.SIGUSR1)  # the stop request: checkpoint, then exit 75
stopping.uninstall()
print("handlers put away", flush=True)
os.kill(os.getpid(), signal.SIGTERM)  # as torchrun's agent sends once another worker has ended
sys.exit(75)
"""


def test_a_late_stop_signal_does_not_kill_a_process_on_its_way_to_exit_75():
    result = subprocess.run([sys.executable, "-c", LATE_SIGNAL], cwd=REPO, env=clean_env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == EXIT_PREEMPTED, (result.returncode, result.stderr)
    assert "handlers put away" in result.stdout and result.stderr.count("received SIGUSR1") == 1


def test_without_a_stop_request_the_earlier_handlers_come_back():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
    StopRequests().install().uninstall()
    assert {sig: signal.getsignal(sig) for sig in before} == before


# ----------------------------------------------------------------------- resume rules


def test_same_command_on_a_finished_run_changes_nothing_and_longer_runs_continue(reference_run, tmp_path, tiny_folder):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    args = configs(tmp_path, tiny_folder) + ["--output-dir", str(run)]
    assert main(args) == 0
    assert read_metrics(run / "metrics.jsonl") == read_metrics(reference_run / "metrics.jsonl")
    assert main(args + ["--set", "train.max_epochs=5", "--set", "train.log.log_freq=1"]) == 0  # safe keys
    assert [r["epoch"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4, 5]


def test_a_different_config_is_refused_with_the_differing_keys(reference_run, tmp_path, tiny_folder, capsys):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    args = configs(tmp_path, tiny_folder) + ["--output-dir", str(run), "--set", "train.lr=0.5",
                                             "--set", "train.optim.momentum=0.5"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "train.lr: 0.02 -> 0.5" in err and "train.optim.momentum: 0.9 -> 0.5" in err and "--output-dir" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # nothing touched


def test_a_config_stored_before_a_key_existed_is_no_different(tmp_path):
    """A run directory written before a table was added to the schema ([train.ema] here) resumes
    under the same files: the missing keys count as their defaults, a changed one still differs."""
    text = write_config(tmp_path, load_config(BUILTIN_DATA, BUILTIN_TRAIN)).read_text()
    now = tomllib.loads(text)
    del now["train"]["ema"]
    older = write(tmp_path / "older.toml", tomli_w.dumps(now))
    now = tomllib.loads(text)
    assert ckpt.config_differences(ckpt._read_config(older), now) == []
    now["train"]["ema"]["enabled"] = True
    assert ckpt.config_differences(ckpt._read_config(older), now) == ["train.ema.enabled: False -> True"]


def test_a_run_killed_before_its_first_checkpoint_starts_over(tmp_path, tiny_folder):
    run = tmp_path / "run"
    args = configs(tmp_path, tiny_folder, max_epochs=1) + ["--output-dir", str(run)]
    run.mkdir()
    import tomli_w

    from train.config import load_config, to_dict
    (run / "config.toml").write_text(tomli_w.dumps(to_dict(load_config(args[1], args[3]))))
    (run / "metrics.jsonl").write_text('{"epoch": 99}\n')  # partial output of the killed attempt
    assert main(args) == 0
    assert [r["epoch"] for r in read_metrics(run / "metrics.jsonl")] == [1]


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(reference_run, tmp_path, tiny_folder, capsys):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    folders = ckpt.list_checkpoints(run)
    newest, previous = folders[-1], folders[-2]
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    args = configs(tmp_path, tiny_folder) + ["--output-dir", str(run), "--set", "train.max_epochs=5"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"checkpoint {newest} is damaged" in out and f"resumed from {previous}" in out


def test_the_resume_line_names_the_checkpoints_own_step(reference_run, tmp_path, tiny_folder, capsys):
    """3 steps per epoch, a checkpoint every 2: 00000010 is epoch 4 after its first batch."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    checkpoint = run / "checkpoints" / "00000010"
    assert main(configs(tmp_path, tiny_folder) + ["--output-dir", str(run), "--resume", str(checkpoint)]) == 0
    assert f"resumed from {checkpoint}: epoch 4, batch 1, step 10\n" in capsys.readouterr().out


def test_explicit_resume_of_an_unusable_checkpoint_is_an_error(tmp_path, tiny_folder, capsys):
    args = configs(tmp_path, tiny_folder) + ["--output-dir", str(tmp_path / "r"), "--resume", str(tmp_path)]
    assert main(args) == 2
    assert "not a usable checkpoint" in capsys.readouterr().err


def test_pruning_keeps_the_newest_and_the_best(tmp_path):
    accs = {2: 50.0, 4: 90.0, 5: 90.0, 6: 60.0, 8: 70.0, 9: 10.0}
    for step in range(1, 11):
        folder = tmp_path / "checkpoints" / f"{step:08d}"
        folder.mkdir(parents=True)
        # Only checkpoints written right after an evaluation carry that evaluation's step.
        metrics = [{"step": s, "val_acc1": a} for s, a in sorted(accs.items()) if s <= step]
        (folder / ckpt.TRAINER_STATE).write_text(json.dumps({"metrics": metrics}))
    ckpt.prune(tmp_path, keep_last=2)
    # 9 and 10 are newest; 5 is the best (a tie with 4 goes to the later one); 7 carries 6's
    # accuracy but not its weights, so it cannot be the best.
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["00000005", "00000009", "00000010"]
