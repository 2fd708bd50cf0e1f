"""Check a data set before training on it.

    python -m train.data.check PATH [--workers N] [--no-cache] [--num-classes N]

PATH is an ImageNet-layout folder (``train/<class>/*``, ``val/<class>/*``) or a folder of
WebDataset shards (the converter's, or the seed project's ``train-shard-*.tar``). Every
image is decoded; the command lists each one that cannot be (truncated, empty, not an image,
a format DALI does not read) with its path, shard index files that are missing or stale, and
the number of images per class. It exits with status 1 when it found a problem, 0 otherwise.

For a folder, the results go into the same cache the DALI loader consults, so a training
run started afterwards does not decode the images again.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from ..data import seed_shards
from ..data.folder import IMAGE_EXTENSIONS, DataError, scan_split
from ..data.shards import (
    MANIFEST,
    SPLITS,
    Shard,
    check_index,
    index_path,
    is_shard_set,
    iter_shard_samples,
    read_manifest,
)
from ..data.verify import Problem, available_cpus, default_cache_file, image_problem, verify_files
from ..errors import UserError, report_error

EXIT_PROBLEMS = 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.data.check",
                                     description="Decode every image of a data set folder or shard set; list the "
                                                 "unreadable ones and count images per class.",
                                     epilog="Documentation: docs/data.md")
    parser.add_argument("path", type=Path, help="ImageNet-layout folder, or folder of train-*.tar/val-*.tar shards")
    parser.add_argument("--workers", type=int, default=available_cpus(), help="parallel decoding threads")
    parser.add_argument("--no-cache", action="store_true",
                        help="decode every file again, ignoring results cached by earlier checks")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="the seed's shards, which name no classes: labels outside 0..N-1 are problems "
                             "(default: as many classes as the labels found)")
    return parser.parse_args(argv)


class Report:
    """What a check found: problems (each fails the check), notes, and images per class."""

    def __init__(self, class_names: tuple[str, ...]):
        self.class_names = class_names
        self.counts = {split: Counter() for split in SPLITS}
        self.problems: list[Problem] = []  # images that cannot be decoded
        self.shard_problems: list[str] = []  # missing shards, missing or stale index files
        self.notes: list[str] = []

    @property
    def failed(self) -> bool:
        return bool(self.problems or self.shard_problems)

    def print(self, out=None) -> None:
        out = out or sys.stdout
        width = max([len("class")] + [len(name) for name in self.class_names])
        print(f"{'class':<{width}}  {'train':>8}  {'val':>8}", file=out)
        for index, name in enumerate(self.class_names):
            print(f"{name:<{width}}  {self.counts['train'][index]:>8}  {self.counts['val'][index]:>8}", file=out)
        totals = {split: sum(self.counts[split].values()) for split in SPLITS}
        print(f"{'total':<{width}}  {totals['train']:>8}  {totals['val']:>8}", file=out)
        for note in self.notes:
            print(f"note: {note}", file=out)
        for problem in self.shard_problems:
            print(f"shard: {problem}", file=out)
        for problem in self.problems:
            print(f"unreadable: {problem.path}: {problem.reason}", file=out)
        if self.failed:
            print(f"{len(self.problems) + len(self.shard_problems)} problem(s) found", file=out)
        else:
            print("no problems found", file=out)


def check_folder(root: Path, workers: int, use_cache: bool) -> Report:
    train, val = scan_split(root, "train"), scan_split(root, "val")
    report = Report(train.class_names)
    if train.class_names != val.class_names:
        report.problems.append(Problem(str(root), "train/ and val/ hold different class folders"))
    for split, files in (("train", train), ("val", val)):
        # Counted by class name, so a val folder with other classes still lines up.
        index = {name: i for i, name in enumerate(train.class_names)}
        for label in files.labels:
            report.counts[split][index.get(files.class_names[label], -1)] += 1
        for name in files.class_names:
            folder = files.root / name
            ignored = [entry.path for entry in os.scandir(folder) if entry.is_file()
                       and not entry.name.startswith(".") and not entry.name.lower().endswith(IMAGE_EXTENSIONS)]
            for path in ignored:
                report.notes.append(f"{path} is not read by the loaders (not an image file name: "
                                    f"{', '.join(IMAGE_EXTENSIONS)})")
    report.problems += verify_files(train.paths + val.paths, root, default_cache_file(root), workers,
                                    trust_cache=use_cache)
    return report


def _check_shard(shard: Shard, num_classes: int | None) -> tuple[Counter, list[Problem]]:
    counts: Counter = Counter()
    problems: list[Problem] = []
    for name, image, label in iter_shard_samples(shard):
        if image is None:
            problems.append(Problem(name, "no .jpg component"))
        else:
            problem = image_problem(image)
            if problem:
                problems.append(Problem(name, problem))
        if label is None or label < 0 or (num_classes is not None and label >= num_classes):
            expected = f"0..{num_classes - 1}" if num_classes is not None else "from 0"
            problems.append(Problem(name, f"missing or invalid .cls (class index {expected} expected)"))
        else:
            counts[label] += 1
    return counts, problems


def check_shards(root: Path, workers: int) -> Report:
    manifest = read_manifest(root)
    if manifest is None:
        raise UserError(f"{root}: no {MANIFEST}; the class names and counts are unknown "
                        "(shards made by python -m train.data.convert have one)")
    report = Report(tuple(manifest["class_names"]))
    listed = {entry["name"]: entry["samples"] for split in SPLITS for entry in manifest["splits"][split]}
    shards: dict[str, list[Shard]] = {split: [] for split in SPLITS}
    for split in SPLITS:
        tars = sorted(root.glob(f"{split}-*.tar"))
        names = {tar.name for tar in tars}
        for entry in manifest["splits"][split]:
            if entry["name"] not in names:
                report.shard_problems.append(f"{root / entry['name']} is listed in {MANIFEST} but missing")
        for tar in tars:
            try:
                count = check_index(tar, index_path(tar), listed.get(tar.name))
            except DataError as exc:
                # Without the hint to run this very command.
                report.shard_problems.append(re.split(r";? (?:or )?run python -m train.data.check", str(exc))[0])
                continue
            shards[split].append(Shard(tar, index_path(tar), count))
    _decode_shards(report, shards, workers, len(report.class_names))
    return report


def check_seed_shards(root: Path, workers: int, num_classes: int | None) -> Report:
    """The seed project's shards: index files, manifests, binary labels. They name no classes,
    so the report numbers them (``num_classes`` of them, or as many as the labels found)."""
    report = Report(())
    shards: dict[str, list[Shard]] = {split: [] for split in SPLITS}
    for split in SPLITS:
        tars = seed_shards.split_tars(root, split)
        if not tars:
            report.shard_problems.append(f"{root} has no {split}-shard-*.tar shards")
        for tar in tars:
            index = seed_shards.index_path(tar)
            try:
                count = check_index(tar, index, remedy=seed_shards.index_remedy(tar))
            except DataError as exc:
                report.shard_problems.append(re.split(r";? (?:or )?run python -m train.data.check", str(exc))[0])
                continue
            shards[split].append(Shard(tar, index, count, seed_shards.LABEL_ENCODING))
        if len(shards[split]) == len(tars):
            problem = seed_shards.manifest_problem(root, split, len(tars), sum(s.samples for s in shards[split]))
            if problem:
                report.shard_problems.append(problem)
    _decode_shards(report, shards, workers, num_classes)
    seen = max((label for split in SPLITS for label in report.counts[split]), default=-1) + 1
    report.class_names = tuple(str(i) for i in range(num_classes if num_classes is not None else seen))
    report.notes.append("the seed's shards name no classes: they are numbered by class index")
    return report


def _decode_shards(report: Report, shards: dict[str, list[Shard]], workers: int, num_classes: int | None) -> None:
    """Decode every sample of ``shards`` in parallel; counts and problems go into ``report``."""
    jobs = [(split, shard) for split in SPLITS for shard in shards[split]]
    bar = tqdm(total=sum(shard.samples for _, shard in jobs), desc="checking shards", unit="img",
               dynamic_ncols=True, disable=not sys.stderr.isatty())
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(lambda job: _check_shard(job[1], num_classes), jobs)
        for (split, shard), (counts, problems) in zip(jobs, results):
            report.counts[split].update(counts)
            report.problems += problems
            bar.update(shard.samples)
    bar.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if not args.path.is_dir():
            raise UserError(f"{args.path}: no such folder")
        if seed_shards.is_seed_shard_set(args.path):
            report = check_seed_shards(args.path, args.workers, args.num_classes)
        elif is_shard_set(args.path):
            report = check_shards(args.path, args.workers)
        else:
            report = check_folder(args.path, args.workers, use_cache=not args.no_cache)
    except UserError as exc:
        return report_error(exc)
    report.print()
    return EXIT_PROBLEMS if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
