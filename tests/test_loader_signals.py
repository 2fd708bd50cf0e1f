"""The HF loader's worker processes and the stop signals (SIGTERM, SIGUSR1, SIGUSR2).

SLURM signals every process of a job step, loader workers included (``scancel``, the time
limit, SIGTERM-based preemption). The workers must leave those signals to the trainer, which
checkpoints and then ends them; PyTorch's own last resort, a SIGTERM from the trainer to a
worker that does not exit when asked, must still end one. The whole path, through the SLURM
wrappers, is tested in test_launch.py (stand-ins) and test_slurm_real.py (a real cluster).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import os
import signal
import subprocess
import threading
import time

import torch

from train.data import hf


def another_process_sends(sig: signal.Signals, pid: int) -> None:
    """As slurmstepd does: the sender is not the worker's parent."""
    subprocess.run(["kill", "-s", sig.name.removeprefix("SIG"), str(pid)], check=True)


def test_loader_workers_leave_stop_signals_to_the_trainer_and_end_on_its_sigterm():
    dataset = [torch.full((2,), float(i)) for i in range(64)]
    loader = hf.make_loader(dataset, [[i] for i in range(64)], num_workers=1)
    batches = iter(loader)
    assert next(batches).tolist() == [[0.0, 0.0]]
    workers = multiprocessing.active_children()
    assert len(workers) == 1
    worker = workers[0]

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        another_process_sends(sig, worker.pid)
    time.sleep(1.0)  # long enough for a default disposition to have killed it
    assert worker.is_alive()
    assert [next(batches).tolist() for _ in range(3)] == [[[1.0, 1.0]], [[2.0, 2.0]], [[3.0, 3.0]]]

    os.kill(worker.pid, signal.SIGTERM)  # from the trainer: PyTorch's last resort
    worker.join(timeout=30)
    assert worker.exitcode == 0
    del batches



def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("PPid:"))


def test_loader_workers_come_from_the_fork_server_not_from_the_threaded_trainer():
    """A trainer always runs threads (Gloo's, TensorBoard's, the heartbeat), and CPython 3.11
    before 3.11.8 can leave a child forked from a threaded process deadlocked in its first
    instant (gh-112275; a 2-process run hung so at its first evaluation). The workers are
    therefore forked by multiprocessing's single-purpose fork server, and that server, like
    them, holds the stop signals blocked from its start, since SLURM signals it too."""
    stop = threading.Event()
    threading.Thread(target=stop.wait, daemon=True).start()  # a threaded trainer, as in a run
    loader = hf.make_loader([torch.zeros(1)] * 4, [[i] for i in range(4)], num_workers=1)
    batches = iter(loader)
    next(batches)
    (worker,) = multiprocessing.active_children()
    server = multiprocessing.forkserver._forkserver._forkserver_pid
    assert parent_of(worker.pid) == server != os.getpid()
    with open(f"/proc/{server}/status") as status:
        blocked = int(next(line.split()[1] for line in status if line.startswith("SigBlk:")), 16)
    assert all(blocked & (1 << (sig - 1)) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2))
    stop.set()
    del batches
