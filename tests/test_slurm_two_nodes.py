"""Two real SLURM nodes: a rendezvous across hosts, a preemption, a node lost, a rank hung.

A two-node cluster (tests/slurm_cluster.py, ``TwoNodeCluster``: each slurmd in a network
namespace of its own, on its own address in 198.18.0.0/24, with its own host name) is started
for this module and torn down at its end. Each test submits the two-node CPU profile,
``launch/2x1CPU.sh`` (one training process per node), unchanged, with ``sbatch``, and looks at
what SLURM reports and at the run directory. The jobs run at the same time, each driven by a
thread of its own; the tests then only collect.

The model is a tiny ViT: LayerNorm only, so the two processes' run (4 images each per step)
equals one process's run of the same config and global batch (no per-batch BatchNorm
statistics differ), to float rounding.

The faults (a node's processes killed, a rank stopped, a node's link cut) are injected in
the second epoch (the link cut in a job of its own once the others have ended: it cuts off
every job on the node), with checkpoints every 4 steps, and short timeouts given on the command line
(``--set train.collective_timeout_s=...``): each job must end within a bounded time of the
fault, be requeued, resume from a checkpoint written before it, and end as the uninterrupted
job did.

Where SLURM or network namespaces are unavailable the tests are skipped with the reason; with
REQUIRE_REAL_SLURM=1 (``.ci/run`` sets it) they fail instead.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import REPO, data_toml, make_image_folder, run_train, tiny_train_toml, without_timing, write
from slurm_cluster import NODES, ClusterUnavailable, TwoNodeCluster, missing_network_requirements
from test_slurm_real import JOB_TIMEOUT_S, Job, client_env, unavailable

from train.rundir import read_metrics

# Both real clusters' tests run in one pytest process, one at a time (pyproject.toml: -n 2).
pytestmark = pytest.mark.xdist_group("slurm")

EPOCHS = 2
HOSTS = [name for name, _ in NODES]
HEAD_ADDRESS_NAME = HOSTS[0]  # the rendezvous is the head node's name, resolved on each node to its address


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> TwoNodeCluster:
    reason = missing_network_requirements()
    if reason:
        unavailable(reason)
    cluster = TwoNodeCluster(tmp_path_factory.mktemp("slurm2"))
    try:
        cluster.start()
        failure = None
    except ClusterUnavailable as exc:
        failure = f"the two-node SLURM cluster did not start: {exc}"
    if failure:
        unavailable(failure)
    yield cluster
    cluster.stop()


def train_toml(checkpoint_every_steps: int = 0, **values) -> str:
    """2 epochs of 6 steps of 8 images; checkpoints at a stop, the end and every N steps if given."""
    values = {"arch": '"vit_tiny_patch16_224"', "max_epochs": EPOCHS, "lr": 0.02, **values}
    return (tiny_train_toml(**values) + "checkpoint_freq = 1000\n"
            + f"checkpoint_every_steps = {checkpoint_every_steps}\n")


def prepare(root: Path, folder: Path, **train) -> None:
    root.mkdir(parents=True)
    (root / "launch").symlink_to(REPO / "launch")
    write(root / "data.toml", data_toml(folder))
    write(root / "train.toml", train_toml(**train))


def submit(cluster: TwoNodeCluster, root: Path, folder: Path, *args: str, **train) -> Job:
    """``sbatch launch/2x1CPU.sh data.toml train.toml ARGS`` from ``root``, in the controller's namespace."""
    prepare(root, folder, **train)
    command = cluster.client_prefix + ["sbatch", "--parsable", "launch/2x1CPU.sh", "data.toml", "train.toml", *args]
    result = subprocess.run(command, cwd=root, env=client_env(cluster, PYTHON=sys.executable), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return Job(cluster, root, result.stdout.strip().split(";")[0])


def one_process_run(root: Path, folder: Path) -> list[dict]:
    """The same config in one process on this machine."""
    prepare(root, folder)
    result = run_train(["--data-cfg", str(root / "data.toml"), "--train-cfg", str(root / "train.toml"),
                        "--output-dir", str(root / "run")], timeout=JOB_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    return read_metrics(root / "run" / "metrics.jsonl")


# ------------------------------------------------------------------ the jobs, all at once


def preempted_by_usr1(job: Job) -> dict[str, str]:
    """``scancel --batch --signal=USR1`` (what SLURM sends before the time limit) after epoch 1."""
    job.wait_for_first_epoch()
    job.scancel("--batch", "--signal=USR1")
    return job.wait_until_gone()


FAULT_BOUND_S = 150  # from a fault to the end of the attempt, on a loaded 2-core machine (timeouts 20-30 s)


@dataclass
class Fault:
    """When a fault was injected and when the attempt it hit had ended (the job requeued)."""
    step: int  # the last step the log showed when it was injected
    newest_checkpoint: int  # the step of the newest complete checkpoint then
    injected: float
    ended: float | None = None


def fault_now(job: Job) -> Fault:
    folder = job.run_dir / "checkpoints"
    complete = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.is_dir() else []
    return Fault(progress_step(job), max(complete, default=0), time.monotonic())


def progress_step(job: Job) -> int:
    """The last step of the run the job's log shows ("epoch 2/3 step 4/6 loss ...", every log_freq = 2 steps)."""
    steps = re.findall(r"epoch (\d+)/\d+ step (\d+)/(\d+) loss", job.output())
    return (int(steps[-1][0]) - 1) * int(steps[-1][2]) + int(steps[-1][1]) if steps else 0


def wait_for_step(job: Job, step: int) -> None:
    """Until the first attempt has logged ``step`` of the run (in epoch 2; the checkpoint of step 4 written)."""
    job.wait_for_first_epoch()
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while progress_step(job) < step:
        assert time.monotonic() < deadline, f"job {job.id}: no step {step}:\n{job.output()[-3000:]}"
        time.sleep(0.2)


def wait_until_requeued(job: Job, fault: Fault) -> dict[str, str]:
    """Until the attempt the fault hit has ended (SLURM counts a restart), within FAULT_BOUND_S;
    then until the job is gone."""
    while job.record().get("Restarts") == "0" and job.record().get("JobState") == "RUNNING":
        assert time.monotonic() - fault.injected < FAULT_BOUND_S, \
            f"job {job.id} did not end within {FAULT_BOUND_S} s of the fault:\n{job.output()[-3000:]}"
        time.sleep(0.5)
    fault.ended = time.monotonic()
    return job.wait_until_gone()


def node_killed(job: Job) -> tuple[dict, Fault]:
    """SIGKILL to every process of node2's step (its node launcher, accelerate, the trainer) in epoch 2."""
    wait_for_step(job, 8)
    fault = fault_now(job)
    pids = job.cluster.step_processes(job.id, "node2")
    assert pids, "no processes of the step on node2"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return wait_until_requeued(job, fault), fault


def is_trainer(pid: int) -> bool:
    """``python -u .../launch/train_worker.py ...`` (accelerate's own process names the file as an argument)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"accelerate.commands.launch" not in argv and any(a.endswith(b"launch/train_worker.py") for a in argv[1:])


def rank_stopped(job: Job) -> tuple[dict, Fault]:
    """SIGSTOP to node2's trainer (rank 1) in epoch 2, for good: it never runs again. After step 10,
    two steps from a checkpoint: the watchdog watches the steps, not a checkpoint's write."""
    wait_for_step(job, 10)
    fault = fault_now(job)
    trainers = [pid for pid in job.cluster.step_processes(job.id, "node2") if is_trainer(pid)]
    assert len(trainers) == 1, trainers
    os.kill(trainers[0], signal.SIGSTOP)
    return wait_until_requeued(job, fault), fault


def link_cut(job: Job) -> tuple[dict, Fault]:
    """node2's network link taken down in epoch 2, and up again once node1's trainer has given up
    (a partition that heals: until then SLURM itself cannot reach node2 to end its tasks)."""
    wait_for_step(job, 8)
    fault = fault_now(job)
    job.cluster.set_link("node2", up=False)
    try:
        deadline = time.monotonic() + FAULT_BOUND_S
        while "a collective failed" not in job.output() and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        job.cluster.set_link("node2", up=True)
    return wait_until_requeued(job, fault), fault


FAULTS = {
    "killed": (node_killed, ("--set", "train.collective_timeout_s=30")),
    # The watchdog first; the collective timeout stays the bound should the stop land in a checkpoint.
    "stopped": (rank_stopped, ("--set", "train.progress_timeout_s=20", "--set", "train.collective_timeout_s=60")),
}
# A link cut cuts off every job on the node: that job runs once the others have ended.
LINK_CUT_ARGS = ("--set", "train.collective_timeout_s=30")


@pytest.fixture(scope="module")
def jobs(cluster, tmp_path_factory) -> dict[str, Future]:
    base = tmp_path_factory.mktemp("jobs2")
    # 48 training images: 6 steps of 8 per epoch, long enough for a signal to land mid-run.
    folder = make_image_folder(base / "images", train_per_class=16)
    submitted = {
        "completes": (submit(cluster, base / "completes", folder), Job.wait_until_gone),
        "usr1": (submit(cluster, base / "usr1", folder), preempted_by_usr1),
    }
    for name, (drive, args) in FAULTS.items():
        submitted[name] = (submit(cluster, base / name, folder, *args, checkpoint_every_steps=4), drive)
    with ThreadPoolExecutor(max_workers=len(submitted) + 2) as pool:
        futures = {name: pool.submit(drive, job) for name, (job, drive) in submitted.items()}
        futures["one process"] = pool.submit(one_process_run, base / "one-process", folder)
        others = list(futures.values())

        def link_cut_later() -> tuple[Job, tuple]:
            wait(others)
            job = submit(cluster, base / "link", folder, *LINK_CUT_ARGS, checkpoint_every_steps=4)
            return job, link_cut(job)

        found = {name: (submitted.get(name, (None,))[0], future) for name, future in futures.items()}
        found["link"] = (None, pool.submit(link_cut_later))
        yield found


def outcome(jobs, name: str) -> tuple[Job, dict]:
    job, future = jobs[name]
    if job is None and name == "link":  # submitted by its driver
        return future.result(timeout=3 * JOB_TIMEOUT_S)
    return job, future.result(timeout=JOB_TIMEOUT_S)


def assert_same_losses(run: list[dict], reference: list[dict]) -> None:
    assert [r["step"] for r in run] == [r["step"] for r in reference] == [6 * e for e in range(1, EPOCHS + 1)]
    for a, b in zip(run, reference, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
        assert a["val_acc1"] == b["val_acc1"] and a["lr"] == b["lr"]


# ------------------------------------------------------------------------------ the tests


def test_a_two_node_job_completes_with_both_hosts_in_its_rank_table(jobs):
    """The job spans both nodes: the rank table (machine rank 0) names both hosts and a rendezvous
    at the head node's name, not 127.0.0.1; each node reports its own line; the run completes."""
    job, record = outcome(jobs, "completes")
    output = job.shown_output()
    assert (record["JobState"], record["ExitCode"], record["Restarts"]) == ("COMPLETED", "0:0", "0")
    assert record["NodeList"] == "node[1-2]"
    port = 20000 + int(job.id) % 12000
    assert (f"SLURM job {job.id}: 2 node(s) x 1 process(es) = 2, mixed precision no (CPU processes), "
            f"rendezvous {HEAD_ADDRESS_NAME}:{port}") in output
    assert re.search(r"machine_rank +0 +node1 +ranks 0-0", output) and re.search(r"machine_rank +1 +node2 +ranks 1-1",
                                                                                  output)
    assert "[machine_rank 0 node1]" in output and "[machine_rank 1 node2]" in output
    assert "127.0.0.1" not in output
    assert "on 2 process(es), device cpu" in output and "training finished" in output
    assert (job.run_dir / "model" / "model.safetensors").is_file()


def test_the_head_node_name_resolves_to_its_own_address_on_both_nodes(cluster):
    """Inside the cluster a node's name is its 198.18.0.x address (the hosts file of the test's
    mount namespaces), as the other node's rendezvous needs; the machine's own file is untouched."""
    command = cluster.client_prefix + ["srun", "-N2", "--ntasks-per-node=1", "getent", "hosts", HEAD_ADDRESS_NAME]
    result = subprocess.run(command, env=client_env(cluster), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [dict(NODES)[HEAD_ADDRESS_NAME], HEAD_ADDRESS_NAME] * 2
    assert HEAD_ADDRESS_NAME not in Path("/etc/hosts").read_text().split()


def test_the_two_node_run_equals_the_one_process_run(jobs):
    (job, _), (_, reference) = outcome(jobs, "completes"), outcome(jobs, "one process")
    assert_same_losses(job.metrics(), reference)


def test_usr1_across_nodes_checkpoints_once_requeues_under_the_same_id_and_resumes(jobs):
    """SIGUSR1 to the batch shell on node1 reaches both nodes' trainers: each says so, one
    checkpoint is written, both nodes stop with 75, SLURM requeues the job under its id, the
    next attempt resumes from that checkpoint and its metrics equal the uninterrupted job's."""
    (job, record), (whole, _) = outcome(jobs, "usr1"), outcome(jobs, "completes")
    output = job.shown_output()
    assert (record["JobState"], record["ExitCode"], record["Restarts"]) == ("COMPLETED", "0:0", "1")
    assert output.count("received SIGUSR1: stopping after this step") == 2  # once per node
    assert f"requeueing job {job.id} to resume in runs/{job.id}" in output
    assert f"job {job.id} (restart 1)" in output
    checkpoints = sorted((job.run_dir / "checkpoints").iterdir(), key=lambda p: int(p.name))
    resumed = re.findall(rf"resumed from runs/{job.id}/checkpoints/(\d+)", output)
    assert len(resumed) == 1 and int(resumed[0]) not in (6 * e for e in range(EPOCHS + 1))  # mid-epoch
    assert resumed[0] in [p.name for p in checkpoints]
    assert [r["epoch"] for r in job.metrics()] == list(range(1, EPOCHS + 1))
    assert without_timing(job.metrics()) == without_timing(whole.metrics())



def assert_fault_survived(jobs, name: str) -> str:
    """What every fault must lead to; returns the job's log for the fault's own checks."""
    (job, (record, fault)), (whole, _) = outcome(jobs, name), outcome(jobs, "completes")
    output = job.shown_output()
    assert (record["JobState"], record["ExitCode"], record["Restarts"]) == ("COMPLETED", "0:0", "1")
    # Bounded: the attempt ended within the timeouts (and SLURM's KillWait), not NCCL/gloo's 10-30 minutes.
    assert fault.ended - fault.injected < FAULT_BOUND_S, fault
    assert f"requeueing job {job.id} to resume in runs/{job.id}" in output
    # The next attempt resumed from the newest checkpoint complete at the fault (every 4 steps): intact.
    resumed = re.findall(rf"resumed from runs/{job.id}/checkpoints/(\d+): epoch \d+, batch \d+, step (\d+)", output)
    assert len(resumed) == 1, output
    # (One being written at the fault may have been completed before it took effect.)
    step = int(resumed[0][1])
    assert step % 4 == 0 and 4 <= fault.newest_checkpoint <= step <= fault.step, (resumed, fault)
    assert [r["epoch"] for r in job.metrics()] == list(range(1, EPOCHS + 1))
    assert without_timing(job.metrics()) == without_timing(whole.metrics())
    return output


def test_a_node_killed_mid_epoch_ends_the_job_at_once_and_it_resumes_to_the_same_end(jobs):
    """node2's processes killed: node1's trainer sees its collective fail (the connection closes),
    says so, and stops with 75, or srun ends it first; the batch script, whose srun reports the
    killed node's 137, finds no node failed of its own, and requeues."""
    output = assert_fault_survived(jobs, "killed")
    # node1's trainer says so when it sees the failure before srun ends its task (--kill-on-bad-exit).
    assert "[rank 0] a collective failed" in output or "node launcher: received SIGTERM" in output
    assert re.search(r"node\(s\) (0 )?1 ended without a status of their own \(lost, or ended by srun\)", output)


def test_a_hung_rank_is_named_and_the_job_ends_and_resumes(jobs):
    """node2's trainer stopped (SIGSTOP): node1's watchdog sees no step finish for
    train.progress_timeout_s, names rank 1 on node2 in one line, and ends with 75; srun then ends
    node2's task (--kill-on-bad-exit) and the job is requeued."""
    output = assert_fault_survived(jobs, "stopped")
    named = [line for line in output.splitlines() if "stopped making progress: rank 1 on node2" in line]
    assert len(named) == 1, output
    assert "rank 0 (node1): no training step finished for 20 s (train.progress_timeout_s)" in named[0]


def test_a_node_cut_off_ends_the_job_within_the_collective_timeout_and_it_resumes(jobs):
    """node2's link down: gloo's collectives wait for nothing; the process group's timeout
    (train.collective_timeout_s = 30) fails them on both nodes, both stop with 75, and once the
    link is back SLURM sees the job end, which is requeued."""
    output = assert_fault_survived(jobs, "link")
    assert "a collective failed" in output and "Timed out" in output
