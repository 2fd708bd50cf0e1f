"""Run under ``accelerate launch`` by the multi-process tests: the trainer, with test hooks
chosen by the environment:

    STOP_ONE_PROCESS=<rank>:epoch-end:<epoch>   a stop signal to that process only, right after
                                                its last step of the epoch
    STOP_ONE_PROCESS=<rank>:step:<step>         ... right after its optimizer step
    RECORD_FILE_CHECKS=<folder>                 each process that looks at the data set's files
                                                (stat, for image verification) leaves
                                                ``<folder>/rank<r>``

The stop signal is sent by the process to itself (SIGUSR1, as SLURM's warning would), so
the moment is exact; the other process never receives anything. Training runs as
``launch/train_worker.py`` runs it, so each process's exit status is left in
``$TRAIN_WORKER_STATUS_DIR/<rank>.exit``.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from train import loop  # noqa: E402


def signal_myself() -> None:
    os.kill(os.getpid(), signal.SIGUSR1)


def at_epoch_end(epoch: int) -> None:
    """The loop calls epoch_mean_loss once an epoch's steps are done: signal before it."""
    original = loop.epoch_mean_loss

    def epoch_mean_loss(run, state):
        if run.trainer.epoch + 1 == epoch:
            signal_myself()
        return original(run, state)

    loop.epoch_mean_loss = epoch_mean_loss


def after_step(step: int) -> None:
    original = loop.start_run

    def start_run(config, options):
        run, epoch_state = original(config, options)
        on_micro_batches, done = run.train_step.on_micro_batches, [run.trainer.step + epoch_state.batches_done]

        def counted_step(micro_batches):  # the loop's call for one optimizer step
            result = on_micro_batches(micro_batches)
            done[0] += 1
            if done[0] == step:
                signal_myself()
            return result

        run.train_step.on_micro_batches = counted_step
        return run, epoch_state

    loop.start_run = start_run


def record_file_checks(folder: Path) -> None:
    from train.data import verify
    original = verify._signature

    def signature(path):
        (folder / f"rank{os.environ['RANK']}").touch()
        return original(path)

    verify._signature = signature


def main() -> None:
    if os.environ.get("RECORD_FILE_CHECKS"):
        record_file_checks(Path(os.environ["RECORD_FILE_CHECKS"]))
    plan = os.environ.get("STOP_ONE_PROCESS")
    if plan:
        rank, when, number = plan.split(":")
        if int(rank) == int(os.environ["RANK"]):
            {"epoch-end": at_epoch_end, "step": after_step}[when](int(number))
    sys.argv = [str(REPO / "launch" / "train_worker.py"), *sys.argv[1:]]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
