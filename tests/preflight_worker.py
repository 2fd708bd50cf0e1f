"""Run under ``accelerate launch`` by tests/test_preflight.py: ``python -m train`` with one fault,
made on the main process only once the preflight's scratch directory exists:

    preflight_worker.py STATUS_DIR TRAIN_ARGS...

a file where the export's folder goes (``<scratch>/model``). Each process's exit status is
left in ``STATUS_DIR/<rank>.exit``.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from train import preflight  # noqa: E402
from train.cli import main  # noqa: E402

real_start_run = preflight.start_run


def start_run(*args, **kwargs):
    run, state = real_start_run(*args, **kwargs)
    if run.accelerator.is_main_process:
        (run.run_dir / "model").write_text("a file where the export's folder goes\n")
    return run, state


if __name__ == "__main__":
    preflight.start_run = start_run
    status = main(sys.argv[2:])
    from accelerate import PartialState
    (Path(sys.argv[1]) / f"{PartialState().process_index}.exit").write_text(str(status))
    sys.exit(status)
