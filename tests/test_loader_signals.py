"""The HF loader's worker processes and the stop signals (SIGTERM, SIGUSR1, SIGUSR2).

SLURM signals every process of a job step, loader workers included (``scancel``, the time
limit, SIGTERM-based preemption). The workers must leave those signals to the trainer, which
checkpoints and then ends them; PyTorch's own last resort, a SIGTERM from the trainer to a
worker that does not exit when asked, must still end one. The whole path, through the SLURM
wrappers, is tested in test_launch.py (stand-ins) and test_slurm_real.py (a real cluster).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import time

import torch

from train.data import hf


def another_process_sends(sig: signal.Signals, pid: int) -> None:
    """As slurmstepd does: the sender is not the worker's parent."""
    subprocess.run(["kill", "-s", sig.name.removeprefix("SIG"), str(pid)], check=True)


def test_loader_workers_leave_stop_signals_to_the_trainer_and_end_on_its_sigterm():
    dataset = [torch.full((2,), float(i)) for i in range(64)]
    loader = hf.make_loader(dataset, [[i] for i in range(64)], num_workers=1, pin_memory=False)
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

    os.kill(worker.pid, signal.SIGTERM)  # from the trainer (its parent): PyTorch's last resort
    worker.join(timeout=30)
    assert worker.exitcode == 0
    del batches

