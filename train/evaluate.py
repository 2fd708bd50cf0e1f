"""Evaluate an exported model on a data set: ``python -m train.evaluate MODEL --data-cfg D.toml``.

MODEL is a model folder written by training (or ``python -m train.export``), loaded through
timm's ``local-dir:``, or an ``hf-hub:<repo id>`` where the Hub is reachable. The validation
preprocessing comes from the model's own ``pretrained_cfg`` (input size, crop_pct,
interpolation), so a folder exported by this project is evaluated exactly as in training.
Runs under ``accelerate launch`` too; every image is counted once across processes.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
from pathlib import Path

import timm
import torch
from accelerate import Accelerator

from .config import PreprocessConfig, load_data_config
from .data import build_loaders, check_supported, resolve_data_dir
from .data.device import BatchFormat
from .errors import UserError, first_line, report_error
from .optim.batchnorm import recompute_running_stats
from .validation import evaluate


def load_model(reference: str) -> torch.nn.Module:
    name = reference if reference.startswith("hf-hub:") else f"local-dir:{reference}"
    if not reference.startswith("hf-hub:") and not (Path(reference) / "config.json").is_file():
        raise UserError(f"{reference}: not a model folder (no config.json); give RUN/model or hf-hub:<repo id>")
    try:
        return timm.create_model(name, pretrained=True)
    except Exception as exc:  # unreachable Hub, bad folder contents: one line, no traceback
        raise UserError(f"cannot load model {reference}: {first_line(exc)}") from None


def preprocess_of(model: torch.nn.Module) -> PreprocessConfig:
    """Evaluation preprocessing described by the model's pretrained_cfg."""
    cfg = model.pretrained_cfg
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    crop_pct = float(cfg.get("crop_pct") or 0.875)
    interpolation = cfg.get("interpolation", "bilinear")
    if interpolation not in ("bilinear", "bicubic"):
        interpolation = "bilinear"
    return PreprocessConfig(interpolation=interpolation, train_crop_size=size,
                            val_image_size=round(size / crop_pct), val_crop_size=size)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.splitlines()[0],
                                     epilog="Documentation: docs/checkpoints.md")
    parser.add_argument("model", help="model folder, or hf-hub:<repo id>")
    parser.add_argument("--data-cfg", type=Path, required=True, help="data TOML (its val/ split is used)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="data.KEY=VALUE")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch size")
    parser.add_argument("--label-smoothing", type=float, default=0.0, help="for the reported loss")
    parser.add_argument("--hflip", action="store_true",
                        help="average the logits of each image and of its mirror image (test-time flip)")
    parser.add_argument("--recalibrate-bn", type=int, default=0, metavar="N",
                        help="first recompute BatchNorm statistics over N training images (train/ split)")
    args = parser.parse_args(argv)
    try:
        data = load_data_config(args.data_cfg, args.overrides)
        check_supported(data, str(args.data_cfg))
        model = load_model(args.model)
        if model.num_classes != data.num_classes:
            raise UserError(f"the model predicts {model.num_classes} classes but data.num_classes is "
                            f"{data.num_classes}")
        accelerator = Accelerator(cpu=not torch.cuda.is_available())
        if args.batch_size % accelerator.num_processes:
            raise UserError(f"--batch-size {args.batch_size} is not divisible by {accelerator.num_processes} processes")
        with accelerator.main_process_first():
            data_dir = resolve_data_dir(data.data_dir)
        loaders = build_loaders(dataclasses.replace(data, data_dir=data_dir), preprocess_of(model),
                                args.batch_size // accelerator.num_processes, accelerator.num_processes,
                                accelerator.process_index, seed=0,
                                batch_format=BatchFormat(accelerator.device))  # float32, NCHW
    except UserError as exc:
        return report_error(exc)
    model = model.to(accelerator.device)
    if args.recalibrate_bn > 0:
        batches = itertools.islice(loaders.train_stats(), -(-args.recalibrate_bn // args.batch_size))
        used = recompute_running_stats(model, (images for images, _ in batches),
                                       lambda buffer: accelerator.reduce(buffer, "mean"), accelerator.autocast)
        if accelerator.is_main_process:
            print(f"BatchNorm statistics recomputed over {used * args.batch_size} training images")
    result = evaluate(model, loaders.val, accelerator, args.label_smoothing, data.num_classes, channels_last=False,
                      hflip=args.hflip)
    if accelerator.is_main_process:
        print(f"top-1 {result['val_acc1']:.2f}%  top-5 {result['val_acc5']:.2f}%  loss {result['val_loss']:.4f}  "
              f"({result['val_samples']} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
