"""How fast does ``python -m train.data.prepare archives`` turn archives into the layout?

Builds synthetic downloads with the official structure (a tar of class tars, a flat
validation tar, a devkit), images of ImageNet's average size (random bytes: extraction does
not decode), then times on the same disk, in one run:

- reference: what the usual shell recipe does, ``tar -xf`` of the outer archive and of every
  class tar, one after another (validation images are not sorted into classes by it);
- ours, with 1 thread and with --workers threads (validation sorted, counts checked).

It prints images/s, MB/s, ours/reference, and what that rate means for the real
147.9 GB / 1,331,167 images. The page cache is not dropped (that needs root): the archives
were just written, so reads are cached and the figures measure writing, which is the part
that scales with the output disk.

    .venv/bin/python benchmarks/prepare_bench.py --classes 40 --images 250 [--workers N]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the miniature-archive builder the tests use
sys.path.insert(0, str(REPO))

from imagenet_archives import make_downloads  # noqa: E402

from train.data.prepare import main as prepare  # noqa: E402

FULL_BYTES = 147_897_477_120 + 6_744_924_160  # the two official image archives
FULL_IMAGES = 1_281_167 + 50_000
MEAN_IMAGE_BYTES = 110_000  # about FULL_BYTES / FULL_IMAGES


def tar_reference(downloads, dest: Path) -> None:
    train = dest / "train"
    train.mkdir(parents=True)
    subprocess.run(["tar", "-xf", str(downloads.train_tar), "-C", str(train)], check=True)
    for class_tar in sorted(train.glob("*.tar")):
        folder = train / class_tar.stem
        folder.mkdir()
        subprocess.run(["tar", "-xf", str(class_tar), "-C", str(folder)], check=True)
        class_tar.unlink()
    (dest / "val").mkdir()
    subprocess.run(["tar", "-xf", str(downloads.val_tar), "-C", str(dest / "val")], check=True)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=40)
    parser.add_argument("--images", type=int, default=250, help="training images per class")
    parser.add_argument("--val-per-class", type=int, default=50)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder on the disk to measure")
    args = parser.parse_args()

    classes = [(f"n{10_000_000 + i:08d}", f"class {i}", i + 1, args.images) for i in range(args.classes)]
    val_ids = [i % args.classes + 1 for i in range(args.classes * args.val_per_class)]
    random.Random(0).shuffle(val_ids)
    scratch = Path(tempfile.mkdtemp(prefix="prepare-bench-", dir=args.dir))
    try:
        downloads = make_downloads(scratch / "downloads", classes=classes, val_ids=val_ids,
                                   image=lambda rng: rng.randbytes(int(rng.uniform(0.5, 1.5) * MEAN_IMAGE_BYTES)))
        images = args.classes * args.images + len(val_ids)
        size = downloads.train_tar.stat().st_size + downloads.val_tar.stat().st_size
        print(f"synthetic downloads: {args.classes} classes, {images:,} images, {size / 1e9:.2f} GB")
        runs = {"tar -xf (reference)": lambda: tar_reference(downloads, scratch / "ref")}
        for workers in sorted({1, args.workers}):
            runs[f"prepare, {workers} thread(s)"] = (
                lambda w=workers: prepare(["archives", str(downloads.folder), "--output", str(scratch / f"out{w}"),
                                           "--workers", str(w)]))
        seconds = {}
        for name, run in runs.items():
            seconds[name] = timed(run)
            for out in scratch.glob("out*"):
                shutil.rmtree(out)
            shutil.rmtree(scratch / "ref", ignore_errors=True)
        reference = seconds["tar -xf (reference)"]
        print(f"\n{'':28}{'seconds':>9}{'img/s':>9}{'MB/s':>8}{'vs tar':>8}{'full ImageNet':>15}")
        for name, s in seconds.items():
            full_h = FULL_BYTES / (size / s) / 3600
            print(f"{name:28}{s:9.2f}{images / s:9.0f}{size / s / 1e6:8.0f}{reference / s:7.2f}x{full_h:12.1f} h")
    finally:
        shutil.rmtree(scratch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
