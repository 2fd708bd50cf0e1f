"""Run by test_ddp_options.py under ``accelerate launch``: a training run with DDP's own
defaults (buffers broadcast before every forward, gradients apart from the all-reduce
buckets), the options the trainer used before issue 24:

    ddp_options_worker.py TRAINER-ARGS...
"""

from __future__ import annotations

import sys
from pathlib import Path

from accelerate.utils import DistributedDataParallelKwargs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train.startup  # noqa: E402
from train.cli import main  # noqa: E402

if __name__ == "__main__":
    train.startup.DDP_OPTIONS = DistributedDataParallelKwargs(broadcast_buffers=True, gradient_as_bucket_view=False)
    sys.exit(main(sys.argv[1:]))
