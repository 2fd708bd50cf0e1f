"""Training-input throughput: DALI on the CPU against the HF/PIL loader, and the trainer's DALI
loader against a bare DALI pipeline with the same operators.

    python benchmarks/loader_bench.py [--images 512] [--threads 2] [--batch 64] [--crop 176] [--rounds 3]

All three read the same folder of photo-like 500x375 JPEGs (about 90 KB each, generated
once into a cache folder) with the training augmentation (random-area crop, resize to
``--crop``, flip, normalize), with ``--threads`` DALI threads or DataLoader workers. Each
round times one pass of each, interleaved, so a machine whose load changes affects all
three alike; the figures are medians over rounds. Targets (issue 3): DALI at least 1.5x the
HF loader; the trainer's DALI loader within 10% of the bare pipeline.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

from train.config import DataConfig, DataloaderConfig, PreprocessConfig
from train.data import build_loaders
from train.data.builtin import default_cache_root
from train.data.dali import build_pipeline

GENERATOR_VERSION = 1
CLASSES = 8
SETTLE_SECONDS = 1.5


def photo(rng: np.random.Generator, width: int = 500, height: int = 375) -> Image.Image:
    """Smooth colour regions at several scales plus sensor noise: compresses like a photo."""
    pixels = np.zeros((height, width, 3))
    for grid, weight in ((4, 0.45), (16, 0.25), (64, 0.15), (160, 0.15)):
        coarse = rng.integers(0, 256, (max(2, grid * height // width), grid, 3), dtype=np.uint8)
        pixels += weight * np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float64)
    pixels += rng.normal(0, 14, pixels.shape)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def photo_folder(root: Path, images: int) -> Path:
    """An ImageNet-layout folder of ``images`` training photos (and a few val ones), made once."""
    done = root / f"COMPLETE-{images}"
    if done.exists():
        return root
    rng = np.random.default_rng(GENERATOR_VERSION)
    for split, count in (("train", images), ("val", CLASSES)):
        for i in range(count):
            folder = root / split / f"c{i % CLASSES}"
            folder.mkdir(parents=True, exist_ok=True)
            photo(rng).save(folder / f"{split}_{i:05d}.JPEG", quality=90)
    done.touch()
    return root


def time_pass(batches, count: int) -> float:
    """Seconds to draw ``count`` batches."""
    start = time.perf_counter()
    drawn = 0
    for _ in batches:
        drawn += 1
        if drawn == count:
            break
    seconds = time.perf_counter() - start
    # DALI refills its prefetch queue after the last batch drawn; let it finish, so that it
    # does not compete with the next measurement.
    time.sleep(SETTLE_SECONDS)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512, help="training images (a multiple of --batch)")
    parser.add_argument("--threads", type=int, default=2, help="DALI threads and DataLoader workers")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--crop", type=int, default=176, help="train_crop_size")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data-dir", type=Path, default=None, help="where the photos are cached")
    args = parser.parse_args()

    root = photo_folder(args.data_dir or default_cache_root() / f"bench-photos-v{GENERATOR_VERSION}", args.images)
    sizes = [p.stat().st_size for p in (root / "train").rglob("*.JPEG")]
    print(f"{len(sizes)} JPEGs of 500x375, {np.mean(sizes) / 1000:.0f} KB on average, in {root}")
    preprocess = PreprocessConfig(train_crop_size=args.crop)

    def loaders(name: str):
        data = DataConfig(data_dir=str(root), num_classes=CLASSES,
                          dataloader=DataloaderConfig(name=name, num_data_workers=args.threads))
        return build_loaders(data, preprocess, args.batch, 1, 0, seed=0)

    def epoch_of(built, epoch):
        built.set_epoch(epoch, 0)
        return iter(built.train)

    # Warm-up (worker start, first allocations, page cache). The HF loader's persistent
    # workers are forked first, before any DALI thread exists.
    hf = loaders("hf")
    steps = hf.steps_per_epoch
    time_pass(epoch_of(hf, 0), steps)
    dali = loaders("dali")
    time_pass(epoch_of(dali, 0), steps)
    bare = build_pipeline(dali.train.runner.spec)  # the trainer's operators, without the wrapper

    def bare_batches():
        while True:
            yield bare.run()

    time_pass(bare_batches(), steps)
    seconds = {"hf": [], "dali": [], "bare": []}
    for round_ in range(args.rounds):
        seconds["hf"].append(time_pass(epoch_of(hf, round_ + 1), steps))
        seconds["dali"].append(time_pass(epoch_of(dali, round_ + 1), steps))
        seconds["bare"].append(time_pass(bare_batches(), steps))
    rate = {name: steps * args.batch / statistics.median(times) for name, times in seconds.items()}

    print(f"training augmentation, crop {args.crop}, batch {args.batch}, {args.threads} threads/workers, "
          f"median of {args.rounds} rounds of {steps * args.batch} images:")
    print(f"  HF/PIL loader           {rate['hf']:8.0f} images/s")
    print(f"  DALI CPU, trainer       {rate['dali']:8.0f} images/s")
    print(f"  DALI CPU, bare pipeline {rate['bare']:8.0f} images/s")
    print(f"DALI / HF: {rate['dali'] / rate['hf']:.2f}x (target >= 1.5x)")
    print(f"trainer / bare DALI: {rate['dali'] / rate['bare']:.3f} (target >= 0.90)")


if __name__ == "__main__":
    main()
