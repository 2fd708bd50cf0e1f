"""One training process as launch/node_launcher.py starts it: ``python -m train`` that reports back.

``accelerate launch`` (torchrun underneath) turns a worker's non-zero status into a failure
of its own, status 1, so the trainer's "checkpoint written, run me again" status (75) would
never reach the SLURM wrapper. This runs the trainer in this process, exactly as
``python -m train ARGS`` would, and leaves two files in $TRAIN_WORKER_STATUS_DIR for the node
launcher: ``<local rank>.pid`` at start (where to send stop signals) and ``<local rank>.exit``
with the status at the end (also when the progress watchdog of train/peers.py ends it).
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
from pathlib import Path


def exit_status(code: object) -> int:
    """The process status ``sys.exit(code)`` produces."""
    if code is None:
        return 0
    return code if isinstance(code, int) else 1


def write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)  # a reader never sees half a number


def main() -> None:
    status_dir = Path(os.environ["TRAIN_WORKER_STATUS_DIR"])
    rank = os.environ.get("LOCAL_RANK", "0")
    write_atomically(status_dir / f"{rank}.pid", str(os.getpid()))
    # The progress watchdog ends a stuck trainer from a thread, past the `finally` below.
    from train import peers
    peers.HARD_EXIT_HOOKS.append(lambda code: write_atomically(status_dir / f"{rank}.exit", str(code)))
    status = 1  # an exception other than SystemExit
    try:
        runpy.run_module("train", run_name="__main__", alter_sys=True)
        status = 0
    except SystemExit as exc:
        status = exit_status(exc.code)
        raise
    finally:
        # The trainer has put its signal handlers away: a late stop signal (torchrun's agent
        # sends SIGTERM once another worker has ended) must not kill this one before it reports.
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_IGN)
        write_atomically(status_dir / f"{rank}.exit", str(status))


if __name__ == "__main__":
    sys.path[0] = os.getcwd()  # like `python -m`: the working directory, not launch/, comes first
    main()
