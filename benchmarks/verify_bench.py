"""How long does the DALI loader take to start on a folder of many small files?

Before DALI reads a folder, the trainer checks its images (``train/data/verify.py``): the
first time it decodes every file, later it only compares each file's size and modification
time with its cache. This builds an ImageNet-layout folder of ``--files`` small JPEGs
(default 100,000, in 100 classes) and times ``dali.open_sources`` (listing, checking,
caching), in one run:

- cold: no verification cache, every image decoded (``--threads`` decoding threads);
- warm, serial stats: the cache complete, each file stat'ed one after another (what every
  process of a job did at every start and requeue before);
- warm, parallel stats: the same with the stats spread over ``STAT_THREADS`` threads (what
  the main process of a job does now, while the others wait).

The page cache is not dropped (that needs root): the files were just written, so the figures
are those of a local disk with warm metadata; on Lustre or NFS each stat waits on the server,
which is where parallel stats gain most.

    .venv/bin/python benchmarks/verify_bench.py [--files 100000] [--folder DIR] [--threads N]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from train.data import dali, verify  # noqa: E402
from train.data.builtin import render_image  # noqa: E402

CLASSES = 100
VAL_SHARE = 0.05


def small_jpegs(count: int = 16) -> list[bytes]:
    images = []
    for seed in range(count):
        buffer = io.BytesIO()
        render_image(seed % 10, seed).resize((32, 32)).save(buffer, format="JPEG", quality=85)
        images.append(buffer.getvalue())
    return images


def build_folder(root: Path, files: int) -> None:
    """``files`` JPEGs in train/ and val/ class folders (reused when the folder is complete)."""
    marker = root / f".complete-{files}"
    if marker.exists():
        return
    shutil.rmtree(root, ignore_errors=True)
    images = small_jpegs()
    per_class = files // CLASSES
    val_per_class = max(1, int(per_class * VAL_SHARE))
    for c in range(CLASSES):
        for split, count in (("train", per_class - val_per_class), ("val", val_per_class)):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            for i in range(count):
                (folder / f"img_{i:06d}.JPEG").write_bytes(images[(c + i) % len(images)])
    marker.touch()


def timed_start(root: Path) -> float:
    start = time.perf_counter()
    dali.open_sources(root, CLASSES)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--folder", type=Path, default=None, help="where to build the folder (kept for reuse)")
    parser.add_argument("--threads", type=int, default=verify.available_cpus(), help="decoding threads")
    args = parser.parse_args()
    scratch = None
    if args.folder is None:
        scratch = Path(tempfile.mkdtemp(prefix="verify-bench-"))
        args.folder = scratch / "imagenet"
    try:
        started = time.perf_counter()
        build_folder(args.folder, args.files)
        print(f"folder: {args.folder} ({args.files} files; built or found in {time.perf_counter() - started:.1f}s)")
        os.environ["XDG_CACHE_HOME"] = str(args.folder.parent / "verify-cache")  # a cache of its own
        shutil.rmtree(os.environ["XDG_CACHE_HOME"], ignore_errors=True)
        verify.available_cpus = lambda: args.threads

        cold = timed_start(args.folder)
        verify.STAT_BLOCK = 10**9  # one block: every stat in the calling thread
        serial = timed_start(args.folder)
        verify.STAT_BLOCK = 4096
        parallel = timed_start(args.folder)
        print(f"cold cache (decode every image, {args.threads} threads): {cold:8.2f} s "
              f"({args.files / cold:,.0f} files/s)")
        print(f"warm cache, serial stats:                  {serial:8.2f} s ({args.files / serial:,.0f} files/s)")
        print(f"warm cache, {verify.STAT_THREADS} stat threads:             {parallel:8.2f} s "
              f"({args.files / parallel:,.0f} files/s, {serial / parallel:.2f}x the serial stats)")
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
