"""Command line: ``[accelerate launch] -m train --data-cfg D.toml --train-cfg T.toml [--set k=v] [--output-dir DIR]``.

This is the only module that reads the command line and the environment; it validates the
whole configuration before any data or model is touched, and turns user errors into one
line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from . import data, models, optim, wandb_tracking
from .config import Config, describe_source, load_config
from .errors import EXIT_IO_ERROR, EXIT_USER_ERROR, SharedUserError, StorageError, UserError, first_line
from .loop import fit
from .peers import PeerLost
from .preemption import EXIT_PREEMPTED, Preempted
from .preflight import DEFAULT_STEPS, preflight
from .startup import RunOptions

DEFAULTS = Path(__file__).parent / "defaults"
BUILTIN_DATA = DEFAULTS / "builtin-data.toml"
BUILTIN_TRAIN = DEFAULTS / "builtin-train.toml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m train",
        description="Train an image classifier. With no arguments: ResNet-18 on the built-in data set, on the CPU.",
        epilog="Documentation: docs/training.md; every config key: docs/config-reference.md")
    parser.add_argument("--data-cfg", type=Path, default=None,
                        help="data TOML (default: the built-in data set)")
    parser.add_argument("--train-cfg", type=Path, default=None,
                        help="training TOML (default: the built-in ResNet-18 demo)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value in TOML syntax, e.g. --set train.lr=0.5 "
                             "--set data.dataloader.name='\"hf\"' (repeatable)")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="run directory (default: runs/<SLURM_JOB_ID or timestamp>); running the same "
                             "command again resumes from its newest checkpoint")
    parser.add_argument("--resume", type=Path, default=None, metavar="CHECKPOINT",
                        help="resume from this checkpoint folder (RUN/checkpoints/<step>) instead")
    parser.add_argument("--preflight", action="store_true",
                        help="run every stage of the run in miniature (a few steps, a checkpoint and resume, an "
                             "evaluation on a slice, the export), print each stage's result and an estimate of the "
                             "full run's time and GPU-hours, and exit; writes nothing into the run directory")
    parser.add_argument("--preflight-steps", type=int, default=DEFAULT_STEPS, metavar="N",
                        help=f"--preflight: training steps in all (default {DEFAULT_STEPS}; a third warm up)")
    parser.add_argument("--preflight-keep", action="store_true",
                        help="--preflight: keep its scratch directory (next to the run directory) for inspection")
    args = parser.parse_args(argv)
    if args.preflight_steps < 6:
        parser.error(f"--preflight-steps {args.preflight_steps}: at least 6 (warm-up, then steps to time)")
    return args


def load_checked_config(data_cfg: Path, train_cfg: Path, overrides: list[str], num_processes: int) -> Config:
    """The config as a run would start with it: files, overrides, and what the chosen model,
    optimizer and loader accept; raises UserError."""
    config = load_config(data_cfg, train_cfg, overrides, num_processes)
    models.check_model(config.train, config.data.num_classes, describe_source(train_cfg, "train", overrides))
    optim.check_supported(config.train.optim, describe_source(train_cfg, "train", overrides))
    data.check_supported(config.data, describe_source(data_cfg, "data", overrides))
    wandb_tracking.check_supported(config.train.log, describe_source(train_cfg, "train", overrides))
    return config


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def main(argv: list[str] | None = None) -> int:
    argv_used = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv_used)
    try:
        data_cfg = args.data_cfg or BUILTIN_DATA
        train_cfg = args.train_cfg or BUILTIN_TRAIN
        num_processes = int(os.environ.get("WORLD_SIZE", "1"))
        config = load_checked_config(data_cfg, train_cfg, args.overrides, num_processes)
    except UserError as exc:
        # Every process validates the same files and fails alike: one report is enough.
        if _is_main_process():
            print(f"error: {first_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR

    options = RunOptions(output_dir=args.output_dir, job_id=os.environ.get("SLURM_JOB_ID") or None,
                         launcher_mixed_precision=os.environ.get("ACCELERATE_MIXED_PRECISION") or None,
                         resume=args.resume, command=" ".join(["python -m train", *map(shlex.quote, argv_used)]))
    if args.preflight:
        return preflight(config, options, args.preflight_steps, args.preflight_keep)
    try:
        fit(config, options)
    except Preempted as exc:
        if _is_main_process():
            print(f"preempted: {exc}; checkpoint written, exiting with status {EXIT_PREEMPTED} "
                  "(run the same command again to resume)", file=sys.stderr)
        return EXIT_PREEMPTED
    except PeerLost as exc:
        # Each surviving process says what it saw: the lost one cannot.
        print(f"error: [rank {os.environ.get('RANK', '0')}] {exc}; exiting with status {EXIT_PREEMPTED} to resume "
              "from the last checkpoint", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    except StorageError as exc:
        # Every process stops with the same error (they agree on it): one report is enough.
        if _is_main_process():
            print(f"error: {first_line(exc)}", file=sys.stderr)
        return EXIT_IO_ERROR
    except UserError as exc:
        if isinstance(exc, SharedUserError) and not _is_main_process():
            return EXIT_USER_ERROR  # the main process reports it
        # Problems found while reading data may concern one process only: each reports.
        rank = os.environ.get("RANK")
        prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
        print(f"error: {prefix}{first_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0
