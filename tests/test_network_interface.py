"""The network interface between nodes: launch/node_launcher.py --network-interface (and the
SLURM wrapper's NETWORK_INTERFACE) sets NCCL_SOCKET_IFNAME and GLOO_SOCKET_IFNAME for training,
after checking that this node has such an interface."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import clean_env
from test_launch import LAUNCH, STANDINS, launcher, sbatch, slurm_env, submit_dir


def dry_run(tmp_path, *options: str) -> subprocess.CompletedProcess:
    env = clean_env(PATH=f"{STANDINS}{os.pathsep}{os.environ['PATH']}", STANDIN_GPU_CAPS="8.0",
                    SLURM_JOB_ID="12", SLURM_NNODES="1", SLURM_JOB_NODELIST="g1", SLURM_GPUS_ON_NODE="1")
    return subprocess.run([sys.executable, str(LAUNCH / "node_launcher.py"), "--dry-run", "--config-dir",
                           str(tmp_path), *options], env=env, capture_output=True, text=True, timeout=60)


def test_an_interface_sets_both_libraries_variables():
    assert launcher.socket_interface_env("ib0", ["lo", "eth0", "ib0"]) == \
        {"NCCL_SOCKET_IFNAME": "ib0", "GLOO_SOCKET_IFNAME": "ib0"}


@pytest.mark.parametrize("value", ["ib", "=ib1", "^docker,eth", "ib0,eth0"])
def test_nccls_prefix_exact_and_exclusion_forms_are_accepted(value):
    assert launcher.socket_interface_env(value, ["lo", "eth0", "ib0", "ib1"])["NCCL_SOCKET_IFNAME"] == value


def test_an_interface_the_node_lacks_is_a_one_line_error(tmp_path):
    result = dry_run(tmp_path, "--network-interface", "nosuch7")
    assert result.returncode == 2
    assert result.stderr.startswith("error: --network-interface nosuch7: no interface 'nosuch7' on this node")
    assert len(result.stderr.splitlines()) == 1


def test_the_launcher_reports_what_training_gets(tmp_path):
    result = dry_run(tmp_path, "--network-interface", "lo")
    assert result.returncode == 0, result.stderr
    assert "NCCL_SOCKET_IFNAME=lo GLOO_SOCKET_IFNAME=lo" in result.stdout
    assert "SOCKET_IFNAME" not in dry_run(tmp_path).stdout  # nothing given: the libraries choose


def test_the_slurm_wrapper_passes_network_interface_on(tiny_folder, tmp_path):
    """NETWORK_INTERFACE reaches the node launcher, which checks it before anything starts."""
    root = submit_dir(tmp_path, tiny_folder)
    result = sbatch(root, "1xGPU", slurm_env(root, job_id=4301, gpus_per_node=1, NETWORK_INTERFACE="nosuch7"))
    assert result.returncode == 2
    assert "error: --network-interface nosuch7: no interface 'nosuch7' on this node" in result.stderr
    assert not (root / "scontrol.log").exists()
