"""The SLURM wrappers on a real SLURM: sbatch, scancel, the requeue, as a user's job meets them.

A single-node cluster (munged, slurmctld, slurmd; tests/slurm_cluster.py) is started for this
module from a temporary folder and stopped at its end. Each test submits the 2-process CPU
profile, ``launch/2xCPU.sh``, unchanged, with ``sbatch`` on a small image folder read by the
HF loader with a worker process per loader, and looks at what SLURM reports
(``scontrol show job``: state, exit code, restarts) and at the run directory.

The jobs run at the same time, each driven by its own thread: the tests then only collect.
The stand-in tests in test_launch.py keep what one node cannot show (several nodes).

SLURM holds a requeued job for its credential lifetime (``cred_expire``, 120 s by default)
before starting it again. The test cluster sets it to 10 s rather than releasing the job by
hand (``scontrol update StartTime=now``): SLURM still holds the job (the test sees it PENDING
for BeginTime) and starts it again by itself, as it would on a cluster, only sooner.

Where SLURM cannot be started (not root, packages missing, daemons failing) the tests are
skipped with the reason; with REQUIRE_REAL_SLURM=1 (``.ci/run`` sets it) they fail instead.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import REPO, clean_env, data_toml, make_image_folder, tiny_train_toml, without_timing, write
from slurm_cluster import ClusterUnavailable, SlurmCluster, missing_requirements
from test_preflight import stage_names, table

from train.rundir import read_metrics

# Both real clusters' tests run in one pytest process, one at a time (pyproject.toml: -n 2).
pytestmark = pytest.mark.xdist_group("slurm")

REQUIRE_ENV = "REQUIRE_REAL_SLURM"
EPOCHS = 6
JOB_TIMEOUT_S = 900  # each scenario, start to end, on a loaded 2-core machine


def unavailable(reason: str) -> None:
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> SlurmCluster:
    reason = missing_requirements()
    if reason:
        unavailable(reason)
    # 16 CPUs on a 2-core machine: the four jobs (4 CPUs each, as the profile asks) run at once.
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), cpus=16)
    try:
        cluster.start()
        failure = None
    except ClusterUnavailable as exc:
        failure = f"SLURM did not start: {exc}"
    if failure:
        unavailable(failure)
    yield cluster
    cluster.stop()


@dataclass
class Job:
    cluster: SlurmCluster
    root: Path  # the submit directory
    id: str
    seen: list[tuple[str, str]] = field(default_factory=list)  # (JobState, Reason) changes while waiting

    @property
    def run_dir(self) -> Path:
        return self.root / "runs" / self.id

    def output(self) -> str:
        """SLURM's job log, slurm-<id>.out (appended to across requeues)."""
        path = self.root / f"slurm-{self.id}.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def shown_output(self) -> str:
        """The job log, printed as well: pytest shows it in full when the test fails."""
        text = self.output()
        print(f"----- slurm-{self.id}.out\n{text}")
        return text

    def metrics(self) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        return read_metrics(path) if path.exists() else []

    def record(self) -> dict[str, str]:
        return self.cluster.job(self.id)

    def wait_for_first_epoch(self) -> None:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not self.metrics():
            state = self.record().get("JobState")
            assert state in ("PENDING", "CONFIGURING", "RUNNING"), f"job {self.id} is {state}:\n{self.output()[-3000:]}"
            assert time.monotonic() < deadline, f"job {self.id}: no epoch finished:\n{self.output()[-3000:]}"
            time.sleep(0.2)

    def wait_until_gone(self) -> dict[str, str]:
        """Until SLURM has nothing more to do with the job (its processes have ended); its last record."""
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while self.id in self.cluster.job_ids():
            record = self.record()
            if not self.seen or self.seen[-1] != (record.get("JobState"), record.get("Reason")):
                self.seen.append((record.get("JobState"), record.get("Reason")))
            assert time.monotonic() < deadline, f"job {self.id} did not end:\n{self.output()[-3000:]}"
            time.sleep(0.5)
        return self.record()

    def scancel(self, *options: str) -> None:
        result = subprocess.run(self.cluster.client_prefix + ["scancel", *options, self.id],
                                env=client_env(self.cluster), capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr


def client_env(cluster: SlurmCluster, **extra) -> dict:
    env = clean_env(**extra)
    env["SLURM_CONF"] = cluster.env["SLURM_CONF"]
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{cluster.env['PATH']}"
    return env


def submit(cluster: SlurmCluster, root: Path, folder: Path, *args: str, sbatch_options: tuple[str, ...] = (),
           **train) -> Job:
    """``sbatch [OPTIONS] launch/2xCPU.sh data.toml train.toml ARGS`` from ``root``, as from a clone's root."""
    root.mkdir(parents=True)
    (root / "launch").symlink_to(REPO / "launch")
    write(root / "data.toml", data_toml(folder, workers=1))
    values = {"max_epochs": EPOCHS, "lr": 0.02, **train}
    # [log] is the last table: only the end of the run and a stop write checkpoints.
    write(root / "train.toml", tiny_train_toml(**values) + "checkpoint_freq = 1000\n")
    command = ["sbatch", "--parsable", *sbatch_options, "launch/2xCPU.sh", "data.toml", "train.toml", *args]
    result = subprocess.run(command, cwd=root, env=client_env(cluster, PYTHON=sys.executable), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return Job(cluster, root, result.stdout.strip().split(";")[0])


# ------------------------------------------------------------------ the jobs, all at once


def completes(job: Job) -> dict[str, str]:
    return job.wait_until_gone()


def preempted_by_usr1(job: Job) -> dict[str, str]:
    """``scancel --batch --signal=USR1`` (what SLURM sends before the time limit) after epoch 1."""
    job.wait_for_first_epoch()
    job.scancel("--batch", "--signal=USR1")
    return job.wait_until_gone()


def cancelled(job: Job) -> dict[str, str]:
    """Plain ``scancel`` in epoch 2: SIGTERM to every process of the job."""
    job.wait_for_first_epoch()
    job.scancel()
    return job.wait_until_gone()


@pytest.fixture(scope="module")
def jobs(cluster, tmp_path_factory) -> dict[str, tuple[Job, Future]]:
    base = tmp_path_factory.mktemp("jobs")
    # 96 training images: 12 steps of 8 per epoch, long enough for a signal to land mid-run.
    folder = make_image_folder(base / "images", train_per_class=32)
    submitted = {
        "completes": (submit(cluster, base / "completes", folder), completes),
        "usr1": (submit(cluster, base / "usr1", folder), preempted_by_usr1),
        "scancel": (submit(cluster, base / "scancel", folder, max_epochs=100), cancelled),
        "fails": (submit(cluster, base / "fails", folder, "--set", "train.lr=-1"), Job.wait_until_gone),
        # A 10-minute limit against a run of 3000 epochs: the estimate needs requeues. The limit is
        # not longer than the profile's warning lead (USR1@600): SLURM warns at once, before the
        # trainers have their handlers, and the node launcher sends it again 30 s later
        # (RESEND_INTERVAL_S); 240 steps keep the preflight running past that. (The job waits for
        # CPUs until the failing one has ended.)
        "preflight": (submit(cluster, base / "preflight", folder, "--preflight", "--preflight-steps", "240",
                             sbatch_options=("--time=10",), max_epochs=3000), completes),
    }
    with ThreadPoolExecutor(max_workers=len(submitted)) as pool:
        yield {name: (job, pool.submit(drive, job)) for name, (job, drive) in submitted.items()}


def outcome(jobs, name: str) -> tuple[Job, dict[str, str]]:
    job, future = jobs[name]
    return job, future.result(timeout=JOB_TIMEOUT_S)


# ------------------------------------------------------------------------------ the tests


def test_a_job_completes_with_its_exported_model(jobs):
    job, record = outcome(jobs, "completes")
    output = job.shown_output()
    assert (record["JobState"], record["ExitCode"], record["Restarts"]) == ("COMPLETED", "0:0", "0")
    assert f"SLURM job {job.id}: 1 node(s) x 2 process(es) = 2, mixed precision no (CPU processes)" in output
    assert "on 2 process(es), device cpu" in output and "training finished" in output
    assert [r["epoch"] for r in job.metrics()] == list(range(1, EPOCHS + 1))
    model = job.run_dir / "model"
    assert (model / "model.safetensors").is_file() and (model / "config.json").is_file()


def test_usr1_checkpoints_requeues_under_the_same_id_and_resumes_to_the_end(jobs):
    job, record = outcome(jobs, "usr1")
    output = job.shown_output()
    assert (record["JobState"], record["ExitCode"], record["Restarts"]) == ("COMPLETED", "0:0", "1")
    assert output.count("received SIGUSR1: stopping after this step") == 2  # once per rank
    assert f"requeueing job {job.id} to resume in runs/{job.id}" in output
    assert ("PENDING", "BeginTime") in job.seen, job.seen  # SLURM's hold of a requeued job, then its start
    assert f"job {job.id} (restart 1)" in output
    # The resumed attempt names the checkpoint the first one wrote, with its own step.
    resumed = re.search(rf"resumed from runs/{job.id}/checkpoints/(\d+): epoch (\d+), batch (\d+), step (\d+)", output)
    assert resumed
    assert int(resumed[1]) == int(resumed[4]) > 0
    assert [r["epoch"] for r in job.metrics()] == list(range(1, EPOCHS + 1))  # each epoch once
    assert (job.run_dir / "model" / "model.safetensors").is_file()


def test_usr1_preempted_and_resumed_run_equals_the_uninterrupted_one(jobs):
    (usr1, _), (whole, _) = outcome(jobs, "usr1"), outcome(jobs, "completes")
    assert without_timing(usr1.metrics()) == without_timing(whole.metrics())


def test_plain_scancel_with_loader_workers_checkpoints_and_is_not_requeued(jobs):
    job, record = outcome(jobs, "scancel")
    output = job.shown_output()
    assert (record["JobState"], record["Restarts"]) == ("CANCELLED", "0")
    # (torchrun's agent, also signalled, prints a traceback of its own: it is not training.)
    assert "DataLoader worker" not in output and "killed by signal" not in output
    assert output.count("received SIGTERM: stopping after this step with a checkpoint") == 2
    assert "node launcher: training stopped with a checkpoint (status 75" in output
    log = (job.run_dir / "train.log").read_text()
    # checkpoint_freq = 1000: the only checkpoint is the stop's, after epoch 1.
    checkpoints = sorted((job.run_dir / "checkpoints").iterdir())
    assert len(checkpoints) == 1 and int(checkpoints[0].name) > job.metrics()[0]["step"]
    assert f"checkpoint: runs/{job.id}/checkpoints/{checkpoints[0].name}" in log
    assert "requeueing" not in output


def test_a_preflight_job_estimates_its_requeues_from_the_jobs_time_limit(jobs):
    """``--preflight`` through the wrapper: every stage ok despite SLURM's time-limit warning, the
    time limit read from SLURM itself (squeue), the requeues that limit implies, and nothing left
    in the run directory."""
    job, record = outcome(jobs, "preflight")
    output = job.shown_output()
    assert (record["JobState"], record["ExitCode"], record["Restarts"]) == ("COMPLETED", "0:0", "0")
    stages = stage_names(80, 160)  # --preflight-steps 240
    assert table(output, stages) == dict.fromkeys(stages, "ok"), output
    assert "received SIGUSR1: asking training to write a checkpoint and stop" in output  # the batch shell
    assert output.count("received SIGUSR1, a warning of the job's time limit: noted, not stopping") == 2
    assert "note: SIGUSR1 arrived during the preflight and was noted, not obeyed" in output
    hours, minutes, seconds = map(int, re.search(r"wall time (\d+):(\d\d):(\d\d)", output).groups())
    wall = hours * 3600 + minutes * 60 + seconds
    found = re.search(rf"job {job.id}'s time limit 10:00: (\d+) requeue\(s\), (\d+) job\(s\) in all", output)
    assert found, output
    requeues, jobs_in_all = int(found[1]), int(found[2])
    assert requeues >= 1 and jobs_in_all == requeues + 1
    assert abs(requeues - (math.ceil(wall / 600) - 1)) <= 1  # the printed wall time is rounded to the second
    assert list((job.root / "runs").iterdir()) == []  # neither runs/<id> nor its scratch directory


def test_a_failing_config_fails_and_is_not_requeued(jobs):
    job, record = outcome(jobs, "fails")
    output = job.shown_output()
    assert (record["JobState"], record["ExitCode"], record["Restarts"]) == ("FAILED", "2:0", "0")
    assert "error: train.toml (with --set): train.lr must be > 0, got -1" in output
    assert "training failed with status 2: not requeued" in output
    assert not (job.run_dir / "checkpoints").exists()
