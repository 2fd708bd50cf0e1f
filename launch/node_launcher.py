#!/usr/bin/env python3
"""One node's share of a training run: write its accelerate config, launch, report how it ended.

Run once per node, inside ``srun`` with one task per node (``launch/slurm_job.sh`` does
this), or once on a workstation with ``--local`` (``launch/local.sh``)::

    python launch/node_launcher.py [--local] [--config-dir DIR] [--mixed-precision bf16|fp16|no] \
        [--cpu-processes N] -- --data-cfg D.toml --train-cfg T.toml --output-dir DIR [--set k=v ...]

Each node decides for itself, from its own environment: how many machines there are and
which one it is (SLURM_NNODES, SLURM_NODEID), the head node (the first host of
SLURM_JOB_NODELIST), a rendezvous port derived from SLURM_JOB_ID (so two jobs sharing a
node do not collide), one process per GPU, and the mixed precision from the GPUs' compute
capability: bf16 from 8.0 (Ampere) on, fp16 below. ``torch.cuda.is_bf16_supported()`` is
not used for this: it answers yes on V100 and T4, which have no bf16 units. With
``--cpu-processes N`` (the CPU profiles, launch/1xCPU.sh and 2xCPU.sh) the node runs N
processes on its CPUs instead (fp32 unless --mixed-precision) and looks for no GPUs.

It then runs ``accelerate launch`` with the written config and stays alive beside it for two
reasons. Stop signals (SIGUSR1, SIGUSR2, SIGTERM) are passed straight to the training
processes: torchrun's agent would die of SIGUSR1 and leave its workers (each in a session of
its own) training on, so accelerate's process ignores SIGUSR1 and SIGUSR2. And the node's exit
status is the trainer's own (75 after a preemption checkpoint), which ``accelerate launch``
reports as 1 for any failed worker; ``launch/train_worker.py`` leaves each worker's pid and
status in a folder this script reads.

Standard library only, so that it starts fast and before anything heavy is imported.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

# The trainer's status after a stop signal, once its checkpoint is written: EX_TEMPFAIL from
# sysexits.h. It is train.preemption.EXIT_PREEMPTED; this file cannot import torch to read it.
EXIT_PREEMPTED = 75
EXIT_USAGE = 2

# Ampere (8.0) is the first generation with bf16 tensor cores.
BF16_MIN_CAPABILITY = (8, 0)
# Rendezvous ports: below Linux's ephemeral range (32768-60999), clear of the well-known ones.
PORT_BASE, PORT_SPAN = 20000, 12000
LOCAL_PORT = 29500  # accelerate's default; on one machine it moves to a free port if taken
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
# Workers inherit the ignored SIGUSR1 and SIGUSR2 until the trainer installs its handlers, so
# a stop signal is sent again at this interval until the workers have ended.
RESEND_INTERVAL_S = 30.0
# How long torchrun's agent waits for workers it has signalled before killing them.
AGENT_SHUTDOWN_TIMEOUT_S = 300
WORKER = Path(__file__).resolve().parent / "train_worker.py"
STATUS_DIR_ENV = "TRAIN_WORKER_STATUS_DIR"


class LaunchError(Exception):
    """A problem with the node's environment or the arguments: one line, exit status 2."""


# ------------------------------------------------------------------------ reading SLURM


def expand_hostlist(text: str) -> list[str]:
    """SLURM's compressed host list, in order: ``gpu[01-03,07],login1`` -> gpu01 gpu02 gpu03 gpu07 login1.

    Numbers keep the zero padding of the range's first number; several bracket groups in one
    name expand to every combination, as ``scontrol show hostnames`` does.
    """
    items, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            raise LaunchError(f"SLURM_JOB_NODELIST: unbalanced brackets in {text!r}")
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    items.append(current)
    if depth or not all(item.strip() for item in items):
        raise LaunchError(f"SLURM_JOB_NODELIST: cannot read {text!r}")
    return [host for item in items for host in _expand_item(item.strip(), text)]


def _expand_item(item: str, whole: str) -> list[str]:
    match = re.fullmatch(r"([^\[\]]*)\[([^\[\]]+)\](.*)", item)
    if match is None:
        if "[" in item or "]" in item:
            raise LaunchError(f"SLURM_JOB_NODELIST: cannot read {whole!r}")
        return [item]
    prefix, ranges, rest = match.groups()
    numbers = []
    for part in ranges.split(","):
        low, dash, high = part.strip().partition("-")
        if not low.isdigit() or (dash and not high.isdigit()) or (dash and int(high) < int(low)):
            raise LaunchError(f"SLURM_JOB_NODELIST: cannot read the range {part!r} in {whole!r}")
        last = int(high) if dash else int(low)
        numbers += [str(n).zfill(len(low)) for n in range(int(low), last + 1)]
    return [prefix + number + tail for number in numbers for tail in _expand_item(rest, whole)]


def port_for_job(job_id: str) -> int:
    """The rendezvous port of a job: the same on every node, different for most jobs sharing one."""
    if not job_id.isdigit():
        raise LaunchError(f"SLURM_JOB_ID: expected a number, got {job_id!r}")
    return PORT_BASE + int(job_id) % PORT_SPAN


# -------------------------------------------------------------------------------- GPUs


# How a user sets the mixed precision: the launch scripts read MIXED_PRECISION, this script
# takes --mixed-precision; an error names both.
PRECISION_HINT = "set MIXED_PRECISION=bf16 (Ampere and newer) or fp16 for sbatch or launch/local.sh " \
                 "(node_launcher.py: --mixed-precision)"


def read_compute_capabilities(
        run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> list[tuple[int, int]]:
    """Compute capability of each GPU ``nvidia-smi`` shows; empty where there is no nvidia-smi."""
    command = ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"]
    try:
        result = run(command, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        return []
    if result.returncode != 0:
        said = (result.stderr or result.stdout).strip().splitlines()
        raise LaunchError(f"{' '.join(command)} failed ({said[0] if said else f'status {result.returncode}'}); "
                          f"older drivers lack this field: {PRECISION_HINT}")
    capabilities = []
    for line in result.stdout.splitlines():
        if not line.strip():
            continue
        match = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", line)
        if match is None:
            raise LaunchError(f"nvidia-smi reported compute capability {line.strip()!r}; expected e.g. 8.0")
        capabilities.append((int(match[1]), int(match[2])))
    return capabilities


def count_gpus(env: Mapping[str, str], capabilities: list[tuple[int, int]]) -> int:
    """GPUs this node's training may use: SLURM's count, else CUDA_VISIBLE_DEVICES, else nvidia-smi's."""
    if env.get("SLURM_GPUS_ON_NODE", "").strip():
        value = env["SLURM_GPUS_ON_NODE"].strip()
        if not value.isdigit():
            raise LaunchError(f"SLURM_GPUS_ON_NODE: expected a number, got {value!r}")
        return int(value)
    if "CUDA_VISIBLE_DEVICES" in env:
        return len([d for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()])
    return len(capabilities)


def precision_for(capabilities: list[tuple[int, int]]) -> str:
    """bf16 when every GPU has bf16 tensor cores (compute capability >= 8.0), else fp16."""
    return "bf16" if min(capabilities) >= BF16_MIN_CAPABILITY else "fp16"


# ------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class NodePlan:
    """Everything that differs between nodes and jobs, resolved."""
    job_id: str | None  # None: a workstation, not a SLURM job
    hosts: tuple[str, ...]
    machine_rank: int
    processes_per_node: int
    port: int
    mixed_precision: str
    capability: tuple[int, int] | None  # the lowest on the node; None when not read
    cpu: bool = False  # processes on the CPU (--cpu-processes), no GPUs

    @property
    def num_machines(self) -> int:
        return len(self.hosts)

    @property
    def num_processes(self) -> int:
        return self.num_machines * self.processes_per_node

    @property
    def head(self) -> str:
        return self.hosts[0]

    def ranks_of(self, machine_rank: int) -> range:
        first = machine_rank * self.processes_per_node
        return range(first, first + self.processes_per_node)


def plan_node(env: Mapping[str, str], capabilities: list[tuple[int, int]], mixed_precision: str | None = None,
              local: bool = False, cpu_processes: int | None = None) -> NodePlan:
    """This node's plan from its environment and its GPUs' compute capabilities.

    ``cpu_processes``: that many processes on the CPU; GPUs are then not looked at."""
    cpu = cpu_processes is not None
    if cpu:
        if cpu_processes < 1:
            raise LaunchError(f"--cpu-processes: expected a number of processes >= 1, got {cpu_processes}")
        processes, capabilities = cpu_processes, []
        mixed_precision = mixed_precision or "no"
    else:
        processes = count_gpus(env, capabilities)
    if processes < 1:
        raise LaunchError("no GPUs on this node (SLURM_GPUS_ON_NODE, CUDA_VISIBLE_DEVICES and nvidia-smi show none); "
                          "on CPUs use a CPU profile (launch/1xCPU.sh, launch/2xCPU.sh)")
    if mixed_precision is None:
        if not capabilities:
            raise LaunchError(f"cannot tell the GPUs' compute capability (nvidia-smi not found): {PRECISION_HINT}")
        mixed_precision = precision_for(capabilities)
    capability = min(capabilities) if capabilities else None

    if local or not env.get("SLURM_JOB_ID"):
        return NodePlan(None, (socket.gethostname(),), 0, processes, LOCAL_PORT, mixed_precision, capability, cpu)

    job_id = env["SLURM_JOB_ID"]
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise LaunchError("SLURM_JOB_NODELIST is not set; run this inside srun, one task per node")
    hosts = tuple(expand_hostlist(nodelist))
    num_nodes = env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES") or str(len(hosts))
    node_id = env.get("SLURM_NODEID", "0")
    if not num_nodes.isdigit() or not node_id.isdigit():
        raise LaunchError(f"SLURM_NNODES={num_nodes!r}, SLURM_NODEID={node_id!r}: expected numbers")
    if int(num_nodes) != len(hosts):
        raise LaunchError(f"SLURM_NNODES={num_nodes} but SLURM_JOB_NODELIST={nodelist!r} names {len(hosts)} hosts")
    machine_rank = int(node_id)
    if machine_rank >= len(hosts):
        raise LaunchError(f"SLURM_NODEID={machine_rank} is outside the job's {len(hosts)} nodes")
    # The head node must be where machine rank 0 runs: check that ranks follow the node list.
    this_host = env.get("SLURMD_NODENAME")
    if this_host and this_host != hosts[machine_rank]:
        raise LaunchError(f"SLURM_NODEID={machine_rank} is {hosts[machine_rank]} in SLURM_JOB_NODELIST, "
                          f"but this node is {this_host}")
    return NodePlan(job_id, hosts, machine_rank, processes, port_for_job(job_id), mixed_precision, capability, cpu)


def render_config(plan: NodePlan) -> str:
    """The accelerate config file for this node (accelerate's own YAML keys).

    CPU processes get the same MULTI_GPU launch as GPUs (torchrun starts them; accelerate's
    MULTI_CPU type would need mpirun): the trainer, finding no CUDA, joins them in a gloo
    group. A single CPU process is accelerate's plain CPU run."""
    where = (f"SLURM job {plan.job_id}, node {plan.machine_rank} of {plan.num_machines} "
             f"({plan.hosts[plan.machine_rank]})" if plan.job_id else f"this machine ({plan.hosts[0]})")
    lines = [f"# Written by launch/node_launcher.py for {where}.",
             "compute_environment: LOCAL_MACHINE",
             f"distributed_type: {'MULTI_GPU' if plan.num_processes > 1 else repr('NO')}",
             f"num_machines: {plan.num_machines}",
             f"num_processes: {plan.num_processes}",
             f"machine_rank: {plan.machine_rank}"]
    if plan.num_machines > 1:
        lines += [f"main_process_ip: {plan.head}"]
    if plan.num_processes > 1:
        lines += [f"main_process_port: {plan.port}",
                  "rdzv_backend: static",
                  "same_network: true",
                  "gpu_ids: all"]
    lines += [f"mixed_precision: {plan.mixed_precision if plan.mixed_precision != 'no' else repr('no')}",
              f"use_cpu: {'true' if plan.cpu and plan.num_processes == 1 else 'false'}",
              "main_training_function: main"]
    return "\n".join(lines) + "\n"


def rank_table(plan: NodePlan) -> str:
    """The whole job's layout (printed by machine rank 0) as one line per node."""
    if plan.cpu:
        capability = "CPU processes"
    elif plan.capability:
        capability = f"compute capability {plan.capability[0]}.{plan.capability[1]}"
    else:
        capability = "given"
    title = f"SLURM job {plan.job_id}" if plan.job_id else "local run"
    rendezvous = (f", rendezvous {plan.head if plan.num_machines > 1 else '127.0.0.1'}:{plan.port}"
                  if plan.num_processes > 1 else "")
    lines = [f"{title}: {plan.num_machines} node(s) x {plan.processes_per_node} process(es) = "
             f"{plan.num_processes}, mixed precision {plan.mixed_precision} ({capability}){rendezvous}"]
    width = max(len(host) for host in plan.hosts)
    for rank, host in enumerate(plan.hosts):
        ranks = plan.ranks_of(rank)
        lines.append(f"  machine_rank {rank:>3}  {host:<{width}}  ranks {ranks[0]}-{ranks[-1]}")
    return "\n".join(lines)


def node_line(plan: NodePlan, config_path: Path) -> str:
    """What each node says for itself once its config is written."""
    ranks = plan.ranks_of(plan.machine_rank)
    devices = "CPU process(es)" if plan.cpu else "GPU(s)"
    return (f"[machine_rank {plan.machine_rank} {plan.hosts[plan.machine_rank]}] {plan.processes_per_node} {devices}, "
            f"ranks {ranks[0]}-{ranks[-1]} of {plan.num_processes}, {plan.mixed_precision}; config {config_path}")


# ----------------------------------------------------------------------------- launch


class SignalForwarder:
    """Passes stop signals to the training processes whose pid files are in ``status_dir``."""

    def __init__(self, status_dir: Path):
        self.status_dir = status_dir
        self.received: int | None = None
        self._previous = {}

    def install(self) -> SignalForwarder:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        # Ctrl-C reaches accelerate's process as well, which stops the workers: keep waiting
        # for them here, to report how they ended.
        self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, lambda signum, frame: None)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        # os.write, not print: a handler may interrupt a print, and buffered writes are not reentrant.
        os.write(sys.stdout.fileno(), f"node launcher: received {signal.Signals(signum).name}, "
                                      "passing it to the training processes\n".encode())
        self.received = signum
        self.forward()

    def forward(self) -> None:
        for pid in running_workers(self.status_dir):
            try:
                os.kill(pid, self.received)
            except ProcessLookupError:
                pass

    def wait(self, process: subprocess.Popen) -> int:
        while True:
            try:
                return process.wait(timeout=RESEND_INTERVAL_S)
            except subprocess.TimeoutExpired:
                if self.received is not None:
                    self.forward()


def running_workers(status_dir: Path) -> list[int]:
    """Pids of the workers that have started and not yet recorded an exit status."""
    pids = []
    for pid_file in sorted(status_dir.glob("*.pid")):
        if not pid_file.with_suffix(".exit").exists():
            text = pid_file.read_text().strip()
            if text.isdigit():
                pids.append(int(text))
    return pids


def worker_statuses(status_dir: Path) -> list[int]:
    return [int(p.read_text()) for p in sorted(status_dir.glob("*.exit"))
            if p.read_text().strip().lstrip("-").isdigit()]


def wait_for_workers(status_dir: Path, timeout_s: float) -> None:
    """Workers can outlive their launcher (killed by a signal): give them time to record a status."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = []
        for pid in running_workers(status_dir):
            try:
                os.kill(pid, 0)
                alive.append(pid)
            except ProcessLookupError:
                pass
        if not alive:
            return
        time.sleep(0.2)


def node_status(launcher_status: int, statuses: list[int], expected: int) -> int:
    """The node's exit status: the workers' own when they all agree, otherwise the launcher's."""
    if launcher_status == 0:
        return 0
    if len(statuses) == expected and len(set(statuses)) == 1 and statuses[0] > 0:
        return statuses[0]
    return launcher_status if launcher_status > 0 else 128 - launcher_status  # -N: killed by signal N


def _ignore_forwarded_signals() -> None:
    # In accelerate's process (and inherited by the workers until the trainer installs its
    # handlers): SIGUSR1 would kill torchrun's agent; the workers get it from us instead.
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)


def launch(config_path: Path, train_args: list[str], expected_workers: int, cpu: bool = False) -> int:
    """``accelerate launch`` this node's workers; returns the node's exit status."""
    status_dir = Path(tempfile.mkdtemp(prefix="node-launcher-"))
    env = dict(os.environ, **{STATUS_DIR_ENV: str(status_dir)})
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU profile trains on the CPU, whatever the node has
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(AGENT_SHUTDOWN_TIMEOUT_S))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_path),
               str(WORKER), *train_args]
    forwarder = SignalForwarder(status_dir).install()
    try:
        process = subprocess.Popen(command, env=env, preexec_fn=_ignore_forwarded_signals)
        launcher_status = forwarder.wait(process)
        wait_for_workers(status_dir, AGENT_SHUTDOWN_TIMEOUT_S)
        statuses = worker_statuses(status_dir)
    finally:
        forwarder.uninstall()
        shutil.rmtree(status_dir, ignore_errors=True)
    return node_status(launcher_status, statuses, expected_workers)


# ---------------------------------------------------------------------------- network


def socket_interface_env(interface: str, available: list[str] | None = None) -> dict[str, str]:
    """NCCL_SOCKET_IFNAME and GLOO_SOCKET_IFNAME for the interface the nodes should talk over.

    Left alone, both libraries pick an interface themselves, which goes wrong on nodes with
    several networks (or where the hostname resolves to loopback). NCCL reads a prefix (``ib``
    matches ``ib0``), a comma list, ``^`` to exclude and ``=`` for an exact name; each plain
    name must match an interface of this node.
    """
    available = [name for _, name in socket.if_nameindex()] if available is None else available
    for item in interface.split(","):
        name = item.strip().lstrip("=")
        if item.startswith("^") or not name:
            continue
        if not any(candidate.startswith(name) for candidate in available):
            raise LaunchError(f"--network-interface {interface}: no interface {name!r} on this node "
                              f"(it has {', '.join(available)})")
    return {"NCCL_SOCKET_IFNAME": interface, "GLOO_SOCKET_IFNAME": interface}


# ------------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" in argv:
        split = argv.index("--")
        own, train_args = argv[:split], argv[split + 1:]
    else:
        own, train_args = argv, []
    parser = argparse.ArgumentParser(
        prog="python launch/node_launcher.py",
        description="Write this node's accelerate config from SLURM's environment and its GPUs, then run "
                    "`accelerate launch -m train` with the arguments after `--`.")
    parser.add_argument("--local", action="store_true",
                        help="one machine, whatever SLURM variables are set (a workstation or an interactive job)")
    parser.add_argument("--config-dir", type=Path, default=None,
                        help="where to write node-<machine_rank>.yaml, and node-<machine_rank>.status at the end "
                             "(default: a temporary folder, no status)")
    parser.add_argument("--mixed-precision", choices=["bf16", "fp16", "no"], default=None,
                        help="instead of deciding from the GPUs' compute capability")
    parser.add_argument("--cpu-processes", type=int, default=None, metavar="N",
                        help="N training processes on this node's CPUs (fp32 unless --mixed-precision); no GPUs")
    parser.add_argument("--network-interface", default=None, metavar="IFACE",
                        help="the network interface between nodes (e.g. ib0): sets NCCL_SOCKET_IFNAME and "
                             "GLOO_SOCKET_IFNAME for training")
    parser.add_argument("--dry-run", action="store_true",
                        help="write and print the config and the plan, launch nothing")
    return parser.parse_args(own), train_args


def write_status(path: Path, status: int) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(f"{status}\n")
    partial.replace(path)  # the batch script never reads half a number


def main(argv: list[str] | None = None) -> int:
    args, train_args = parse_args(sys.argv[1:] if argv is None else argv)
    # Without --config-dir the config lives as long as the run, in a folder removed afterwards.
    with tempfile.TemporaryDirectory(prefix="accelerate-config-") as scratch:
        plan = None
        try:
            capabilities = [] if args.cpu_processes is not None else read_compute_capabilities()
            plan = plan_node(os.environ, capabilities, args.mixed_precision, args.local, args.cpu_processes)
            config_dir = args.config_dir or Path(scratch)
            config_dir.mkdir(parents=True, exist_ok=True)
            config_path = config_dir / f"node-{plan.machine_rank}.yaml"
            config_path.write_text(render_config(plan), encoding="utf-8")
            network = socket_interface_env(args.network_interface) if args.network_interface else {}
        except (LaunchError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            if args.config_dir:  # a failure of this node's own, which the batch script must not take for a lost node
                rank = plan.machine_rank if plan is not None else os.environ.get("SLURM_NODEID", "0")
                with contextlib.suppress(OSError):
                    write_status(args.config_dir / f"node-{rank}.status", EXIT_USAGE)
            return EXIT_USAGE
        if plan.machine_rank == 0:
            print(rank_table(plan))
        print(node_line(plan, config_path), flush=True)
        if network:
            print(" ".join(f"{key}={value}" for key, value in network.items()), flush=True)
            os.environ.update(network)  # the training processes inherit it
        if args.dry_run:
            print(config_path.read_text(encoding="utf-8"), end="")
            return 0
        status = launch(config_path, train_args, plan.processes_per_node, plan.cpu)
        if args.config_dir:
            # For launch/slurm_job.sh, which sees only srun's status, the highest of the nodes':
            # a node killed by a signal hides that the others stopped at a checkpoint.
            write_status(args.config_dir / f"node-{plan.machine_rank}.status", status)
    if status == EXIT_PREEMPTED and plan.machine_rank == 0:
        print(f"node launcher: training stopped with a checkpoint (status {EXIT_PREEMPTED}; torchrun reports it "
              "as a failure above); the same command with the same --output-dir resumes it", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
