"""Run by test_gpu.py on a CUDA GPU, one process per precision (Accelerate keeps one mixed
precision per process):

    gpu_worker.py bf16|fp16 OUT.json

For ResNet-50, VGG-16-BN and ViT-B/16 at 224 px and a batch of 8: three of the project's
train steps (Accelerate, the optimizer registry's SGD step), recording each loss, whether
the optimizer stepped, and how far the weights moved. Under fp16 also SAM v1 and v2 with
an overflow forced: a normal step, a step at a loss scale so large that the scaled loss
overflows (it must be skipped, the weights untouched, the scale backed off), then a normal
step again; and fused SGD and AdamW with an overflow forced the same way.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from train.config import AdamWConfig, SGDConfig, SGDSAMConfig  # noqa: E402
from train.models import build_model, choose_channels_last  # noqa: E402
from train.optim import build_optimizer, build_train_step  # noqa: E402

MODELS = ("resnet50", "vgg16_bn", "vit_base_patch16_224")
SIZE, BATCH, CLASSES = 224, 8, 10


def prepared(accelerator: Accelerator, arch: str, cfg, grad_clip_norm: float = 1.0):
    torch.manual_seed(0)
    model = build_model(arch, CLASSES, SIZE, SIZE)
    if choose_channels_last("auto", accelerator.device.type, model):
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg, 0.01, steps_per_epoch=10, device_type=accelerator.device.type)
    model, optimizer = accelerator.prepare(model, optimizer)
    step = build_train_step(cfg, model, optimizer, torch.nn.CrossEntropyLoss(), accelerator, grad_clip_norm)
    return model, step


def batch(seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(BATCH, 3, SIZE, SIZE, generator=generator)
    return images.to(device), torch.randint(0, CLASSES, (BATCH,), generator=generator).to(device)


def snapshot(model) -> list[torch.Tensor]:
    return [p.detach().float().clone() for p in model.parameters()]


def moved(before: list[torch.Tensor], model) -> float:
    return max((a - b.detach().float()).abs().max().item() for a, b in zip(before, model.parameters()))


def plain_steps(accelerator: Accelerator, arch: str) -> dict:
    model, step = prepared(accelerator, arch, SGDConfig(momentum=0.9, weight_decay=1e-4))
    before = snapshot(model)
    losses, updates = [], []
    for seed in range(3):
        loss, updated = step(*batch(seed, accelerator.device))
        losses.append(loss.item())
        updates.append(updated)
    return {"losses": losses, "updated": updates, "moved": moved(before, model)}


def sam_with_overflow(accelerator: Accelerator, v2: bool) -> dict:
    model, step = prepared(accelerator, "resnet50", SGDSAMConfig(momentum=0.9, weight_decay=1e-4, rho=0.05, v2=v2))
    scaler = accelerator.scaler
    _, first = step(*batch(0, accelerator.device))
    before = snapshot(model)
    scaler.update(new_scale=3e38)  # the scaled loss is now inf: every gradient overflows
    _, forced = step(*batch(1, accelerator.device))
    after_forced = moved(before, model)
    scale_after = scaler.get_scale()
    scaler.update(new_scale=2.0 ** 10)
    loss, last = step(*batch(2, accelerator.device))
    return {"first": first, "forced": forced, "moved_by_forced": after_forced, "scale_after": scale_after,
            "last": last, "last_loss": loss.item()}


def fused_with_overflow(accelerator: Accelerator, cfg) -> dict:
    """A fused optimizer under fp16 (no clipping: the step unscales itself), an overflow
    forced at the second of three steps: the step reports itself taken, and the device's
    count says one was skipped."""
    model, step = prepared(accelerator, "resnet50", cfg, grad_clip_norm=0.0)
    scaler = accelerator.scaler
    step(*batch(0, accelerator.device))
    step.take_skipped_steps()  # the first step may overflow while the loss scale settles
    before = snapshot(model)
    scaler.update(new_scale=3e38)
    _, forced = step(*batch(1, accelerator.device))
    after_forced = moved(before, model)
    scaler.update(new_scale=2.0 ** 10)
    loss, last = step(*batch(2, accelerator.device))
    return {"fused": bool(step.inner_optimizer.param_groups[0]["fused"]), "forced": forced,
            "moved_by_forced": after_forced, "skipped": step.take_skipped_steps(), "last_loss": loss.item(),
            "moved_by_last": moved(before, model)}


def main() -> None:
    precision, out = sys.argv[1], Path(sys.argv[2])
    accelerator = Accelerator(mixed_precision=precision)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result = {"precision": accelerator.mixed_precision, "device": device,
              "models": {arch: plain_steps(accelerator, arch) for arch in MODELS}}
    if precision == "fp16":
        result["sam"] = {"v1": sam_with_overflow(accelerator, v2=False), "v2": sam_with_overflow(accelerator, v2=True)}
        result["fused"] = {cfg.name: fused_with_overflow(accelerator, cfg) for cfg in (SGDConfig(), AdamWConfig())}
    out.write_text(json.dumps(result, indent=1))  # a NaN or inf loss is written as NaN / Infinity


if __name__ == "__main__":
    main()
