"""How fast does ``preload_local`` copy a data set, and how many threads should it use?

Times, in one run, on a source folder: ``cp -r`` (the reference), then the trainer's copy
(``train.data.preload.make_local_copy``: listing, parallel copy, check by count and size) with
1, 4 and 16 threads, each into a fresh destination. It prints MB/s and files/s and each
against ``cp -r``.

By default the source is a synthetic folder of ImageNet-sized files (110 kB of random bytes,
in class folders) on the same disk as the destination, freshly written, so reads come from
the page cache: that measures the local disk and the per-file overhead, not a shared file
system; each measurement starts after ``sync``. On a cluster, point ``--source`` at a real
data set on the shared file system (and ``--dest`` at the node's local disk) to measure what
matters there: the number of threads pays off when each file costs a round trip to a file
server.

    .venv/bin/python benchmarks/preload_bench.py [--files 4000] [--source DIR] [--dest DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from train.data.preload import list_files, make_local_copy  # noqa: E402

FILE_BYTES = 110_000  # ImageNet's average JPEG
THREADS = (1, 4, 16)


def make_source(root: Path, files: int) -> Path:
    for i in range(files):
        folder = root / f"n{i % 100:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img_{i:06d}.JPEG").write_bytes(os.urandom(FILE_BYTES))
    return root


def timed(action) -> float:
    os.sync()  # the previous copy's dirty pages are written out first, not during this one
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=4000, help="synthetic source: number of files")
    parser.add_argument("--source", type=Path, default=None, help="a real data set folder instead")
    parser.add_argument("--dest", type=Path, default=None, help="where the copies go (default: a temporary folder)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="preload-bench-", dir=args.dest))
    try:
        source = args.source or make_source(work / "source", args.files)
        listing = list_files(source)
        size, count = sum(listing.values()), len(listing)
        print(f"source {source}: {count} files, {size / 1e6:.0f} MB")
        reference = timed(lambda: subprocess.run(["cp", "-r", str(source), str(work / "cp")], check=True))
        print(f"cp -r          {size / reference / 1e6:8.1f} MB/s {count / reference:8.0f} files/s")
        for threads in THREADS:
            dest = work / f"copy-{threads}"
            seconds = timed(lambda dest=dest, threads=threads: make_local_copy(source, dest, threads))
            print(f"{threads:2d} thread(s)   {size / seconds / 1e6:8.1f} MB/s {count / seconds:8.0f} files/s "
                  f"{reference / seconds:6.2f}x cp -r")
            shutil.rmtree(dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
