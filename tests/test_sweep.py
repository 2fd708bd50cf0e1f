"""Seed sweeps: ``python -m train.sweep`` checks the grid, writes the task files and submits one job
array plus a report job that depends on it; the array's tasks run through the profile scripts.

SLURM is simulated as in test_launch.py: the sbatch stand-in queues jobs (``$STANDIN_QUEUE``) and
tests/slurm_queue.py runs the queue as SLURM would (array tasks, requeues, afterany). The batch
scripts are real; Python behind them is either a stand-in that records its arguments (fast: what
each task was told to do) or the real trainer (a small sweep end to end, one task preempted).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, clean_env, data_toml, tiny_train_toml, write
from slurm_queue import queued_jobs, run_queue

from train.preemption import EXIT_PREEMPTED
from train.rundir import read_metrics
from train.sweep import main

STANDINS = REPO / "tests" / "slurm_standins"
SEED_CONFIGS = ["resnet50-sgd", "resnet50-adam", "resnet50-sf-sgd", "resnet50-sgd-sam-v1", "resnet50-sgd-sam-v2"]

# Python as the batch scripts start it, recording what it was asked to run; task
# $FAKE_PREEMPT_TASK ends the first time as a preempted trainer does (75), the next time as a finished one.
FAKE_PYTHON = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$FAKE_RECORD/${SLURM_ARRAY_TASK_ID:-job$SLURM_JOB_ID}.$SLURM_RESTART_COUNT.args"
if [[ -n "${FAKE_PREEMPT_TASK:-}" && "${SLURM_ARRAY_TASK_ID:-}" == "$FAKE_PREEMPT_TASK" && $SLURM_RESTART_COUNT == 0 ]]
then exit 75; fi
"""


@pytest.fixture
def submit_root(tmp_path, tiny_folder) -> Path:
    """A directory to submit from, as a clone is (launch/ and accelerate_configs/ at its root)."""
    root = tmp_path / "submit"
    root.mkdir()
    (root / "launch").symlink_to(REPO / "launch")
    (root / "accelerate_configs").symlink_to(REPO / "accelerate_configs")
    write(root / "data.toml", data_toml(tiny_folder))
    write(root / "a.toml", tiny_train_toml(max_epochs=2))
    write(root / "b.toml", tiny_train_toml(max_epochs=2, lr=0.02))
    (root / "queue").mkdir()
    return root


def slurm_env(root: Path, **extra) -> dict:
    return clean_env(**{"PATH": f"{STANDINS}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                        "PYTHON": sys.executable, "STANDIN_QUEUE": str(root / "queue"), "STANDIN_GPUS_PER_NODE": "1",
                        "STANDIN_GPU_CAPS": "8.0", "STANDIN_SCONTROL_LOG": str(root / "scontrol.log"), **extra})


@pytest.fixture
def sweep(monkeypatch, capsys):
    """``python -m train.sweep ARGS`` run from a folder with an environment, in this process (its
    checks import torch: a fresh interpreter per call costs many seconds); gives (status, out, err)."""
    def run(root: Path, env: dict, *args: str) -> tuple[int, str, str]:
        monkeypatch.chdir(root)
        for key in set(os.environ) - set(env):
            monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        status = main(list(args))
        out, err = capsys.readouterr()
        return status, out, err
    return run


def grid_args(*extra: str) -> list[str]:
    return ["--profile", "1xGPU", "-A", "acct", "--data-cfg", "data.toml", "--train-cfg", "a.toml", "b.toml",
            "--seeds", "7", "8", "--output-dir", "runs/sweep-t", *extra]


# ------------------------------------------------------------------------- the command itself


def test_dry_run_prints_the_seeds_grid_and_both_sbatch_commands_and_writes_nothing(tmp_path, sweep):
    out = tmp_path / "sweep"
    no_sbatch = clean_env(PATH=os.path.dirname(sys.executable))  # a dry run needs none
    status, printed, _ = sweep(REPO, no_sbatch, "--profile", "4xA40", "--data-cfg", "configs/data/imagenet.toml",
                               "-A", "acct", "--output-dir", str(out), "--dry-run")
    assert status == 0
    tasks = [line.split() for line in printed.splitlines() if line.strip()[:1].isdigit()]
    expected = [(str(i * 3 + j), f"configs/train/{name}.toml", str(seed), str(out / f"{name}-seed{seed}"))
                for i, name in enumerate(SEED_CONFIGS) for j, seed in enumerate((1, 2, 3))]
    assert [tuple(t) for t in tasks] == expected  # the seed's table: 5 recipes x 3 seeds, config-major
    commands = [line[2:] for line in printed.splitlines() if line.startswith("$ ")]
    assert commands == [
        f"sbatch --parsable -A acct --array=0-14 --job-name=sweep --output={out}/slurm-%A_%a.out "
        f"launch/4xA40.sh --sweep {out}",
        f"sbatch --parsable -A acct '--dependency=afterany:<array job id>' --job-name=sweep-report "
        f"--output={out}/report-%j.out launch/sweep_report.sh {out}"]
    assert "dry run: nothing written, nothing submitted" in printed
    assert not out.exists()


def test_submitting_writes_each_tasks_arguments_and_queues_an_array_then_a_dependent_report(submit_root, sweep):
    status, out, err = sweep(submit_root, slurm_env(submit_root), *grid_args("--set", "train.lr=0.03",
                                                                             "--max-running", "2"))
    assert status == 0, err
    sweep_dir = submit_root / "runs" / "sweep-t"
    assert (sweep_dir / "tasks" / "3.args").read_text().splitlines() == [
        "data.toml", "b.toml", "--set", "train.lr=0.03", "--set", "train.reproduce.seed=8",
        "--output-dir", "runs/sweep-t/b-seed8"]
    assert (sweep_dir / "tasks.tsv").read_text().splitlines() == [
        "task\ttrain_cfg\tseed\trun_dir", "0\ta.toml\t7\truns/sweep-t/a-seed7", "1\ta.toml\t8\truns/sweep-t/a-seed8",
        "2\tb.toml\t7\truns/sweep-t/b-seed7", "3\tb.toml\t8\truns/sweep-t/b-seed8"]
    array, report = queued_jobs(submit_root / "queue")
    assert (array.script, array.args) == ("launch/1xGPU.sh", ["--sweep", "runs/sweep-t"])
    assert array.options == {"--account": "acct", "--array": "0-3%2", "--job-name": "sweep-t",
                             "--output": "runs/sweep-t/slurm-%A_%a.out"}
    assert (report.script, report.args) == ("launch/sweep_report.sh", ["runs/sweep-t"])
    assert report.options["--dependency"] == f"afterany:{array.id}" and report.options["--account"] == "acct"
    assert json.loads((sweep_dir / "sweep.json").read_text()) == {
        "profile": "1xGPU", "tasks": 4, "array_job_id": str(array.id), "report_job_id": str(report.id)}
    assert f"submitted job array {array.id} (4 tasks: {array.id}_0 to {array.id}_3) and report job {report.id}" \
        in out


@pytest.mark.parametrize("args, message", [
    (["--profile", "3xTPU"], "--profile 3xTPU: no launch/3xTPU.sh; profiles: 16xA100, 16xA40, "),
    (["--train-cfg", "a.toml", "bad.toml"], "error: bad.toml: train.lr must be > 0, got -1"),
    (["--set", "train.lr=-2"], "a.toml (with --set): train.lr must be > 0, got -2"),
    (["--set", "train.reproduce.seed=4"], "the sweep sets the seed of each run itself; give --seeds"),
    (["--seeds", "1", "2", "1"], "--seeds: 1 given more than once"),
    (["--profile", "4xA40", "--train-cfg", "six.toml"], "train.batch_size (6) is not divisible by the number of "
                                                         "processes (4)"),
    (["--output-dir", "data.toml"], "data.toml exists: give the sweep another --output-dir"),
    (["--output-dir", "data.toml/sweep"], "data.toml/sweep: cannot write the sweep folder (Not a directory)"),
])
def test_bad_input_is_one_line_and_nothing_is_written_or_submitted(submit_root, sweep, args, message):
    write(submit_root / "bad.toml", tiny_train_toml(lr=-1))
    write(submit_root / "six.toml", tiny_train_toml(batch_size=6))
    status, out, err = sweep(submit_root, slurm_env(submit_root), *grid_args(), *args)
    assert status == 2 and not out
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    assert not (submit_root / "runs").exists() and not list((submit_root / "queue").iterdir())


def test_without_sbatch_or_when_sbatch_refuses_nothing_is_left_behind(submit_root, sweep, tmp_path):
    env = slurm_env(submit_root)
    env["PATH"] = os.path.dirname(sys.executable)
    status, _, err = sweep(submit_root, env, *grid_args())
    assert status == 2 and "sbatch is not on the PATH" in err
    refusing = write(tmp_path / "bin" / "sbatch", "#!/bin/sh\necho 'sbatch: error: Invalid account' >&2\nexit 1\n")
    refusing.chmod(0o755)
    env["PATH"] = f"{refusing.parent}{os.pathsep}{env['PATH']}"
    status, _, err = sweep(submit_root, env, *grid_args())
    assert status == 2
    assert err == "error: sbatch did not take the job array: sbatch: error: Invalid account\n"
    assert not (submit_root / "runs" / "sweep-t").exists()  # the same --output-dir can be used again


# ------------------------------------------------------------ the array, run by the stand-ins


def recorded_training(record: Path, name: str) -> dict:
    """What the node launcher of one attempt was asked: its --config-dir and the trainer's arguments."""
    args = (record / f"{name}.args").read_text().splitlines()
    assert args[0] == "launch/node_launcher.py"
    trainer = args[args.index("--") + 1:]
    output_dirs = {trainer[i + 1] for i, a in enumerate(trainer) if a == "--output-dir"}
    sets = [trainer[i + 1] for i, a in enumerate(trainer) if a == "--set"]
    return {"config_dir": args[args.index("--config-dir") + 1], "train_cfg": trainer[trainer.index("--train-cfg") + 1],
            "output_dirs": output_dirs, "sets": sets}


def test_each_task_trains_its_own_config_and_seed_and_a_requeued_task_the_same_again(submit_root, sweep, tmp_path):
    record = tmp_path / "record"
    record.mkdir()
    fake = write(tmp_path / "fake-python", FAKE_PYTHON)
    fake.chmod(0o755)
    env = slurm_env(submit_root, PYTHON=str(fake), FAKE_RECORD=str(record), FAKE_PREEMPT_TASK="0")
    assert sweep(submit_root, slurm_env(submit_root), *grid_args())[0] == 0
    array, report = queued_jobs(submit_root / "queue")

    attempts = run_queue(submit_root / "queue", env)
    # Task 0 is preempted and requeued; the report starts once every task has ended.
    assert [(a.task, a.restart, a.status) for a in attempts] == [
        (0, 0, EXIT_PREEMPTED), (1, 0, 0), (2, 0, 0), (3, 0, 0), (0, 1, 0), (None, 0, 0)]
    # Task 0's SLURM_JOB_ID is the array's own id, which scontrol would take for every task.
    assert attempts[0].job_id == array.id
    assert (submit_root / "scontrol.log").read_text() == f"requeue {array.id}_0\n"
    for task, (cfg, seed) in enumerate([("a", 7), ("a", 8), ("b", 7), ("b", 8)]):
        run_dir = f"runs/sweep-t/{cfg}-seed{seed}"
        assert recorded_training(record, f"{task}.0") == {
            "config_dir": f"{run_dir}/launch", "train_cfg": f"{cfg}.toml", "output_dirs": {run_dir},
            "sets": [f"train.reproduce.seed={seed}"]}
    assert recorded_training(record, "0.1") == recorded_training(record, "0.0")  # the requeued task: its own run
    log = (submit_root / "runs" / "sweep-t" / f"slurm-{array.id}_0.out").read_text()  # both attempts, appended
    assert f"job {array.id}_0 (restart 0)" in log and f"job {array.id}_0 (restart 1)" in log
    assert f"requeueing job {array.id}_0 to resume in runs/sweep-t/a-seed7" in log
    # The report job: over the sweep folder, compared with the seed's table; the fake trainer
    # left no runs, which it names first.
    assert (record / f"job{report.id}.0.args").read_text().splitlines() == [
        "-m", "train.report", "runs/sweep-t", "--out", "runs/sweep-t/report", "--compare", "seed"]
    report_log = (submit_root / "runs" / "sweep-t" / f"report-{report.id}.out").read_text()
    assert "warning: task 3 (b.toml, seed 8) left no run in runs/sweep-t/b-seed8" in report_log


def test_a_plain_job_given_an_output_dir_keeps_its_launch_configs_there(submit_root, tmp_path):
    record = tmp_path / "record"
    record.mkdir()
    fake = write(tmp_path / "fake-python", FAKE_PYTHON)
    fake.chmod(0o755)
    env = slurm_env(submit_root, PYTHON=str(fake), FAKE_RECORD=str(record), SLURM_JOB_ID="4300")
    del env["STANDIN_QUEUE"]  # the stand-in runs the job at once
    for output_dir in (["--output-dir", "runs/mine"], ["--output-dir=runs/mine"]):
        result = subprocess.run(["sbatch", "launch/1xGPU.sh", "data.toml", "a.toml", *output_dir], cwd=submit_root,
                                env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert recorded_training(record, "job4300.0")["config_dir"] == "runs/mine/launch"
        assert "run directory runs/mine" in result.stdout
    outside = subprocess.run(["sbatch", "launch/1xGPU.sh", "--sweep", "runs/sweep-t"], cwd=submit_root, env=env,
                             capture_output=True, text=True, timeout=60)
    assert outside.returncode == 2 and "--sweep DIR is for the tasks of a job array" in outside.stderr


def wait_for_first_record(process: subprocess.Popen, metrics: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not (metrics.exists() and metrics.read_text().strip()):
        assert process.poll() is None, f"the task ended with status {process.returncode} before its first evaluation"
        assert time.monotonic() < deadline, "the task did not finish its first epoch"
        time.sleep(0.2)


def test_a_small_sweep_trains_resumes_a_preempted_task_and_reports_at_the_end(submit_root, sweep):
    """Two seeds of one config, for real: task 0 gets SLURM's warning signal after its first epoch."""
    env = slurm_env(submit_root)
    status, _, err = sweep(submit_root, env, "--profile", "1xGPU", "--data-cfg", "data.toml", "--train-cfg", "a.toml",
                           "--seeds", "1", "2", "--output-dir", "runs/sweep-e2e")
    assert status == 0, err
    sweep_dir = submit_root / "runs" / "sweep-e2e"

    def preempt_task_0(attempt, process):
        if attempt.task == 0 and attempt.restart == 0:
            wait_for_first_record(process, sweep_dir / "a-seed1" / "metrics.jsonl")
            process.send_signal(signal.SIGUSR1)  # what #SBATCH --signal=B:USR1@600 sends the batch shell

    attempts = run_queue(submit_root / "queue", env, on_start=preempt_task_0)
    outputs = "\n".join(a.output.read_text()[-3000:] for a in attempts)
    assert [(a.task, a.restart, a.status) for a in attempts] == [
        (0, 0, EXIT_PREEMPTED), (1, 0, 0), (0, 1, 0), (None, 0, 0)], outputs
    assert "resumed from runs/sweep-e2e/a-seed1/checkpoints/" in attempts[2].output.read_text()
    for seed in (1, 2):
        assert [r["epoch"] for r in read_metrics(sweep_dir / f"a-seed{seed}" / "metrics.jsonl")] == [1, 2]
    assert sorted(p.name for p in (submit_root / "runs").iterdir()) == ["sweep-e2e"]  # no runs/<job id>
    # The report job found both runs, as one group of two seeds, with no seed row to compare it with.
    results = (sweep_dir / "report" / "results.md").read_text()
    assert "| 2 | 6 | resnet18 SGD | 2 |" in results
    assert "no seed row for: resnet18 SGD" in results
    assert len(list((sweep_dir / "report").glob("*.png"))) == 4
