"""A real single-node SLURM cluster for the tests: munged, slurmctld and slurmd from a temporary folder.

Debian's packages (``munge``, ``slurmctld``, ``slurmd``, ``slurm-client``; ``.ci/run`` installs
them) are started by this module, each in the foreground as a child process, with a
``slurm.conf`` and a MUNGE key written into a folder of their own, on free ports and a MUNGE
socket of their own: nothing under /etc is read or changed, and a SLURM already running on the
machine is left alone. Clients find the cluster through ``SLURM_CONF`` (``cluster.env``).
:meth:`SlurmCluster.stop` cancels what is left of the jobs and stops the daemons by their PIDs.

Run by hand to rehearse the SLURM wrappers on this machine (as root)::

    python tests/slurm_cluster.py FOLDER             # prints the SLURM_CONF to export; Ctrl-C stops it
    python tests/slurm_cluster.py --two-nodes FOLDER # the same with two nodes (see TwoNodeCluster)

What the configuration chooses, and why:

* ``CPUs`` larger than the machine has, with ``SlurmdParameters=config_overrides``: the tests
  run several small jobs at once on a 2-core CI machine (they share the cores; nothing binds
  them, ``TaskPlugin=task/none``).
* ``cred_expire``: SLURM holds a requeued job for this long (default 120 s) before it starts
  again. The tests shorten it so a requeue costs seconds, and still see SLURM itself start
  the requeued job under its id after its hold; ``sched_interval`` lets the scheduler notice
  at once. Nothing else of the requeue path changes.
* ``KillWait=30``: as on most clusters, the time between SIGTERM and SIGKILL on ``scancel``.
* ``MinJobAge``: finished jobs stay visible to ``scontrol show job`` (there is no accounting
  database, so no ``sacct``) long enough for the tests to read their end state.
"""

from __future__ import annotations

import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "scancel", "squeue")
READY_TIMEOUT_S = 90
STOP_TIMEOUT_S = 30


class ClusterUnavailable(Exception):
    """SLURM cannot be started here; the message says why (a test skips with it)."""


def missing_requirements() -> str | None:
    """Why no cluster can be started on this machine, or None when it can be tried."""
    if sys.platform != "linux":
        return "a real SLURM cluster is started on Linux only"
    if os.geteuid() != 0:
        return "starting slurmd needs root (CI runs as root)"
    missing = [name for name in DAEMONS + CLIENTS if shutil.which(name, path=_search_path()) is None]
    if missing:
        return (f"SLURM/MUNGE commands not found: {', '.join(missing)} "
                "(apt-get install munge slurmctld slurmd slurm-client)")
    return None


def _search_path() -> str:
    # The daemons live in /usr/sbin, which a non-login PATH may lack.
    return os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])


# The daemons' ports: below Linux's ephemeral range (32768-60999), from which every outgoing
# connection (slurmctld's own among them) takes its local port, so none can take a port between
# its choice here and the daemon's bind; and below the node launcher's rendezvous ports (20000+).
DAEMON_PORTS = range(10000, 20000)


def _free_ports(count: int) -> list[int]:
    """``count`` distinct ports from DAEMON_PORTS that nothing listens on now."""
    chosen: list[int] = []
    for port in random.sample(DAEMON_PORTS, len(DAEMON_PORTS)):
        with socket.socket() as sock:
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                continue
        chosen.append(port)
        if len(chosen) == count:
            return chosen
    raise ClusterUnavailable(f"no {count} free ports in {DAEMON_PORTS.start}-{DAEMON_PORTS.stop - 1}")


def _run(command: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


@dataclass
class SlurmCluster:
    root: Path
    cpus: int = 8
    cred_expire_s: int = 10
    node: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """What a client needs to reach this cluster (add it to a command's environment)."""
        return {"SLURM_CONF": str(self.conf), "PATH": _search_path()}

    @property
    def client_prefix(self) -> list[str]:
        """What a client command (sbatch, scontrol, ...) is run under: nothing here, a namespace there."""
        return []

    def slurm_conf(self, ctld_port: int, slurmd_port: int) -> str:
        r = self.root
        return "\n".join([
            "# Written by tests/slurm_cluster.py: a single-node cluster for the tests.",
            "ClusterName=tests",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={r}/munge/munge.socket,cred_expire={self.cred_expire_s}",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool",
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd.pid",
            f"SlurmctldLogFile={r}/slurmctld.log",
            f"SlurmdLogFile={r}/slurmd.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SlurmdParameters=config_overrides",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=1,bf_interval=1",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "JobAcctGatherType=jobacct_gather/none",
            "MpiDefault=none",
            "JobRequeue=1",
            "ReturnToService=2",
            "KillWait=30",
            "MinJobAge=3600",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=1000 State=UNKNOWN",
            f"PartitionName=main Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
        ]) + "\n"

    # ------------------------------------------------------------------------- start, stop

    def start(self) -> SlurmCluster:
        """Start munged, slurmctld and slurmd; wait until a step runs. Raises ClusterUnavailable."""
        reason = missing_requirements()
        if reason:
            raise ClusterUnavailable(reason)
        for folder in ("munge", "state", "spool"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        os.chmod(key, 0o600)
        self.conf.write_text(self.slurm_conf(*_free_ports(2)))
        try:
            self._start_daemons(key)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_daemons(self, key: Path) -> None:
        munge = self.root / "munge"
        self._spawn("munged", ["munged", "--foreground", "--force", f"--socket={munge}/munge.socket",
                               f"--key-file={key}", f"--pid-file={munge}/munged.pid",
                               f"--log-file={munge}/munged.log", f"--seed-file={munge}/munged.seed"])
        self._wait_for(lambda: (munge / "munge.socket").exists(), "munged", munge / "munged.log")
        self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-f", str(self.conf)])
        self._wait_for(lambda: self._client(["scontrol", "ping"]).returncode == 0, "slurmctld",
                       self.root / "slurmctld.log")
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", self.node])
        self._wait_for(self._runs_a_step, "slurmd", self.root / "slurmd.log")

    def _spawn(self, name: str, command: list[str]) -> None:
        log = (self.root / f"{name}.out").open("w")
        self.processes[name] = subprocess.Popen(self._wrapped(name, command), stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, env=dict(os.environ, **self.env),
                                                start_new_session=True)
        log.close()

    def _wrapped(self, name: str, command: list[str]) -> list[str]:
        """The command line that starts daemon ``name`` (here: the command itself)."""
        return command

    def _client(self, command: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(self.client_prefix + command, env=dict(os.environ, **self.env), capture_output=True,
                              text=True, timeout=timeout)

    def _runs_a_step(self) -> bool:
        try:
            result = self._client(["srun", "--immediate=5", "-N1", "-n1", "hostname"], timeout=20)
        except subprocess.TimeoutExpired:
            return False
        return result.returncode == 0 and bool(result.stdout.strip())

    def _wait_for(self, ready, name: str, log: Path) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            process = self.processes[name]
            if process.poll() is not None:
                raise ClusterUnavailable(f"{name} exited with status {process.returncode}: {self._tail(name, log)}")
            if ready():
                return
            if time.monotonic() > deadline:
                raise ClusterUnavailable(f"{name} did not become ready within {READY_TIMEOUT_S}s: "
                                         f"{self._tail(name, log)}")
            time.sleep(0.5)

    def _tail(self, name: str, log: Path) -> str:
        lines = []
        for path in (self.root / f"{name}.out", log):
            if path.exists():
                lines += [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
        return lines[-1] if lines else "no log"

    def stop(self) -> None:
        """Cancel the jobs left, then stop the slurmds, slurmctld and munged (in that order) by PID."""
        if "slurmctld" in self.processes and self.processes["slurmctld"].poll() is None:
            self._cancel_all()
        for name in reversed(list(self.processes)):  # started munged, slurmctld, then the slurmd(s)
            process = self.processes.pop(name)
            if process.poll() is not None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def _cancel_all(self) -> None:
        try:
            jobs = self.job_ids()
            if jobs:
                self._client(["scancel", *jobs])
            deadline = time.monotonic() + 60  # KillWait, then SIGKILL: every job ends within it
            while self.job_ids() and time.monotonic() < deadline:
                time.sleep(1)
        except subprocess.TimeoutExpired:
            pass

    # ------------------------------------------------------------------------- jobs

    def job_ids(self) -> list[str]:
        """Jobs that have not ended."""
        result = self._client(["squeue", "--noheader", "--format=%i"])
        return result.stdout.split() if result.returncode == 0 else []

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, Requeue, Reason, ...)."""
        result = self._client(["scontrol", "show", "job", "--oneliner", job_id])
        if result.returncode != 0:
            raise RuntimeError(f"scontrol show job {job_id}: {result.stderr.strip()}")
        return dict(re.findall(r"(\w+)=(\S*)", result.stdout))


# ------------------------------------------------------------------------- two nodes

SUBNET = "198.18.0"  # 198.18.0.0/15 is reserved for network tests (RFC 2544): no real host has it
CONTROLLER = ("controller", f"{SUBNET}.1")
NODES = (("node1", f"{SUBNET}.11"), ("node2", f"{SUBNET}.12"))
NETWORK_COMMANDS = ("ip", "nsenter", "unshare", "mount", "hostname")


def missing_network_requirements() -> str | None:
    """Why no two-node cluster can be started here, or None when it can be tried."""
    reason = missing_requirements()
    if reason:
        return reason
    missing = [name for name in NETWORK_COMMANDS if shutil.which(name, path=_search_path()) is None]
    if missing:
        return f"commands for network namespaces not found: {', '.join(missing)} (apt-get install iproute2 util-linux)"
    return None


@dataclass
class TwoNodeCluster(SlurmCluster):
    """Two SLURM nodes of 1 CPU each on one machine, each in a network namespace of its own.

    Three namespaces, all made here: ``<tag>-ctl`` holds a bridge with the controller's address
    (munged and slurmctld run there, and every client command: ``client_prefix``), and
    ``<tag>-node1``, ``<tag>-node2`` each hold one slurmd, on its own address, with an ``eth0``
    whose other end is a port of the bridge. Only 198.18.0.0/24 is used, only inside these
    namespaces: the machine's own interfaces, routes and addresses are not touched.

    Every daemon also gets a mount and a UTS namespace of its own: the hosts file of the
    cluster bound over /etc/hosts (node names resolve to their addresses for the daemons and
    for the jobs' processes, which they start, and nowhere else) and the node's name as host
    name, as on a real node (gloo finds its address from it). The partition oversubscribes the
    single CPUs (``OverSubscribe=FORCE``) so that the tests' jobs run at the same time.

    :meth:`stop` stops the daemons by PID, then deletes the namespaces by name, which removes
    the veth pairs and the bridge with them.
    """

    cpus: int = 1
    tag: str = field(default_factory=lambda: f"slurm{os.getpid()}")
    node: str = CONTROLLER[0]
    oversubscribe: int = 8

    @property
    def control_namespace(self) -> str:
        return f"{self.tag}-ctl"

    def namespace(self, node: str) -> str:
        return f"{self.tag}-{node}"

    @property
    def namespaces(self) -> list[str]:
        return [self.control_namespace] + [self.namespace(name) for name, _ in NODES]

    @property
    def client_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.control_namespace]

    @property
    def hosts_file(self) -> Path:
        return self.root / "hosts"

    def slurm_conf(self, ctld_port: int, slurmd_port: int) -> str:
        single = super().slurm_conf(ctld_port, slurmd_port).splitlines()
        r = self.root
        replaced = {
            "SlurmctldHost": f"SlurmctldHost={CONTROLLER[0]}({CONTROLLER[1]})",
            "SlurmdSpoolDir": f"SlurmdSpoolDir={r}/spool/%n",
            "SlurmdPidFile": f"SlurmdPidFile={r}/slurmd-%n.pid",
            "SlurmdLogFile": f"SlurmdLogFile={r}/slurmd-%n.log",
        }
        lines = ["# Written by tests/slurm_cluster.py: a two-node cluster in network namespaces."]
        for line in single[1:]:
            name = line.partition("=")[0]
            if name in ("NodeName", "PartitionName"):
                continue
            lines.append(replaced.get(name, line))
        names = ",".join(name for name, _ in NODES)
        lines += [f"NodeName={name} NodeAddr={address} CPUs={self.cpus} RealMemory=1000 State=UNKNOWN"
                  for name, address in NODES]
        lines.append(f"PartitionName=main Nodes={names} Default=YES MaxTime=INFINITE State=UP "
                     f"OverSubscribe=FORCE:{self.oversubscribe}")
        # A loaded 2-core machine: slurmd may take longer than the default 10 s to answer.
        lines.append("MessageTimeout=60")
        return "\n".join(lines) + "\n"

    def _start_daemons(self, key: Path) -> None:
        self._make_network()
        munge = self.root / "munge"
        self._spawn("munged", ["munged", "--foreground", "--force", f"--socket={munge}/munge.socket",
                               f"--key-file={key}", f"--pid-file={munge}/munged.pid",
                               f"--log-file={munge}/munged.log", f"--seed-file={munge}/munged.seed"])
        self._wait_for(lambda: (munge / "munge.socket").exists(), "munged", munge / "munged.log")
        self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-f", str(self.conf)])
        self._wait_for(lambda: self._client(["scontrol", "ping"]).returncode == 0, "slurmctld",
                       self.root / "slurmctld.log")
        for name, _ in NODES:
            (self.root / "spool" / name).mkdir(parents=True, exist_ok=True)
            self._spawn(f"slurmd-{name}", ["slurmd", "-D", "-f", str(self.conf), "-N", name])
        for name, _ in NODES:
            self._wait_for(lambda: self._runs_a_step(), f"slurmd-{name}", self.root / f"slurmd-{name}.log")
        self._wait_for(self._runs_on_both, f"slurmd-{NODES[-1][0]}", self.root / f"slurmd-{NODES[-1][0]}.log")

    def _runs_on_both(self) -> bool:
        try:
            result = self._client(["srun", "--immediate=5", "-N2", "-n2", "hostname"], timeout=20)
        except subprocess.TimeoutExpired:
            return False
        return result.returncode == 0 and sorted(result.stdout.split()) == sorted(name for name, _ in NODES)

    def _make_network(self) -> None:
        """The namespaces, the bridge and a veth pair per node; the hosts file."""
        lines = ["127.0.0.1 localhost", f"{CONTROLLER[1]} {CONTROLLER[0]}"]
        self.hosts_file.write_text("\n".join(lines + [f"{address} {name}" for name, address in NODES]) + "\n")
        ctl = self.control_namespace
        steps = [["ip", "netns", "add", ns] for ns in self.namespaces]
        steps += [["ip", "-n", ctl, "link", "set", "lo", "up"],
                  ["ip", "-n", ctl, "link", "add", "br0", "type", "bridge"],
                  ["ip", "-n", ctl, "addr", "add", f"{CONTROLLER[1]}/24", "dev", "br0"],
                  ["ip", "-n", ctl, "link", "set", "br0", "up"]]
        for name, address in NODES:
            ns = self.namespace(name)
            steps += [["ip", "-n", ctl, "link", "add", self.link(name), "type", "veth", "peer", "name", "eth0",
                       "netns", ns],
                      ["ip", "-n", ctl, "link", "set", self.link(name), "master", "br0", "up"],
                      ["ip", "-n", ns, "link", "set", "lo", "up"],
                      ["ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0"],
                      ["ip", "-n", ns, "link", "set", "eth0", "up"]]
        for step in steps:
            result = _run(step)
            if result.returncode != 0:
                raise ClusterUnavailable(f"network namespaces: {' '.join(step)} failed: "
                                         f"{(result.stderr or result.stdout).strip()}")

    @staticmethod
    def link(node: str) -> str:
        """The bridge's end of a node's veth pair (in the controller's namespace)."""
        return f"to-{node}"

    def set_link(self, node: str, up: bool) -> None:
        """Take a node's network link down (the node is cut off from the others) or up again."""
        step = ["ip", "-n", self.control_namespace, "link", "set", self.link(node), "up" if up else "down"]
        result = _run(step)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(step)}: {result.stderr.strip()}")

    def _wrapped(self, name: str, command: list[str]) -> list[str]:
        node = name.removeprefix("slurmd-") if name.startswith("slurmd-") else None
        ns, host = (self.namespace(node), node) if node else (self.control_namespace, CONTROLLER[0])
        # nsenter, not `ip netns exec`, which mounts a /sys of its own without the cgroup file
        # system slurmd reads. nsenter and unshare exec (no --fork), and so does sh: the process
        # started is the daemon.
        script = 'mount --bind "$0" /etc/hosts && hostname "$1" && shift && exec "$@"'
        return ["nsenter", f"--net=/run/netns/{ns}", "unshare", "--mount", "--uts", "--propagation", "private",
                "sh", "-c", script, str(self.hosts_file), host, *command]

    def stop(self) -> None:
        """Stop the daemons (by PID), then delete the namespaces (by name): veths and bridge go with them."""
        try:
            super().stop()
        finally:
            existing = _run(["ip", "netns", "list"]).stdout.split()
            for ns in self.namespaces:
                if ns in existing:
                    _run(["ip", "netns", "delete", ns])

    def step_processes(self, job_id: str, node: str) -> list[int]:
        """PIDs of the processes of job ``job_id``'s steps (srun's tasks and their children) on ``node``.

        Found by their environment, which SLURM gives every process of a step; the batch script
        (on the first node) has no SLURM_STEP_ID, slurmd and slurmstepd no SLURM_JOB_ID."""
        pids = []
        for pid in _run(["ip", "netns", "pids", self.namespace(node)]).stdout.split():
            try:
                environ = set(Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
            except OSError:  # ended meanwhile
                continue
            if f"SLURM_JOB_ID={job_id}".encode() in environ and any(v.startswith(b"SLURM_STEP_ID=") for v in environ):
                pids.append(int(pid))
        return pids

def main(argv: list[str]) -> int:
    two_nodes = argv[:1] == ["--two-nodes"]
    argv = argv[1:] if two_nodes else argv
    if len(argv) != 1:
        print("usage: python tests/slurm_cluster.py [--two-nodes] FOLDER", file=sys.stderr)
        return 2
    cluster = (TwoNodeCluster if two_nodes else SlurmCluster)(Path(argv[0]).resolve())
    try:
        cluster.start()
    except ClusterUnavailable as exc:
        print(f"error: cannot start SLURM: {exc}", file=sys.stderr)
        return 1
    where = f"; run clients under {' '.join(cluster.client_prefix)}" if cluster.client_prefix else ""
    print(f"SLURM is running: export SLURM_CONF={cluster.conf}{where}  (Ctrl-C stops it)", flush=True)
    try:
        # Blocked only now, so that the daemons do not inherit the blocked mask.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
