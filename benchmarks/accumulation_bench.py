"""What gradient accumulation costs: peak memory and images/s at one global batch, cut finer.

    python benchmarks/accumulation_bench.py [--arch resnet18] [--batch-size 64] [--micro 64 16 4]
                                            [--image-size 112] [--steps 5] [--rounds 3]

Each micro-batch size trains in a process of its own, since peak memory is a per-process
figure: the resident set (RSS) on the CPU, PyTorch's allocator peak on a GPU. The step is the
project's (``train.optim``, SGD, the same global batch split into ``batch / micro``
micro-batches) on synthetic images. Rounds alternate between the sizes so that all of them see
the same machine state; the best round's images/s and the largest peak are kept, and every
figure is also given relative to the first size (the whole batch), measured in the same run.
"training MiB" is the peak resident set above what the process held before its first step
(the model, its inputs): activations, gradients and optimizer state; on a GPU, the allocator's
peak instead.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from train.config import SGDConfig  # noqa: E402
from train.models import build_model  # noqa: E402
from train.optim import build_optimizer, build_train_step  # noqa: E402

MIB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=64, help="the global batch (one process)")
    parser.add_argument("--micro", type=int, nargs="+", default=[64, 16, 4], help="micro-batch sizes to compare")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first, in each process")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a single size, in this process
    return parser.parse_args(argv)


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / MIB


def measure_one(args: argparse.Namespace, micro: int) -> dict:
    """Train ``args.steps`` steps in micro-batches of ``micro``: images/s and peak memory."""
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    device = accelerator.device
    torch.manual_seed(0)
    model = build_model(args.arch, args.num_classes, args.image_size, args.image_size)
    cfg = SGDConfig(momentum=0.9, weight_decay=1e-4)
    model, optimizer = accelerator.prepare(model, build_optimizer(model, cfg, 0.1, steps_per_epoch=100))
    step = build_train_step(cfg, model, optimizer, torch.nn.CrossEntropyLoss(), accelerator, grad_clip_norm=0.0)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    labels = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
    micro_batches = [(images[i:i + micro], labels[i:i + micro]) for i in range(0, args.batch_size, micro)]

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    before = rss_mib()
    for _ in range(args.warmup):
        step.on_micro_batches(micro_batches)
    synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step.on_micro_batches(micro_batches)
    synchronize()
    seconds = time.perf_counter() - start
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    figures = {"micro": micro, "images_per_s": args.steps * args.batch_size / seconds,
               "peak_rss_mib": peak_rss, "peak_rss_above_start_mib": peak_rss - before}
    if device.type == "cuda":
        figures["peak_device_mib"] = torch.cuda.max_memory_allocated(device) / MIB
    return figures


def in_own_process(args: argparse.Namespace, micro: int) -> dict:
    command = [sys.executable, __file__, "--one", str(micro), "--arch", args.arch, "--batch-size",
               str(args.batch_size), "--image-size", str(args.image_size), "--num-classes", str(args.num_classes),
               "--steps", str(args.steps), "--warmup", str(args.warmup)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"micro-batch {micro} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = [args.one] if args.one is not None else args.micro
    for micro in sizes:
        if micro <= 0 or args.batch_size % micro:
            print(f"error: micro-batch {micro} does not divide --batch-size {args.batch_size}", file=sys.stderr)
            return 2
    if args.one is not None:
        print(json.dumps(measure_one(args, args.one)))
        return 0
    runs = {micro: [] for micro in args.micro}
    for _ in range(args.rounds):
        for micro in args.micro:
            runs[micro].append(in_own_process(args, micro))
    # Speed: the best round (the least disturbed); memory: the largest any round needed.
    best = {micro: {key: max(r[key] for r in rounds) for key in rounds[0]} for micro, rounds in runs.items()}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"{args.arch}, global batch {args.batch_size}, {args.image_size} px, fp32, SGD, {device}; "
          f"best of {args.rounds} rounds of {args.steps} steps")
    memory_key = "peak_device_mib" if torch.cuda.is_available() else "peak_rss_above_start_mib"
    first = best[args.micro[0]]
    print(f"{'micro':>6} {'per step':>12} {'img/s':>8} {'vs whole':>8} {'peak RSS MiB':>13} "
          f"{'training MiB':>13} {'vs whole':>8}")
    for micro, figures in best.items():
        print(f"{micro:6d} {args.batch_size // micro:12d} {figures['images_per_s']:8.1f} "
              f"{figures['images_per_s'] / first['images_per_s']:7.2f}x {figures['peak_rss_mib']:13.0f} "
              f"{figures[memory_key]:13.0f} {figures[memory_key] / first[memory_key]:7.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "json"},
                                         "rounds": {str(m): r for m, r in runs.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
