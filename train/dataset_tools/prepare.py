"""Prepare ImageNet-1K for training.

    python -m train.data.prepare archives DOWNLOADS [--output data/Imagenet] [--link] [--workers N]
    python -m train.data.prepare check data/Imagenet
    python -m train.data.prepare hub ILSVRC/imagenet-1k [--token T] [--write-config FILE]

``archives`` turns the three official ILSVRC2012 files (or the folders they were extracted
to) into the layout the trainer and torchvision read; re-running it resumes. ``check``
counts a finished layout against its devkit. ``hub`` downloads and prepares the Hugging Face
copy for the ``hf`` loader. Exit status: 0 done, 1 the layout is incomplete (listed),
2 bad input (one line), 130 interrupted (re-run to resume).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..data.verify import available_cpus
from ..errors import EXIT_USER_ERROR, UserError, report_error
from .devkit import DEVKIT_FOLDER, read_devkit
from .hub_source import add_hub_arguments, run_hub
from .imagenet import Interrupted, Sources, check_layout, find_sources, prepare_from_sources

EXIT_INCOMPLETE = 1
EXIT_INTERRUPTED = 130
DEFAULT_OUTPUT = Path("data/Imagenet")  # where configs/data/imagenet*.toml look


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.data.prepare", description=__doc__.split("\n\n")[0],
                                     epilog="Documentation: docs/data.md")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{archives,check,hub}")

    archives = commands.add_parser(
        "archives", help="official ILSVRC2012 archives -> data/Imagenet",
        description="Extract ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar and ILSVRC2012_devkit_t12.tar.gz "
                    "(or the folders they were extracted to) into train/<wnid>/, val/<wnid>/, dev/, meta.bin and "
                    "classes.tsv. Re-running the same command resumes.")
    archives.add_argument("downloads", type=Path, nargs="?", default=None,
                          help="folder holding the three files under their official names")
    archives.add_argument("--train", type=Path, default=None,
                          help="ILSVRC2012_img_train.tar, or a folder of <wnid>.tar or <wnid>/ class folders")
    archives.add_argument("--val", type=Path, default=None,
                          help="ILSVRC2012_img_val.tar, or the folder of its 50,000 images")
    archives.add_argument("--devkit", type=Path, default=None,
                          help=f"ILSVRC2012_devkit_t12.tar.gz, or the {DEVKIT_FOLDER}/ folder")
    archives.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"default: {DEFAULT_OUTPUT}")
    archives.add_argument("--link", action="store_true",
                          help="symlink images from extracted folders instead of copying them (archives are "
                               "still extracted)")
    archives.add_argument("--workers", type=int, default=available_cpus(), help="parallel extraction threads")

    check = commands.add_parser("check", help="count a prepared folder's images against its devkit",
                                description="Compare train/ and val/ with the devkit: every class present with "
                                            "its number of images. Exit 1 and a list when something is missing.")
    check.add_argument("folder", type=Path, nargs="?", default=DEFAULT_OUTPUT)
    check.add_argument("--devkit", type=Path, default=None,
                       help=f"devkit archive or folder (default: FOLDER/dev/{DEVKIT_FOLDER})")

    hub = commands.add_parser("hub", help="download and prepare a Hugging Face copy for the hf loader",
                              description="Download both splits of a Hub data set into the datasets cache and "
                                          "check them, so training starts without a download.")
    add_hub_arguments(hub)
    args = parser.parse_args(argv)
    if args.command == "archives" and args.workers < 1:
        parser.error(f"--workers {args.workers}: must be at least 1")
    return args


def run_archives(args: argparse.Namespace) -> int:
    sources: Sources = find_sources(args.downloads, args.train, args.val, args.devkit)
    try:
        report = prepare_from_sources(sources, args.output, args.link, args.workers)
    except (Interrupted, KeyboardInterrupt):
        print(f"interrupted: finished classes in {args.output} are kept; re-run the same command to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    print(report.summary())
    if not report.complete:
        print(f"{args.output} is NOT complete ({len(report.problems)} problem(s) above); the trainer refuses it "
              "until a re-run of this command completes it", file=sys.stderr)
        return EXIT_INCOMPLETE
    print(f"{args.output} is complete; train with data_dir = \"{args.output}\"")
    return 0


def run_check(args: argparse.Namespace) -> int:
    if not args.folder.is_dir():
        raise UserError(f"{args.folder}: no such folder")
    devkit_source = args.devkit or args.folder / "dev" / DEVKIT_FOLDER
    if args.devkit is None and not devkit_source.exists():
        raise UserError(f"{args.folder} has no dev/{DEVKIT_FOLDER} to count against; pass --devkit "
                        "ILSVRC2012_devkit_t12.tar.gz (or its unpacked folder)")
    report = check_layout(args.folder, read_devkit(devkit_source))
    print(report.summary())
    if not report.complete:
        print(f"{args.folder} is NOT complete ({len(report.problems)} problem(s) above)", file=sys.stderr)
        return EXIT_INCOMPLETE
    print(f"{args.folder} is complete")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "archives":
            return run_archives(args)
        if args.command == "check":
            return run_check(args)
        return run_hub(args)
    except UserError as exc:
        return report_error(exc)
    except OSError as exc:  # an unwritable output folder, a full disk outside the extraction, ...
        print(f"error: {exc.filename or ''}{': ' if exc.filename else ''}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
