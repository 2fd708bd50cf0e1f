"""Launching: accelerate configs per hardware profile, the per-node generator, the SLURM wrappers
with requeue, and sync_bn.

SLURM is simulated here: tests/slurm_standins/ holds stand-in ``sbatch``, ``srun``,
``scontrol`` and ``nvidia-smi`` commands that give the wrappers the environment SLURM would,
start one task per simulated node (all on this machine, as 127.0.0.1, 127.0.0.2, ...), pass
signals on as srun does (to every process of the step) and record requeues; this is how
several nodes are tested. Training itself is real: CPU processes that rendezvous through the
generated configs. test_slurm_real.py runs the single-node cases on a real SLURM.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from helpers import REPO, accelerate_launch, clean_env, data_toml, free_port, run_train, tiny_train_toml, write

from train.config import UserError, load_config
from train.models import build_model, use_sync_batchnorm
from train.preemption import EXIT_PREEMPTED
from train.rundir import read_metrics

STANDINS = REPO / "tests" / "slurm_standins"
LAUNCH = REPO / "launch"


def load_node_launcher():
    spec = importlib.util.spec_from_file_location("node_launcher", LAUNCH / "node_launcher.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


launcher = load_node_launcher()


# ------------------------------------------------------------------ the generator, unit by unit


@pytest.mark.parametrize("nodelist, hosts", [
    ("gpu017", ["gpu017"]),
    ("gpu-[001-004]", ["gpu-001", "gpu-002", "gpu-003", "gpu-004"]),
    ("node[1,3-4],login2", ["node1", "node3", "node4", "login2"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("rack[1-2]-g[01-02]", ["rack1-g01", "rack1-g02", "rack2-g01", "rack2-g02"]),
    ("a[09-11],b[1]", ["a09", "a10", "a11", "b1"]),
])
def test_hostlists_expand_like_scontrol_show_hostnames(nodelist, hosts):
    assert launcher.expand_hostlist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["", "gpu[1-", "gpu1-]", "gpu[3-1]", "gpu[a-b]", "gpu[1-2],,x", "g[[1]]"])
def test_unreadable_hostlists_are_errors(nodelist):
    with pytest.raises(launcher.LaunchError, match="SLURM_JOB_NODELIST"):
        launcher.expand_hostlist(nodelist)


@pytest.mark.parametrize("capabilities, precision", [
    ([(7, 0)] * 4, "fp16"),  # V100
    ([(7, 5)] * 8, "fp16"),  # T4
    ([(8, 0)] * 4, "bf16"),  # A100
    ([(8, 6)] * 4, "bf16"),  # A40
    ([(9, 0)] * 8, "bf16"),  # H100
    ([(8, 0), (7, 0)], "fp16"),  # a mixed node runs at what its weakest GPU has
])
def test_mixed_precision_follows_compute_capability(capabilities, precision):
    assert launcher.precision_for(capabilities) == precision


def test_gpu_count_prefers_slurm_then_visible_devices_then_nvidia_smi():
    eight = [(8, 0)] * 8
    assert launcher.count_gpus({"SLURM_GPUS_ON_NODE": "4", "CUDA_VISIBLE_DEVICES": "0,1"}, eight) == 4
    assert launcher.count_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}, eight) == 2
    assert launcher.count_gpus({"CUDA_VISIBLE_DEVICES": ""}, eight) == 0
    assert launcher.count_gpus({}, eight) == 8


def fake_run(stdout="", returncode=0, stderr="", missing=False):
    def run(command, **kwargs):
        if missing:
            raise FileNotFoundError(command[0])
        return subprocess.CompletedProcess(command, returncode, stdout, stderr)
    return run


def test_compute_capabilities_are_read_from_nvidia_smi():
    assert launcher.read_compute_capabilities(fake_run("8.0\n8.0\n\n")) == [(8, 0), (8, 0)]
    assert launcher.read_compute_capabilities(fake_run(missing=True)) == []
    with pytest.raises(launcher.LaunchError, match="--mixed-precision"):
        launcher.read_compute_capabilities(fake_run(returncode=2, stderr='Field "compute_cap" is not a valid field'))
    with pytest.raises(launcher.LaunchError, match="'N/A'"):
        launcher.read_compute_capabilities(fake_run("N/A\n"))


def test_ports_depend_on_the_job_and_stay_below_the_ephemeral_range():
    ports = {launcher.port_for_job(str(job)) for job in range(1_000_000, 1_000_050)}
    assert len(ports) == 50 and all(20000 <= p < 32768 for p in ports)
    with pytest.raises(launcher.LaunchError, match="SLURM_JOB_ID"):
        launcher.port_for_job("12_3")


@pytest.mark.parametrize("launcher_status, workers, expected, node", [
    (0, [0, 0], 2, 0),
    (1, [75, 75], 2, 75),  # accelerate says 1; the workers say preempted
    (1, [75], 2, 1),  # a worker that left no status (killed) is not a preemption
    (1, [75, 1], 2, 1),
    (1, [2, 2], 2, 2),  # a config error stays a config error
    (-9, [], 1, 137),  # killed by SIGKILL, shell style
])
def test_node_status_is_the_workers_own_when_they_agree(launcher_status, workers, expected, node):
    assert launcher.node_status(launcher_status, workers, expected) == node


def test_the_preempted_status_is_the_trainers():
    assert launcher.EXIT_PREEMPTED == EXIT_PREEMPTED == 75
    script = (LAUNCH / "slurm_job.sh").read_text()
    assert re.search(r"^readonly EXIT_PREEMPTED=(\d+)$", script, re.M).group(1) == str(EXIT_PREEMPTED)


STARTING_WORKER = """
import os, signal, sys, time
status_dir = sys.argv[1]
signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # as inherited from accelerate's process
time.sleep(0.5)  # Python and torch starting: no pid file yet
with open(os.path.join(status_dir, "0.pid.partial"), "w") as f:
    f.write(str(os.getpid()))
os.replace(os.path.join(status_dir, "0.pid.partial"), os.path.join(status_dir, "0.pid"))
time.sleep(0.5)  # the trainer not yet started: the signal is still ignored
signal.signal(signal.SIGUSR1, lambda signum, frame: sys.exit(75))  # the trainer's handler: stop
time.sleep(20)
sys.exit(0)  # never stopped
"""


def test_a_stop_signal_reaches_a_worker_that_was_still_starting(tmp_path, monkeypatch):
    """The signal reaches the launcher before the worker has written its pid, and is ignored by
    the worker until the trainer's handler is in place: the launcher sends it again until the
    worker has ended."""
    monkeypatch.setattr(launcher, "RESEND_INTERVAL_S", 0.1)
    worker = subprocess.Popen([sys.executable, "-c", STARTING_WORKER, str(tmp_path)])
    forwarder = launcher.SignalForwarder(tmp_path).install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)  # what SLURM sends the node launcher
        assert forwarder.received == signal.SIGUSR1 and not launcher.running_workers(tmp_path)
        assert forwarder.wait(worker) == 75  # stopped by the signal, not after its 20 s
    finally:
        forwarder.uninstall()
        if worker.poll() is None:
            worker.kill()
            worker.wait()


# ------------------------------------------------------- the generator as a node runs it


def generate(tmp_path, capabilities: str, *options: str, **slurm) -> tuple[str, str]:
    """Run the generator as srun would on one node; returns (stdout, the YAML it wrote)."""
    env = clean_env(PATH=f"{STANDINS}{os.pathsep}{os.environ['PATH']}", STANDIN_GPU_CAPS=capabilities, **slurm)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    result = subprocess.run([sys.executable, str(LAUNCH / "node_launcher.py"), "--dry-run",
                             "--config-dir", str(tmp_path), *options],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    written = sorted(tmp_path.glob("node-*.yaml"))
    assert len(written) == 1
    return result.stdout, written[0].read_text()


def test_one_node_with_four_gpus(tmp_path):
    stdout, config = generate(tmp_path, "8.0 8.0 8.0 8.0", SLURM_JOB_ID="777001", SLURM_NNODES="1",
                              SLURM_NODEID="0", SLURM_JOB_NODELIST="gpu-a07", SLURMD_NODENAME="gpu-a07",
                              SLURM_GPUS_ON_NODE="4")
    assert config == textwrap.dedent("""\
        # Written by launch/node_launcher.py for SLURM job 777001, node 0 of 1 (gpu-a07).
        compute_environment: LOCAL_MACHINE
        distributed_type: MULTI_GPU
        num_machines: 1
        num_processes: 4
        machine_rank: 0
        main_process_port: 29001
        rdzv_backend: static
        same_network: true
        gpu_ids: all
        mixed_precision: bf16
        use_cpu: false
        main_training_function: main
        """)
    assert "1 node(s) x 4 process(es) = 4, mixed precision bf16 (compute capability 8.0)" in stdout


def four_nodes_of_eight_t4(tmp_path, node_id: int) -> tuple[str, str]:
    return generate(tmp_path, " ".join(["7.5"] * 8), SLURM_JOB_ID="31337", SLURM_NNODES="4",
                    SLURM_NODEID=str(node_id), SLURM_JOB_NODELIST="t4-node[08-11]",
                    SLURMD_NODENAME=f"t4-node{8 + node_id:02d}")


FOUR_BY_EIGHT = """\
# Written by launch/node_launcher.py for SLURM job 31337, node {rank} of 4 (t4-node{host}).
compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
num_machines: 4
num_processes: 32
machine_rank: {rank}
main_process_ip: t4-node08
main_process_port: 27337
rdzv_backend: static
same_network: true
gpu_ids: all
mixed_precision: fp16
use_cpu: false
main_training_function: main
"""


def test_four_nodes_of_eight_gpus_as_rank_0(tmp_path):
    stdout, config = four_nodes_of_eight_t4(tmp_path, 0)
    assert config == FOUR_BY_EIGHT.format(rank=0, host="08")
    # Rank 0 prints the job's whole rank table; every node prints its own line.
    assert "SLURM job 31337: 4 node(s) x 8 process(es) = 32, mixed precision fp16 (compute capability 7.5)" in stdout
    table = [line.split() for line in stdout.splitlines() if line.startswith("  machine_rank")]
    assert table == [["machine_rank", str(r), f"t4-node{8 + r:02d}", "ranks", f"{8 * r}-{8 * r + 7}"] for r in range(4)]
    assert "[machine_rank 0 t4-node08] 8 GPU(s), ranks 0-7 of 32, fp16" in stdout


def test_four_nodes_of_eight_gpus_as_rank_3(tmp_path):
    stdout, config = four_nodes_of_eight_t4(tmp_path, 3)
    assert config == FOUR_BY_EIGHT.format(rank=3, host="11")
    assert "machine_rank   0" not in stdout  # the table is printed once, by rank 0
    assert "[machine_rank 3 t4-node11] 8 GPU(s), ranks 24-31 of 32, fp16" in stdout


@pytest.mark.parametrize("capability, precision", [("7.0", "fp16"), ("8.0", "bf16")], ids=["V100", "A100"])
def test_v100_and_a100_nodes(tmp_path, capability, precision):
    _, config = generate(tmp_path, " ".join([capability] * 4), SLURM_JOB_ID="5000", SLURM_NNODES="2",
                         SLURM_NODEID="1", SLURM_JOB_NODELIST="g[1-2]")
    assert config == textwrap.dedent(f"""\
        # Written by launch/node_launcher.py for SLURM job 5000, node 1 of 2 (g2).
        compute_environment: LOCAL_MACHINE
        distributed_type: MULTI_GPU
        num_machines: 2
        num_processes: 8
        machine_rank: 1
        main_process_ip: g1
        main_process_port: 25000
        rdzv_backend: static
        same_network: true
        gpu_ids: all
        mixed_precision: {precision}
        use_cpu: false
        main_training_function: main
        """)


def test_local_mode_ignores_slurm_and_a_single_gpu_needs_no_rendezvous(tmp_path):
    _, config = generate(tmp_path, "7.5", "--local", SLURM_JOB_ID="5000", SLURM_NNODES="2", SLURM_NODEID="1",
                         SLURM_JOB_NODELIST="g[1-2]")
    body = [line for line in config.splitlines() if not line.startswith("#")]
    assert body == ["compute_environment: LOCAL_MACHINE", "distributed_type: 'NO'", "num_machines: 1",
                    "num_processes: 1", "machine_rank: 0", "mixed_precision: fp16", "use_cpu: false",
                    "main_training_function: main"]


def test_generated_configs_are_valid_accelerate_configs(tmp_path):
    _, config = four_nodes_of_eight_t4(tmp_path, 3)
    loaded = load_config_from_file(str(next(tmp_path.glob("node-*.yaml"))))
    assert (loaded.num_machines, loaded.num_processes, loaded.machine_rank) == (4, 32, 3)
    assert (loaded.main_process_ip, loaded.main_process_port, loaded.mixed_precision) == ("t4-node08", 27337, "fp16")


@pytest.mark.parametrize("slurm, message", [
    ({"SLURM_NNODES": "3", "SLURM_JOB_NODELIST": "g[1-2]"}, "SLURM_NNODES=3 but SLURM_JOB_NODELIST='g[1-2]' names 2"),
    ({"SLURM_NODEID": "1", "SLURMD_NODENAME": "g7"}, "SLURM_NODEID=1 is g2 in SLURM_JOB_NODELIST, but this node is g7"),
    ({"SLURM_NODEID": "2"}, "SLURM_NODEID=2 is outside the job's 2 nodes"),
    ({"SLURM_GPUS_ON_NODE": "0"}, "no GPUs on this node"),
])
def test_inconsistent_environments_are_one_line_errors(tmp_path, slurm, message):
    env = clean_env(PATH=f"{STANDINS}{os.pathsep}{os.environ['PATH']}", STANDIN_GPU_CAPS="8.0",
                    **{"SLURM_JOB_ID": "9", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "g[1-2]", **slurm})
    result = subprocess.run([sys.executable, str(LAUNCH / "node_launcher.py"), "--dry-run", "--config-dir",
                             str(tmp_path)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and message in result.stderr and len(result.stderr.splitlines()) == 1


def test_without_nvidia_smi_the_precision_must_be_given():
    # sbatch and local.sh users set MIXED_PRECISION; the message names it (and the launcher's option).
    with pytest.raises(launcher.LaunchError, match=r"set MIXED_PRECISION=bf16 .* or fp16 for sbatch.*--mixed-prec"):
        launcher.plan_node({"SLURM_GPUS_ON_NODE": "4"}, [])
    with pytest.raises(launcher.LaunchError, match="set MIXED_PRECISION="):
        launcher.read_compute_capabilities(fake_run(returncode=2, stderr="Field is not valid"))
    assert launcher.plan_node({"SLURM_GPUS_ON_NODE": "4"}, [], "fp16").mixed_precision == "fp16"


# ------------------------------------------------------------------------------ profiles

# The profiles, with the GPU each is for and its compute capability.
PROFILES = ["1xGPU", "4xA40", "4xA100", "4xV100", "8xA40", "8xA100", "8xV100", "8xH100", "16xA40", "16xA100",
            "32xT4"]
CAPABILITY = {"GPU": (8, 0), "A40": (8, 6), "A100": (8, 0), "H100": (9, 0), "V100": (7, 0), "T4": (7, 5)}
NODE_SPECIFIC = {"main_process_ip", "main_process_port"}


def sbatch_directives(script: Path) -> dict[str, str | None]:
    directives = {}
    for line in script.read_text().splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line[len("#SBATCH --"):].partition("=")
            directives[key] = value or None
    return directives


@pytest.mark.parametrize("profile", PROFILES)
def test_profile_script_and_accelerate_config_describe_the_same_hardware(profile):
    """A node of the profile's hardware generates the profile's own file (plus its rank, head and port)."""
    gpus_total, gpu_type = profile.split("x")
    directives = sbatch_directives(LAUNCH / f"{profile}.sh")
    nodes, gpus_per_node = int(directives["nodes"]), int(directives["gres"].rsplit(":", 1)[1])
    assert nodes * gpus_per_node == int(gpus_total)
    assert directives["ntasks-per-node"] == "1"  # one node launcher per node
    assert re.fullmatch(r"B:USR1@\d+", directives["signal"]) and "requeue" in directives

    env = {"SLURM_JOB_ID": "1234", "SLURM_NNODES": str(nodes), "SLURM_NODEID": "0",
           "SLURM_JOB_NODELIST": f"n[1-{nodes}]", "SLURM_GPUS_ON_NODE": str(gpus_per_node)}
    plan = launcher.plan_node(env, [CAPABILITY[gpu_type]] * gpus_per_node)
    generated = yaml.safe_load(launcher.render_config(plan))
    profile_file = REPO / "accelerate_configs" / f"{profile}.yaml"
    assert {k: v for k, v in generated.items() if k not in NODE_SPECIFIC} == yaml.safe_load(profile_file.read_text())
    load_config_from_file(str(profile_file))  # accelerate knows every key


def test_cpu_profiles_are_one_and_two_processes():
    one = load_config_from_file(str(REPO / "accelerate_configs" / "1xCPU.yaml"))
    two = load_config_from_file(str(REPO / "accelerate_configs" / "2xCPU.yaml"))
    assert (one.num_processes, one.use_cpu, two.num_processes) == (1, True, 2)


@pytest.mark.parametrize("profile", ["1xCPU", "2xCPU"])
def test_cpu_profile_scripts_generate_their_accelerate_configs(profile):
    """launch/<n>xCPU.sh asks for no GPUs and runs n processes; its node generates accelerate_configs/<n>xCPU.yaml."""
    script = LAUNCH / f"{profile}.sh"
    directives = sbatch_directives(script)
    assert "gres" not in directives and directives["nodes"] == "1" and directives["ntasks-per-node"] == "1"
    assert re.fullmatch(r"B:USR1@\d+", directives["signal"]) and "requeue" in directives
    exec_line = script.read_text().strip().splitlines()[-1]
    assert exec_line == f'exec bash launch/slurm_job.sh --cpu-processes {profile[0]} "$@"'
    env = {"SLURM_JOB_ID": "1234", "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "c1"}
    # A CPU node with GPUs visible still trains on its CPUs: nvidia-smi is not asked.
    plan = launcher.plan_node(dict(env, SLURM_GPUS_ON_NODE="4"), [(8, 0)] * 4, cpu_processes=int(profile[0]))
    assert (plan.processes_per_node, plan.mixed_precision, plan.cpu) == (int(profile[0]), "no", True)
    generated = yaml.safe_load(launcher.render_config(plan))
    expected = yaml.safe_load((REPO / "accelerate_configs" / f"{profile}.yaml").read_text())
    assert {k: v for k, v in generated.items() if k not in NODE_SPECIFIC} == expected
    assert "1 node(s) x" in launcher.rank_table(plan) and "(CPU processes)" in launcher.rank_table(plan)


def test_cpu_processes_must_be_at_least_one():
    with pytest.raises(launcher.LaunchError, match="--cpu-processes: expected a number of processes >= 1, got 0"):
        launcher.plan_node({}, [], cpu_processes=0)


SHELL_SCRIPTS = sorted(LAUNCH.glob("*.sh")) + sorted(STANDINS.iterdir())


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_parse(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert os.access(script, os.X_OK), f"{script.name} is not executable"


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck is not installed here; .ci/run installs it (apt-get install shellcheck)")
@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_pass_shellcheck(script):
    result = subprocess.run(["shellcheck", "--shell=bash", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


# ----------------------------------------------------------------- wrappers, end to end

NO_BN_ARCH = '"vit_tiny_patch16_224"'  # LayerNorm only: no per-process batch statistics


def submit_dir(tmp_path: Path, tiny_folder: Path, workers: int = 0, **train) -> Path:
    """A directory to submit from, as a clone would be (launch/ at its root), with tiny configs."""
    root = tmp_path / "submit"
    root.mkdir()
    (root / "launch").symlink_to(LAUNCH)
    write(root / "data.toml", data_toml(tiny_folder, workers=workers))
    write(root / "train.toml", tiny_train_toml(arch=NO_BN_ARCH, **train))
    return root


def slurm_env(root: Path, job_id: int, gpus_per_node: int, **extra) -> dict:
    return clean_env(PATH=f"{STANDINS}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                     PYTHON=sys.executable, SLURM_JOB_ID=str(job_id), STANDIN_GPUS_PER_NODE=str(gpus_per_node),
                     STANDIN_GPU_CAPS=" ".join(["8.0"] * gpus_per_node),
                     STANDIN_SCONTROL_LOG=str(root / "scontrol.log"), **extra)


def sbatch_command(profile: str, *args: str) -> list[str]:
    return ["sbatch", "-A", "test-account", f"launch/{profile}.sh", "data.toml", "train.toml", *args]


def sbatch(root: Path, profile: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(sbatch_command(profile, *args), cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)


@contextmanager
def in_background(command: list[str], cwd: Path, env: dict, log: Path) -> Iterator[subprocess.Popen]:
    """A job running in its own process group, output to ``log``; stopped if the test fails first."""
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            yield process
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)  # the launchers pass it on to the workers
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()


def wait_for_first_record(process: subprocess.Popen, metrics: Path, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not (metrics.exists() and metrics.read_text().strip()):
        assert process.poll() is None, f"ended with status {process.returncode}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "training did not finish its first epoch"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def two_node_job(tiny_folder, tmp_path_factory):
    """launch/8xA100.sh on two simulated nodes with one GPU each: two real CPU processes."""
    root = submit_dir(tmp_path_factory.mktemp("two_nodes"), tiny_folder, max_epochs=2)
    result = sbatch(root, "8xA100", slurm_env(root, job_id=4242, gpus_per_node=1))
    return root, result


def test_two_node_job_trains_and_writes_its_run_directory(two_node_job):
    root, result = two_node_job
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = root / "runs" / "4242"  # keyed by the job id
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2] and records[-1]["step"] == 6
    assert all(r["val_samples"] == 15 for r in records)
    assert (run_dir / "config.toml").is_file() and "finished" in (run_dir / "train.log").read_text()
    assert "on 2 process(es)" in result.stdout  # one rendezvous across both nodes
    assert "SLURM job 4242: 2 node(s) x 1 process(es) = 2, mixed precision bf16" in result.stdout
    for rank in (0, 1):
        node_config = yaml.safe_load((run_dir / "launch" / f"node-{rank}.yaml").read_text())
        assert node_config["machine_rank"] == rank and node_config["main_process_ip"] == "127.0.0.1"
        assert node_config["main_process_port"] == launcher.port_for_job("4242")
    assert "training finished" in result.stdout
    assert not (root / "scontrol.log").exists()  # a finished run is never requeued


def test_two_processes_follow_the_one_process_loss_trajectory(two_node_job, tmp_path):
    """Same global batches, gradients averaged over processes: the same run, up to float rounding."""
    root, result = two_node_job
    assert result.returncode == 0
    single = run_train(["--data-cfg", str(root / "data.toml"), "--train-cfg", str(root / "train.toml"),
                        "--output-dir", str(tmp_path / "single")])
    assert single.returncode == 0, single.stderr[-3000:]
    two = read_metrics(root / "runs" / "4242" / "metrics.jsonl")
    one = read_metrics(tmp_path / "single" / "metrics.jsonl")
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
        assert a["val_acc1"] == b["val_acc1"]
    assert one[0]["train_loss"] != pytest.approx(one[1]["train_loss"], rel=1e-3)  # training did move


def test_preempted_job_is_requeued_and_resumes_into_the_same_run(tiny_folder, tmp_path):
    # A loader worker process per loader: srun passes the signal to them too, as SLURM does.
    root = submit_dir(tmp_path, tiny_folder, workers=1, max_epochs=500)
    env = slurm_env(root, job_id=4243, gpus_per_node=2)  # launch/4xA40.sh on a node with 2 GPUs
    run_dir, log = root / "runs" / "4243", tmp_path / "job.log"
    with in_background(sbatch_command("4xA40"), root, env, log) as job:
        wait_for_first_record(job, run_dir / "metrics.jsonl", log)
        job.send_signal(signal.SIGUSR1)  # what #SBATCH --signal=B:USR1@600 sends the batch shell
        job.wait(timeout=300)
    output = log.read_text()
    assert job.returncode == EXIT_PREEMPTED, output[-3000:]
    assert output.count("received SIGUSR1: stopping after this step") == 2, output[-3000:]  # once per rank
    assert (root / "scontrol.log").read_text() == "requeue 4243\n"
    assert "requeueing job 4243" in output
    assert list((run_dir / "checkpoints").iterdir())
    done = len(read_metrics(run_dir / "metrics.jsonl"))
    assert done < 500

    # SLURM starts the requeued job again with the same id: it resumes in runs/4243. (The extra
    # --set only makes it short; max_epochs may change on resume.)
    again = sbatch(root, "4xA40", dict(env, SLURM_RESTART_COUNT="1"), f"--set=train.max_epochs={done + 1}")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resumed from runs/4243/checkpoints/" in again.stdout
    assert [r["epoch"] for r in read_metrics(run_dir / "metrics.jsonl")] == list(range(1, done + 2))
    assert (root / "scontrol.log").read_text() == "requeue 4243\n"  # finished: not requeued again


def test_failed_training_is_not_requeued(tiny_folder, tmp_path):
    root = submit_dir(tmp_path, tiny_folder)
    result = sbatch(root, "1xGPU", slurm_env(root, job_id=4244, gpus_per_node=1), "--set", "train.lr=-1")
    assert result.returncode == 2  # the trainer's own status, through accelerate launch
    assert "error: train.toml (with --set): train.lr must be > 0, got -1" in result.stderr
    assert "not requeued" in result.stderr
    assert not (root / "scontrol.log").exists()


def test_the_one_gpu_profile_asks_for_the_micro_batch_that_fits(tiny_folder, tmp_path):
    """launch/1xGPU.sh passes train.micro_batch_size = "auto" (on the CPU: the whole batch);
    a --set of the user's comes after it and wins."""
    root = submit_dir(tmp_path, tiny_folder)
    result = sbatch(root, "1xGPU", slurm_env(root, job_id=4246, gpus_per_node=1))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert tomllib.loads((root / "runs" / "4246" / "config.toml").read_text())["train"]["micro_batch_size"] == "auto"
    assert 'train.micro_batch_size = "auto" on the CPU: the whole per-process batch (8)' in result.stdout
    mine = sbatch(root, "1xGPU", slurm_env(root, job_id=4247, gpus_per_node=1), "--set", "train.micro_batch_size=3")
    assert mine.returncode == 2 and "train.micro_batch_size (3) must divide the per-process batch" in mine.stderr


def test_wrapper_refuses_to_run_outside_slurm_or_without_configs(tmp_path, tiny_folder):
    root = submit_dir(tmp_path, tiny_folder)
    outside = subprocess.run(["bash", "launch/slurm_job.sh", "data.toml", "train.toml"], cwd=root,
                             env=clean_env(), capture_output=True, text=True)
    assert outside.returncode == 2 and "submit this with sbatch" in outside.stderr
    env = slurm_env(root, job_id=4245, gpus_per_node=1)
    missing = subprocess.run(["sbatch", "launch/4xA40.sh", "nope.toml", "train.toml"], cwd=root, env=env,
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "config file not found: nope.toml" in missing.stderr
    usage = subprocess.run(["sbatch", "launch/4xA40.sh"], cwd=root, env=env, capture_output=True, text=True)
    assert usage.returncode == 2 and usage.stderr.startswith("usage: sbatch -A <account> launch/<profile>.sh")
    for bad, message in [(["--cpu-processes", "0"], "error: --cpu-processes: expected a number of processes >= 1"),
                         (["--cpu-processes", "two"], "got 'two'")]:
        result = subprocess.run(["sbatch", "launch/slurm_job.sh", *bad, "data.toml", "train.toml"], cwd=root, env=env,
                                capture_output=True, text=True)
        assert result.returncode == 2 and message in result.stderr and len(result.stderr.splitlines()) == 1
    precision = subprocess.run(["sbatch", "launch/2xCPU.sh", "data.toml", "train.toml"], cwd=root,
                               env=dict(env, MIXED_PRECISION="bf32"), capture_output=True, text=True)
    assert precision.returncode == 2
    assert precision.stderr == "error: MIXED_PRECISION=bf32: expected bf16, fp16 or no\n"
    assert not (root / "runs").exists()


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc), as SLURM's process tracking sees a job."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # the field after "(command) state"
        except (OSError, IndexError, ValueError):
            continue  # ended meanwhile
        children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def wait_until_ended(pids: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(Path(f"/proc/{pid}").exists() and "(Z)" not in status_of(pid) for pid in pids):
        assert time.monotonic() < deadline, "the job's processes did not end"
        time.sleep(0.2)


def status_of(pid: int) -> str:
    try:
        state = (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split() or ["?"])[0]
    except OSError:
        return "(gone)"
    return f"({state})"


def test_scancel_sigterm_to_every_process_reaches_a_checkpoint_with_loader_workers(tiny_folder, tmp_path):
    """Plain ``scancel``: SIGTERM to every process of the job, the HF loader's worker processes
    included. Training still writes its checkpoint; the job is not requeued (launch/2xCPU.sh)."""
    root = submit_dir(tmp_path, tiny_folder, workers=1, max_epochs=500)
    with (root / "train.toml").open("a") as train:
        train.write("checkpoint_freq = 1000\n")  # [log]: no epoch checkpoints, only the stop's
    env = slurm_env(root, job_id=4246, gpus_per_node=0)
    run_dir, log = root / "runs" / "4246", tmp_path / "job.log"
    with in_background(sbatch_command("2xCPU"), root, env, log) as job:
        wait_for_first_record(job, run_dir / "metrics.jsonl", log)
        processes = process_tree(job.pid)
        assert len(processes) >= 8  # shell, srun, launcher, accelerate, 2 trainers, their loader workers
        for pid in processes:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        wait_until_ended(processes, timeout=300)
    output = log.read_text()
    assert "DataLoader worker" not in output, output[-3000:]
    assert output.count("received SIGTERM: stopping after this step") == 2, output[-3000:]  # once per rank
    assert "training stopped with a checkpoint (status 75" in output, output[-3000:]
    assert len(list((run_dir / "checkpoints").iterdir())) == 1
    assert "2 node(s)" not in output and "1 node(s) x 2 process(es) = 2, mixed precision no (CPU processes)" in output
    assert not (root / "scontrol.log").exists()  # the batch shell died of SIGTERM: no requeue


def test_local_launcher_passes_a_stop_signal_to_a_single_process(tiny_folder, tmp_path):
    """launch/local.sh on a one-GPU workstation: SIGUSR1 gives a checkpoint and status 75."""
    root = submit_dir(tmp_path, tiny_folder, max_epochs=500)
    env = slurm_env(root, job_id=0, gpus_per_node=1)
    del env["SLURM_JOB_ID"]
    out, log = tmp_path / "local-run", tmp_path / "local.log"
    command = [str(LAUNCH / "local.sh"), "data.toml", "train.toml", "--output-dir", str(out)]
    with in_background(command, root, env, log) as job:
        wait_for_first_record(job, out / "metrics.jsonl", log)
        job.send_signal(signal.SIGUSR1)  # local.sh has become the node launcher (exec)
        job.wait(timeout=300)
    output = log.read_text()
    assert job.returncode == EXIT_PREEMPTED, output[-3000:]
    assert "local run: 1 node(s) x 1 process(es) = 1, mixed precision bf16" in output
    assert list((out / "checkpoints").iterdir())
    assert tomllib.loads((out / "config.toml").read_text())["train"]["micro_batch_size"] == "auto"


# ------------------------------------------------------------------------------- sync_bn


def test_sync_bn_converts_batchnorm_on_gpus_and_keeps_timm_activations():
    resnet = use_sync_batchnorm(build_model("resnet18", 3, 32, 32), num_processes=4, device_type="cuda")
    assert not any(type(m) is torch.nn.BatchNorm2d for m in resnet.modules())
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in resnet.modules()) == 20
    # timm's fused BatchNorm + activation layers keep their activation.
    effnet = use_sync_batchnorm(build_model("efficientnet_b0", 3, 32, 32), num_processes=2, device_type="cuda")
    assert type(effnet.bn1).__name__ == "SyncBatchNormAct" and isinstance(effnet.bn1.act, torch.nn.SiLU)


def test_sync_bn_with_one_process_leaves_the_model_alone():
    model = build_model("resnet18", 3, 32, 32)
    assert use_sync_batchnorm(model, num_processes=1, device_type="cpu") is model
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())


def test_sync_bn_on_several_cpu_processes_is_a_clear_error():
    # PyTorch's SyncBatchNorm raises on CPU tensors in a process group, at the first forward.
    with pytest.raises(UserError, match=r"train.sync_bn = true needs GPUs.*2 CPU processes"):
        use_sync_batchnorm(build_model("resnet18", 3, 32, 32), num_processes=2, device_type="cpu")


def test_sync_bn_is_a_config_key(tmp_path):
    data = write(tmp_path / "d.toml", data_toml(tmp_path))
    train = write(tmp_path / "t.toml", tiny_train_toml())
    assert load_config(data, train, ["train.sync_bn=true"]).train.sync_bn is True
    assert load_config(data, train).train.sync_bn is False


def test_two_cpu_processes_with_sync_bn_stop_with_one_line(tiny_folder, tmp_path):
    data = write(tmp_path / "data.toml", data_toml(tiny_folder))
    train = write(tmp_path / "train.toml", tiny_train_toml(sync_bn="true"))
    result = run_train(["--data-cfg", str(data), "--train-cfg", str(train), "--output-dir", str(tmp_path / "out")],
                       launcher=accelerate_launch(2, port=free_port()))
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors and all("train.sync_bn = true needs GPUs" in line for line in errors)
