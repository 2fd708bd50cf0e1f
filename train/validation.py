"""Validation metrics over the whole validation set, each image counted once on any number of processes."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from timm.utils import distribute_bn

from .data import to_device
from .models import bare_model


def sync_buffers(model: torch.nn.Module, accelerator: Accelerator) -> None:
    """Give every process the main process's BatchNorm statistics.

    Each process updates its running statistics from its own shard, so they drift apart
    between DDP's broadcasts; evaluating with identical statistics makes the result exact.
    """
    if accelerator.num_processes > 1:
        distribute_bn(model, accelerator.num_processes, reduce=False)  # broadcast from process 0


def predict(net: torch.nn.Module, images: torch.Tensor, hflip: bool) -> torch.Tensor:
    """fp32 logits of ``images``; with ``hflip``, the mean of those of the images and of their
    mirror images (flipped along the width, the last dimension in any memory format)."""
    logits = net(images).float()
    if hflip:
        logits = (logits + net(images.flip(-1)).float()) / 2
    return logits


@torch.no_grad()
def evaluate(model, loader, accelerator: Accelerator, label_smoothing: float, num_classes: int,
             channels_last: bool, hflip: bool = False) -> dict:
    """Loss, top-1 and top-5 over the whole validation set, each image counted once;
    ``hflip``: on the logits averaged over each image and its mirror image."""
    # The unwrapped model: evaluation shards may differ in length by one batch, and no
    # process may wait on a collective operation that another never reaches.
    net = bare_model(accelerator, model)
    sync_buffers(net, accelerator)
    net.eval()
    top_k = min(5, num_classes)
    # loss sum, top-1 hits, top-5 hits, samples; float64 keeps large counts exact.
    totals = torch.zeros(4, dtype=torch.float64, device=accelerator.device)
    for images, labels in loader:
        images, labels = to_device(images, labels, accelerator.device, channels_last)
        with accelerator.autocast():
            logits = predict(net, images, hflip)
        loss = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=label_smoothing, reduction="sum")
        hits = logits.topk(top_k, dim=1).indices.eq(labels[:, None])
        totals += torch.stack([loss.double(), hits[:, 0].sum().double(), hits.any(dim=1).sum().double(),
                               torch.tensor(len(labels), dtype=torch.float64, device=totals.device)])
    totals = accelerator.reduce(totals, "sum").tolist()
    samples = int(totals[3])
    return {"val_loss": totals[0] / max(samples, 1), "val_acc1": 100 * totals[1] / max(samples, 1),
            "val_acc5": 100 * totals[2] / max(samples, 1), "val_samples": samples}
