"""Step time of each optimizer relative to plain SGD, on the same model and batch, in one run.

    python benchmarks/optim_bench.py [--arch resnet18] [--batch-size 64] [--image-size 64] [--rounds 5]

Every variant trains its own copy of one model, through the project's optimizer registry and
train steps (``train.optim``), on one fixed synthetic batch. Rounds of ``--steps`` steps
alternate between the variants, so that all of them see the same machine state; the median
round is reported. The figures to expect: two-step SAM (v1) about 2x SGD, since it runs two
forward and backward passes; single-step SAM (v2) at most 1.15x; Schedule-Free at most 1.10x.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from train.config import AdamWScheduleFreeConfig, SGDConfig, SGDSAMConfig, SGDScheduleFreeConfig  # noqa: E402
from train.models import build_model  # noqa: E402
from train.optim import build_optimizer, build_train_step  # noqa: E402

# (label, optimizer config, ceiling on the ratio to SGD or None): the shipped configs' values.
VARIANTS = [
    ("sgd", SGDConfig(momentum=0.875, weight_decay=1 / 32768), None),
    ("sam v1 (rho 0.05)", SGDSAMConfig(momentum=0.875, weight_decay=1 / 32768, rho=0.05, adaptive=False, v2=False),
     None),
    ("sam v2 (rho 1, adaptive)", SGDSAMConfig(momentum=0.875, weight_decay=1 / 32768, rho=1.0, adaptive=True,
                                              v2=True), 1.15),
    ("schedule-free sgd", SGDScheduleFreeConfig(momentum=0.9, weight_decay=5e-5, r=0.75), 1.10),
    ("schedule-free adamw", AdamWScheduleFreeConfig(weight_decay=0.05), 1.10),
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    template = build_model(args.arch, args.num_classes, args.image_size, args.image_size)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=accelerator.device)
    labels = torch.randint(0, args.num_classes, (args.batch_size,), device=accelerator.device)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

    steps = {}
    for label, cfg, _ in VARIANTS:
        model = copy.deepcopy(template)
        optimizer = build_optimizer(model, cfg, lr=0.1, steps_per_epoch=100)
        model, optimizer = accelerator.prepare(model, optimizer)
        model.train()
        optimizer.train()  # Schedule-Free; a no-op for the others
        steps[label] = build_train_step(cfg, model, optimizer, criterion, accelerator, grad_clip_norm=0.0)
        for _ in range(args.warmup):
            steps[label](images, labels)

    def sync() -> None:
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize()

    times = {label: [] for label in steps}
    for _ in range(args.rounds):
        for label, step in steps.items():
            sync()
            start = time.perf_counter()
            for _ in range(args.steps):
                step(images, labels)
            sync()
            times[label].append((time.perf_counter() - start) / args.steps)

    print(f"{args.arch}, batch {args.batch_size}, {args.image_size} px, {accelerator.device.type}, "
          f"{torch.get_num_threads()} threads; median of {args.rounds} rounds of {args.steps} steps")
    baseline = statistics.median(times["sgd"])
    for label, _, ceiling in VARIANTS:
        seconds = statistics.median(times[label])
        target = f"<= {ceiling:.2f}x" if ceiling else ("~2x" if "v1" in label else "")
        print(f"{label:26s} {1000 * seconds:9.1f} ms/step  {seconds / baseline:5.2f}x SGD  {target}")


if __name__ == "__main__":
    main()
