"""What reduced-size JPEG decoding saves the HF loader: its training preset on JPEGs opened lazily
(decoded at 1/2, 1/4 or 1/8 size where the crop allows) against the same preset on JPEGs decoded
in full first, on the same images with the same random draws.

    python benchmarks/jpeg_draft_bench.py [--images 256] [--crops 160 176 224] [--rounds 5]

The images are loader_bench.py's photo-like 500x375 JPEGs (made once into the cache). Each round
times one pass of each way per crop size, which goes first alternating, in this one process (one worker's work);
the figures are medians over the rounds, with the share of crops that were decoded reduced.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from loader_bench import GENERATOR_VERSION, photo_folder  # noqa: E402

from train.data.builtin import default_cache_root  # noqa: E402
from train.data.transforms import TrainPreset, random_crop_box, reduction_for  # noqa: E402


def one_pass(paths: list[Path], preset: TrainPreset, full_decode: bool) -> float:
    """Seconds to open, decode and crop every image (the random draws seeded per image)."""
    started = time.perf_counter()
    for index, path in enumerate(paths):
        with Image.open(path) as image:
            if full_decode:
                image.load()  # decoded in full: no reduction is possible any more
            preset(image, random.Random(index))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--crops", type=int, nargs="+", default=[160, 176, 224])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    root = photo_folder(default_cache_root() / f"bench-photos-v{GENERATOR_VERSION}", args.images)
    paths = sorted((root / "train").rglob("*.JPEG"))[:args.images]
    for path in paths:  # into the page cache
        path.read_bytes()
    print(f"{len(paths)} JPEGs of 500x375 from {root}; one process, medians of {args.rounds} rounds")
    for crop in args.crops:
        preset = TrainPreset(crop, "bilinear")
        reduced = sum(reduction_for(random_crop_box(500, 375, random.Random(i)), crop) > 1 for i in range(len(paths)))
        seconds = {"full": [], "reduced": []}
        for round_ in range(args.rounds):  # which goes first alternates
            for way in (("full", "reduced") if round_ % 2 == 0 else ("reduced", "full")):
                seconds[way].append(one_pass(paths, preset, full_decode=way == "full"))
        full, lazy = (len(paths) / statistics.median(seconds[k]) for k in ("full", "reduced"))
        print(f"crop {crop}: full decoding {full:6.0f} images/s, reduced where the crop allows {lazy:6.0f} images/s "
              f"({lazy / full:.2f}x); {reduced / len(paths):.0%} of the crops decoded reduced")


if __name__ == "__main__":
    main()
