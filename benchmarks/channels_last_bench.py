"""Is channels_last faster? The trainer's own step with and without it, alternating, in one run.

``train.channels_last = "auto"`` turns NHWC tensors on for convolutional models on CUDA GPUs
and off on the CPU. This measures the choice where it runs: the project's step (Accelerate,
SGD, the per-step schedule) on a timm model, once with NCHW and once with NHWC tensors, on
the same batches, in alternating rounds so both sides see the same machine state; it prints
both throughputs and their ratio. By default: ResNet-18 on batches of the built-in data set
(64 images of 32 px, as ``python -m train`` trains), on the CPU, or on the GPU when there is one.

    .venv/bin/python benchmarks/channels_last_bench.py [--arch resnet18] [--image-size 32] [--rounds 5]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from train.benchmark import ProjectStep, make_accelerator, timed_images_per_s  # noqa: E402
from train.config import DataConfig, DataloaderConfig, PreprocessConfig  # noqa: E402
from train.data import build_loaders, resolve_data_dir  # noqa: E402


def builtin_batches(batch_size: int, image_size: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    data = DataConfig(data_dir=resolve_data_dir("builtin:shapes"), num_classes=10,
                      dataloader=DataloaderConfig(name="hf", num_data_workers=0))
    preprocess = PreprocessConfig(train_crop_size=image_size, val_image_size=image_size + 4, val_crop_size=image_size)
    loaders = build_loaders(data, preprocess, batch_size, 1, 0, seed=0)
    loaders.set_epoch(0, 0)
    return list(itertools.islice(loaders.train, count))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    args = parser.parse_args()
    accelerator = make_accelerator(args.device, args.precision)
    batches = builtin_batches(args.batch_size, args.image_size, args.steps)
    sides = {}
    for channels_last in (False, True):
        torch.manual_seed(0)
        sides[channels_last] = ProjectStep(accelerator, args.arch, 10, args.image_size, channels_last, 0.1, 1000)
        timed_images_per_s(sides[channels_last], iter(batches), 3, accelerator.device, args.batch_size)  # warm-up
    rates = {False: [], True: []}
    for _ in range(args.rounds):
        for channels_last, step in sides.items():
            rates[channels_last].append(timed_images_per_s(step, iter(batches), args.steps, accelerator.device,
                                                           args.batch_size))
    plain, nhwc = max(rates[False]), max(rates[True])
    print(f"{args.arch}, batch {args.batch_size}, {args.image_size} px, {args.precision} on {accelerator.device.type}, "
          f"best of {args.rounds} rounds of {args.steps} steps")
    print(f"  contiguous (NCHW): {plain:8.1f} img/s   rounds: {', '.join(f'{r:.1f}' for r in rates[False])}")
    print(f"  channels_last:     {nhwc:8.1f} img/s   rounds: {', '.join(f'{r:.1f}' for r in rates[True])}")
    print(f"  channels_last / contiguous: {nhwc / plain:.3f}")


if __name__ == "__main__":
    main()
