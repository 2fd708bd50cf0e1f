"""Two real SLURM nodes: a rendezvous across hosts, a preemption, a node lost, a rank hung.

A two-node cluster (tests/slurm_cluster.py, ``TwoNodeCluster``: each slurmd in a network
namespace of its own, on its own address in 198.18.0.0/24, with its own host name) is started
for this module and torn down at its end. Each test submits the two-node CPU profile,
``launch/2x1CPU.sh`` (one training process per node), unchanged, with ``sbatch``, and looks at
what SLURM reports and at the run directory. The jobs run at the same time, each driven by a
thread of its own; the tests then only collect.

The model is a tiny ViT: LayerNorm only, so the two processes' run (4 images each per step)
equals one process's run of the same global batch with micro-batches of 4 (no per-batch
BatchNorm statistics differ), to float rounding.

Where SLURM or network namespaces are unavailable the tests are skipped with the reason; with
REQUIRE_REAL_SLURM=1 (``.ci/run`` sets it) they fail instead.
"""

from __future__ import annotations

import re
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import REPO, data_toml, make_image_folder, run_train, tiny_train_toml, without_timing, write
from slurm_cluster import NODES, ClusterUnavailable, TwoNodeCluster, missing_network_requirements
from test_slurm_real import JOB_TIMEOUT_S, Job, client_env, unavailable

from train.rundir import read_metrics

EPOCHS = 3
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


def train_toml(**values) -> str:
    """3 epochs of 6 steps of 8 images, one checkpoint only at a stop (and the end)."""
    values = {"arch": '"vit_tiny_patch16_224"', "max_epochs": EPOCHS, "lr": 0.02, **values}
    return tiny_train_toml(**values) + "checkpoint_freq = 1000\n"


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
    """The same config in one process on this machine, micro-batches of 4 as each node's process has."""
    prepare(root, folder, micro_batch_size=4)
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


@pytest.fixture(scope="module")
def jobs(cluster, tmp_path_factory) -> dict[str, Future]:
    base = tmp_path_factory.mktemp("jobs2")
    # 48 training images: 6 steps of 8 per epoch, long enough for a signal to land mid-run.
    folder = make_image_folder(base / "images", train_per_class=16)
    submitted = {
        "completes": (submit(cluster, base / "completes", folder), Job.wait_until_gone),
        "usr1": (submit(cluster, base / "usr1", folder), preempted_by_usr1),
    }
    with ThreadPoolExecutor(max_workers=len(submitted) + 1) as pool:
        futures = {name: pool.submit(drive, job) for name, (job, drive) in submitted.items()}
        futures["one process"] = pool.submit(one_process_run, base / "one-process", folder)
        yield {name: (submitted.get(name, (None,))[0], future) for name, future in futures.items()}


def outcome(jobs, name: str) -> tuple[Job, dict]:
    job, future = jobs[name]
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

