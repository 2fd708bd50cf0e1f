"""``python -m train`` that pauses in the middle of a gradient accumulation, for a kill to land there:

    paused_train.py MARKER CALL [TRAINER ARGS...]

Before the train step's CALL-th forward pass (counting micro-batches from the start of this
process), it writes MARKER (JSON: the call, and whether gradients of earlier micro-batches of
the same step are held) and sleeps until it is killed.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from train.cli import main  # noqa: E402
from train.optim.step import TrainStep  # noqa: E402


def pause_at(marker: Path, call: int) -> None:
    calls = 0
    loss = TrainStep.loss

    def counting_loss(self, images, labels):
        nonlocal calls
        calls += 1
        if calls == call:
            held = any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in self.params)
            marker.write_text(json.dumps({"call": calls, "gradients_held": held}))
            time.sleep(3600)
        return loss(self, images, labels)

    TrainStep.loss = counting_loss


if __name__ == "__main__":
    pause_at(Path(sys.argv[1]), int(sys.argv[2]))
    sys.exit(main(sys.argv[3:]))
