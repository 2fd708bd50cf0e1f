"""Validation metrics over the whole validation set, each image counted once on any number of processes."""

from __future__ import annotations

import weakref

import torch
from accelerate import Accelerator
from accelerate.utils import is_compiled_module
from timm.utils import distribute_bn

from .data.device import to_device
from .models import bare_model

# The compiled evaluation model of each bare model, made once per run: compiling again at
# every evaluation would recompile its graphs every time.
_compiled_for_evaluation: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def sync_buffers(model: torch.nn.Module, accelerator: Accelerator) -> None:
    """Give every process the main process's BatchNorm statistics.

    Each process updates its running statistics from its own shard, so they drift apart
    (DDP runs with ``broadcast_buffers=False``: nothing syncs them during training);
    evaluating with identical statistics makes the result exact.
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


def evaluation_model(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """What evaluation runs: the unwrapped model, compiled as the training one is (``compile = true``).

    Unwrapped because evaluation shards may differ in length by one batch, and no process may
    wait on a collective operation that another never reaches; compiled apart from the
    training wrapper (torch.compile around DDP), sharing its parameters.
    """
    net = bare_model(accelerator, model)
    if not is_compiled_module(model):
        return net
    compiled = _compiled_for_evaluation.get(net)
    if compiled is None:
        compiled = _compiled_for_evaluation[net] = torch.compile(net, **accelerator.state.dynamo_plugin.to_kwargs())
    return compiled


def evaluate(model, loader, accelerator: Accelerator, label_smoothing: float, num_classes: int,
             channels_last: bool, hflip: bool = False) -> dict:
    """Loss, top-1 and top-5 over the whole validation set, each image counted once;
    ``hflip``: on the logits averaged over each image and its mirror image."""
    net = evaluation_model(accelerator, model)
    sync_buffers(bare_model(accelerator, model), accelerator)
    net.eval()
    top_k = min(5, num_classes)
    # loss sum, top-1 hits, top-5 hits on the device, added to without reading them back;
    # the sample count is known on the host. float64 keeps large counts exact.
    totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
    samples = 0
    with torch.inference_mode():
        for images, labels in loader:
            images, labels = to_device(images, labels, accelerator.device, channels_last)
            with accelerator.autocast():
                logits = predict(net, images, hflip)
            loss = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=label_smoothing,
                                                     reduction="sum")
            hits = logits.topk(top_k, dim=1).indices.eq(labels[:, None])
            totals += torch.stack([loss.double(), hits[:, 0].sum().double(), hits.any(dim=1).sum().double()])
            samples += len(labels)
    counts = torch.cat([totals, torch.tensor([samples], dtype=torch.float64, device=totals.device)])
    loss_sum, top1, top5, samples = accelerator.reduce(counts, "sum").tolist()
    samples = int(samples)
    return {"val_loss": loss_sum / max(samples, 1), "val_acc1": 100 * top1 / max(samples, 1),
            "val_acc5": 100 * top5 / max(samples, 1), "val_samples": samples}
