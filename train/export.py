"""Export a trained model as a timm model folder: safetensors weights, config.json, model card.

``timm.create_model("local-dir:<folder>", pretrained=True)`` loads the folder, and it can be
pushed to the Hugging Face Hub as it is. The ``pretrained_cfg`` describes this training's own
evaluation preprocessing (input size, crop_pct = val_crop / val_image, interpolation,
mean/std), so timm's ``resolve_data_config`` reproduces it.

Run as a command, it exports the weights of any training checkpoint:
``python -m train.export RUN/checkpoints/<step> [--output DIR]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from . import checkpoint as ckpt
from .config import Config, CropRamp, load_config_text
from .errors import UserError, report_error
from .models import build_model, model_args, resolve_arch

WEIGHTS = "model.safetensors"


def timm_config(config: Config, model: torch.nn.Module, class_names: tuple[str, ...],
                class_descriptions: tuple[str, ...] = ()) -> dict:
    """timm's config.json. Labels follow timm's convention: ``label_names`` per class index
    (the folder names, WordNet ids for ImageNet) and, when the data set has a class table,
    ``label_descriptions`` mapping each name to readable words; timm moves both into
    ``model.pretrained_cfg``."""
    p = config.train.preprocess
    arch = resolve_arch(config.train.arch)
    return {
        "architecture": arch,
        "num_classes": config.data.num_classes,
        "num_features": getattr(model, "num_features", None),
        "label_names": list(class_names),
        **({"label_descriptions": dict(zip(class_names, class_descriptions))} if class_descriptions else {}),
        "model_args": model_args(arch, p.train_crop_size, p.val_crop_size, config.train.model),
        "pretrained_cfg": {
            "input_size": [3, p.val_crop_size, p.val_crop_size],
            "crop_pct": p.val_crop_size / p.val_image_size,
            "crop_mode": "center",
            # timm and PIL have no "triangular"; PIL's bilinear is that filter when shrinking.
            "interpolation": "bilinear" if p.interpolation == "triangular" else p.interpolation,
            "mean": list(IMAGENET_DEFAULT_MEAN),
            "std": list(IMAGENET_DEFAULT_STD),
            "num_classes": config.data.num_classes,
            "classifier": model.default_cfg.get("classifier") if hasattr(model, "default_cfg") else None,
        },
    }


def describe_crop(crop: int | CropRamp) -> str:
    return crop.describe() if isinstance(crop, CropRamp) else f"{crop} px"


def model_card(config: Config, metrics: list[dict], command: str, described: bool = False) -> str:
    t = config.train
    last = metrics[-1] if metrics else {}
    if t.ema.export == "ema" and last:  # the exported weights' own results
        last = {**last, **{name: last[f"{name}_ema"] for name in ("val_loss", "val_acc1", "val_acc5")}}
    lines = [
        f"# {t.arch} trained with {t.optim.name}",
        "",
        f"Image classifier trained {f'starting from `{t.checkpoint_dir}`' if t.checkpoint_dir else 'from scratch'} "
        f"on `{config.data.data_dir}` ({config.data.num_classes} classes).",
        "",
        "## Recipe",
        "",
        f"- architecture: `{resolve_arch(t.arch)}`"
        + "".join(f", `{key} = {json.dumps(value)}`" for key, value in t.model.items()),
        f"- optimizer: `{t.optim.name}`, peak lr {t.lr}, schedule `{t.lr_scheduler.name}`",
        f"- {t.max_epochs} epochs at global batch {t.batch_size}, label smoothing {t.label_smoothing}",
        f"- training crops {describe_crop(t.preprocess.train_crop_size)} (random area 10-100%, flips); evaluation: "
        f"shorter side resized to {t.preprocess.val_image_size}, centre crop {t.preprocess.val_crop_size}, "
        f"{t.preprocess.interpolation}",
        *([f"- BatchNorm statistics recomputed over {last['bn_stats_samples']} training images before the last "
           "evaluation"] if last.get("bn_stats_samples") and t.ema.export != "ema" else []),
        *([f"- weights: the exponential moving average of the trained weights (decay {t.ema.decay}"
           + (f", warm-up gamma {t.ema.warmup_gamma}, power {t.ema.warmup_power}" if t.ema.warmup else "") + ")"]
          if t.ema.export == "ema" else []),
        f"- seed {t.reproduce.seed}",
        "",
        "## Results (last evaluation)",
        "",
    ]
    if last:
        lines += ["| epoch | step | top-1 | top-5 | val loss | training time (h) |",
                  "|---:|---:|---:|---:|---:|---:|",
                  f"| {last['epoch']} | {last['step']} | {last['val_acc1']:.2f} | {last['val_acc5']:.2f} | "
                  f"{last['val_loss']:.4f} | {last['train_time_s'] / 3600:.3f} |"]
    else:
        lines.append("No evaluation recorded.")
    lines += ["", "## Usage", "", "```python", "import timm",
              'model = timm.create_model("local-dir:<this folder>", pretrained=True)  # or hf-hub:<repo id>', "```"]
    if described:
        lines += ["", "`model.pretrained_cfg[\"label_names\"]` holds the class folder names by output index, and "
                  "`label_descriptions` their readable names, from the data set's class table (`classes.tsv`)."]
    lines += ["", "## Produced by", "", "```", command, "```", ""]
    return "\n".join(lines)


def write_model_folder(out_dir: Path, model: torch.nn.Module, config: Config, class_names: tuple[str, ...],
                       metrics: list[dict], command: str, class_descriptions: tuple[str, ...] = ()) -> Path:
    """Write the folder next to ``out_dir`` and swap it in, so an old export is never half-replaced."""
    state = {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in model.state_dict().items()}
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    save_file(state, str(staging / WEIGHTS), metadata={"format": "pt"})
    (staging / "config.json").write_text(json.dumps(timm_config(config, model, class_names, class_descriptions),
                                                    indent=2))
    (staging / "README.md").write_text(model_card(config, metrics, command, described=bool(class_descriptions)))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    return out_dir


def unwrapped_names(state: dict) -> dict:
    """Drop the prefixes DDP ("module.") and torch.compile ("_orig_mod.") add to parameter names."""
    cleaned = {}
    for name, tensor in state.items():
        for prefix in ("module.", "_orig_mod."):
            while name.startswith(prefix):
                name = name[len(prefix):]
        cleaned[name] = tensor
    return cleaned


def export_checkpoint(checkpoint: Path, out_dir: Path) -> Path:
    """Export the model weights stored in a training checkpoint."""
    problem = ckpt.checkpoint_problem(checkpoint)
    if problem:
        raise UserError(f"{checkpoint}: not a usable checkpoint ({problem})")
    config_path = checkpoint / ckpt.CONFIG_COPY
    config = load_config_text(config_path.read_text(encoding="utf-8"), str(config_path))
    trainer = ckpt.read_trainer_state(checkpoint)
    t = config.train
    model = build_model(t.arch, config.data.num_classes, t.preprocess.train_crop_size, t.preprocess.val_crop_size,
                        t.model)
    # The weights the config names: the trained ones, or their moving average.
    weights = checkpoint / (ckpt.EMA_WEIGHTS if t.ema.export == "ema" else WEIGHTS)
    model.load_state_dict(unwrapped_names(load_file(str(weights))))
    class_names = tuple(trainer.class_names or (str(i) for i in range(config.data.num_classes)))
    return write_model_folder(out_dir, model, config, class_names, trainer.metrics,
                              f"python -m train.export {checkpoint}", tuple(trainer.class_descriptions))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.export",
                                     description="Export a training checkpoint as a timm model folder.",
                                     epilog="Documentation: docs/checkpoints.md")
    parser.add_argument("checkpoint", type=Path, help="a folder RUN/checkpoints/<step>")
    parser.add_argument("--output", type=Path, default=None, help="model folder (default: RUN/model-<step>)")
    args = parser.parse_args(argv)
    out = args.output or args.checkpoint.parent.parent / f"model-{args.checkpoint.name}"
    try:
        written = export_checkpoint(args.checkpoint, out)
    except UserError as exc:
        return report_error(exc)
    print(f"exported {args.checkpoint} to {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
