"""Training throughput: this project's step against a plain PyTorch loop, in one run.

    python -m train.benchmark --arch resnet50 --batch-size 256 --image-size 224 --precision bf16
    python -m train.benchmark --data-cfg configs/data/imagenet.toml --train-cfg configs/train/resnet50-sgd.toml

The first form ("step" mode) trains on synthetic in-memory batches and alternates rounds of
the project's step (Accelerate, the optimizer registry's step, the per-iteration schedule,
loss accumulation without host syncs) with rounds of a bare loop written here (the same timm
model, batch, precision and SGD), so both see the same machine state; it prints both
throughputs, their ratio, peak memory and, on a GPU, the model-FLOPs utilisation.

The second form ("pipeline" mode) answers "what limits my run": it times the real input
pipeline of a data config alone, then for each model (``--models``, default the config's
arch) the project's step on synthetic batches and fed by the loader, and prints the ratio of
the two, the peak memory and "limited by: loader" (real data cost the step more than 2%) or
"limited by: compute". It runs on the CPU as well.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from .config import CosineScheduleConfig, SGDConfig, largest_crop, load_config
from .data import build_loaders, check_supported, resolve_data_dir
from .data.device import batch_format_for, to_device
from .errors import UserError, report_error
from .models import build_model, choose_channels_last
from .optim import build_optimizer, build_schedule, build_train_step

# Dense bf16/fp16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, for MFU.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A40": 149.7, "L40S": 362.0, "V100": 125.0, "T4": 65.0}
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# The loader limits a run when real batches make the step slower than this share of its
# speed on synthetic data (the target for DALI on a GPU: >= 0.98).
LOADER_BOUND = 0.98


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def forward_flops(model: torch.nn.Module, batch: torch.Tensor) -> float:
    """FLOPs of one forward pass (a multiply-add counts 2), measured by PyTorch's counter."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(batch)
    return float(counter.get_total_flops())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ProjectStep:
    """The trainer's own step on a prepared model: what ``train_one_epoch`` does per batch."""

    def __init__(self, accelerator: Accelerator, arch: str, num_classes: int, image_size: int,
                 channels_last: bool | str, lr: float, steps_per_epoch: int):
        model = build_model(arch, num_classes, image_size, image_size)
        channels_last = choose_channels_last(channels_last, accelerator.device.type, model)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        optim_cfg = SGDConfig(momentum=0.9, weight_decay=1e-4)
        optimizer = build_optimizer(model, optim_cfg, lr, steps_per_epoch, accelerator.device.type)
        self.scheduler = build_schedule(optimizer, CosineScheduleConfig(), lr, steps_per_epoch, 10)
        self.model, optimizer = accelerator.prepare(model, optimizer)
        self.step = build_train_step(optim_cfg, self.model, optimizer, torch.nn.CrossEntropyLoss(), accelerator, 0.0)
        self.device, self.channels_last = accelerator.device, channels_last
        self.loss_sum = torch.zeros((), device=self.device)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        images, labels = to_device(images, labels, self.device, self.channels_last)
        loss, updated = self.step(images, labels)
        if updated:
            self.scheduler.step()
        self.loss_sum += loss


class PlainStep:
    """A bare PyTorch loop: the reference the project's step is measured against."""

    def __init__(self, arch: str, num_classes: int, image_size: int, channels_last: bool | str, lr: float,
                 device: torch.device, precision: str):
        model = build_model(arch, num_classes, image_size, image_size).to(device)
        channels_last = choose_channels_last(channels_last, device.type, model)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model.train()
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
        self.dtype = DTYPES[precision]
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.device, self.channels_last = device, channels_last

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            loss = F.cross_entropy(self.model(images), labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()


def timed_images_per_s(step, batches, steps: int, device: torch.device, batch_size: int) -> float:
    synchronize(device)
    start = time.perf_counter()
    for images, labels in itertools.islice(batches, steps):
        step(images, labels)
    synchronize(device)
    return steps * batch_size / (time.perf_counter() - start)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def make_accelerator(device: str, precision: str) -> Accelerator:
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Accelerator(cpu=device == "cpu", mixed_precision="no" if precision == "fp32" else precision)


def step_mode(args) -> dict:
    accelerator = make_accelerator(args.device, args.precision)
    device = accelerator.device
    torch.manual_seed(0)
    host_images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    host_labels = torch.randint(0, args.num_classes, (args.batch_size,))
    if device.type == "cuda":
        host_images, host_labels = host_images.pin_memory(), host_labels.pin_memory()
    batches = itertools.repeat((host_images, host_labels))

    torch.manual_seed(0)
    ours = ProjectStep(accelerator, args.arch, args.num_classes, args.image_size, args.channels_last, 0.1, 1000)
    torch.manual_seed(0)
    plain = PlainStep(args.arch, args.num_classes, args.image_size, args.channels_last, 0.1, device, args.precision)
    for step in (ours, plain):  # warm-up: allocator, cuDNN autotuning, lazy init
        timed_images_per_s(step, batches, args.warmup, device, args.batch_size)

    rates = {"ours": [], "plain": []}
    for _ in range(args.rounds):
        for name, step in (("ours", ours), ("plain", plain)):
            rates[name].append(timed_images_per_s(step, batches, args.steps, device, args.batch_size))
    best_ours, best_plain = max(rates["ours"]), max(rates["plain"])
    result = {
        "mode": "step", "arch": args.arch, "batch_size": args.batch_size, "image_size": args.image_size,
        "precision": args.precision, "device": device_name(device),
        "channels_last": ours.channels_last,
        "ours_images_per_s": best_ours, "plain_images_per_s": best_plain, "ratio": best_ours / best_plain,
        "ours_rounds": rates["ours"], "plain_rounds": rates["plain"],
        "peak_memory_mb": peak_memory_mb(device),
    }
    peak = peak_tflops(device)
    if peak is not None:
        flops = 3 * forward_flops(plain.model, host_images[:1].to(device)) * best_ours  # fwd + 2x bwd, per second
        result["mfu"] = flops / (peak * 1e12)
    return result


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def limited_by(end_to_end: float, synthetic: float) -> str:
    """"loader" when real data slow the step below LOADER_BOUND of the synthetic step's speed."""
    return "loader" if end_to_end < LOADER_BOUND * synthetic else "compute"


def pipeline_mode(args) -> dict:
    """The loader alone, then per model its step on synthetic and on real batches."""
    config = load_config(args.data_cfg, args.train_cfg, args.overrides)
    check_supported(config.data, str(args.data_cfg))
    t = config.train
    accelerator = make_accelerator(args.device, args.precision)
    device = accelerator.device
    data_dir = resolve_data_dir(config.data.data_dir)
    crop = largest_crop(t.preprocess.train_crop_size)

    def batches_for(step: ProjectStep):
        """The training batches as a run of ``step``'s model gets them (its layout, its dtype), whole
        epochs one after the other; and the loaders."""
        loaders = build_loaders(dataclasses.replace(config.data, data_dir=data_dir), t.preprocess, t.batch_size, 1,
                                0, t.reproduce.seed,
                                batch_format=batch_format_for(device, step.channels_last, accelerator.mixed_precision))

        def epochs():
            for epoch in itertools.count():
                loaders.set_epoch(epoch, 0)
                yield from loaders.train
        return epochs(), loaders

    result = {"mode": "pipeline", "loader": config.data.dataloader.name, "batch_size": t.batch_size,
              "crop_size": crop, "precision": args.precision, "device": device_name(device), "models": []}
    for arch in args.models.split(",") if args.models else [t.arch]:
        reset_peak_memory(device)
        step = ProjectStep(accelerator, arch, config.data.num_classes, crop, t.channels_last, t.lr, 1000)
        batches, loaders = batches_for(step)
        steps = min(args.steps, loaders.steps_per_epoch - 1)  # the first batch of a pass (worker start-up) is untimed
        if steps < 1:
            raise UserError(f"{args.data_cfg}: {loaders.num_train} training images make {loaders.steps_per_epoch} "
                            f"batches of {t.batch_size}; the benchmark needs at least 2")
        first = next(batches)  # untimed: the loader starts (workers, pipelines)
        if "loader_images_per_s" not in result:  # the loader alone, in the first model's format
            result["loader_images_per_s"] = timed_images_per_s(lambda images, labels: None, batches, steps, device,
                                                               t.batch_size)
        synthetic = itertools.repeat(first)
        timed_images_per_s(step, synthetic, args.warmup, device, t.batch_size)  # allocator, cuDNN autotuning
        synthetic_rate = timed_images_per_s(step, synthetic, steps, device, t.batch_size)
        step(*next(batches))
        real_rate = timed_images_per_s(step, batches, steps, device, t.batch_size)
        result["models"].append({"arch": arch, "synthetic_train_images_per_s": synthetic_rate,
                                 "train_images_per_s": real_rate, "end_to_end_ratio": real_rate / synthetic_rate,
                                 "peak_memory_mb": peak_memory_mb(device),
                                 "limited_by": limited_by(real_rate, synthetic_rate)})
        del batches, loaders  # the next model's loaders replace these (DALI's pipelines, the HF workers)
    return result


def print_pipeline(result: dict) -> None:
    print(f"loader {result['loader']} alone: {result['loader_images_per_s']:.1f} img/s "
          f"(batch {result['batch_size']}, {result['crop_size']} px crops, {result['device']})")
    memory = "peak GPU memory allocated" if result["device"] != "cpu" else "peak resident memory of the process"
    for model in result["models"]:
        print(f"== {model['arch']}, {result['precision']}\n"
              f"  step on synthetic data: {model['synthetic_train_images_per_s']:.1f} img/s\n"
              f"  step on real data:      {model['train_images_per_s']:.1f} img/s\n"
              f"  end-to-end / synthetic: {model['end_to_end_ratio']:.3f}\n"
              f"  {memory}: {model['peak_memory_mb']:.0f} MiB\n"
              f"limited by: {model['limited_by']}")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.benchmark", description=__doc__.splitlines()[0],
                                     epilog="Documentation: docs/performance.md")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--precision", choices=list(DTYPES), default="fp32")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default="auto",
                        help="NHWC memory format (default: as train.channels_last = \"auto\" decides)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before timing, per side")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (the best of each side is kept)")
    parser.add_argument("--data-cfg", type=Path, help="pipeline mode: a data config to read real batches from")
    parser.add_argument("--train-cfg", type=Path, help="pipeline mode: the training config (model, batch, crops)")
    parser.add_argument("--models", help="pipeline mode: comma-separated timm models (default: the config's arch)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--json", type=Path, help="also write the result to this file")
    args = parser.parse_args(argv)
    try:
        if args.data_cfg or args.train_cfg:
            if not (args.data_cfg and args.train_cfg):
                raise UserError("pipeline mode needs both --data-cfg and --train-cfg")
            result = pipeline_mode(args)
        else:
            result = step_mode(args)
    except UserError as exc:
        return report_error(exc)
    if result["mode"] == "pipeline":
        print_pipeline(result)
    for key, value in result.items() if result["mode"] == "step" else ():
        shown = f"{value:.4g}" if isinstance(value, float) else (
            ", ".join(f"{v:.1f}" for v in value) if isinstance(value, list) else value)
        print(f"{key:>28}: {shown}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
