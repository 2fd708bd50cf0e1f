"""Test helpers: tiny ImageNet-layout folders and running the trainer as a real command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from train.data.builtin import render_image

REPO = Path(__file__).resolve().parent.parent


def make_image_folder(root: Path, classes: int = 3, train_per_class: int = 8, val_counts: tuple[int, ...] = (5, 5, 5),
                      size: int = 40) -> Path:
    """An ImageNet-layout folder of small learnable JPEGs (built-in generator classes)."""
    for split, counts in (("train", [train_per_class] * classes), ("val", list(val_counts))):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(counts[c]):
                seed = i if split == "train" else 10_000 + i
                render_image(c, seed).resize((size, size)).save(folder / f"img_{i:04d}.JPEG", quality=90)
    return root


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def tiny_train_toml(**overrides) -> str:
    """A training config that runs in seconds on the CPU."""
    values = {"batch_size": 8, "max_epochs": 1, "lr": 0.05, "arch": '"resnet18"', "use_amp": "false"}
    values.update(overrides)
    top = "\n".join(f"{k} = {v}" for k, v in values.items())
    return top + """
[preprocess]
train_crop_size = 32
val_image_size = 36
val_crop_size = 32

[optim]
name = "sgd"
momentum = 0.9
weight_decay = 1e-4

[lr_scheduler]
name = "cosine"
warmup_epochs = 0.5

[reproduce]
seed = 3

[log]
log_freq = 2
"""


def data_toml(data_dir: Path | str, num_classes: int = 3, workers: int = 0) -> str:
    return (f'data_dir = "{data_dir}"\nnum_classes = {num_classes}\n\n'
            f'[dataloader]\nname = "hf"\nnum_data_workers = {workers}\n')


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "SLURM_"))}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env.update(extra)
    return env


def run_train(args: list[str], launcher: list[str] | None = None, timeout: float = 600, cwd_dir: Path | None = None,
              **env) -> subprocess.CompletedProcess:
    """``python -m train ARGS`` in a fresh process, or under ``launcher`` (e.g. accelerate launch ...)."""
    command = (launcher or [sys.executable]) + ["-m", "train"] + args
    return subprocess.run(command, cwd=cwd_dir or REPO, env=clean_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def accelerate_launch(num_processes: int, port: int) -> list[str]:
    accelerate = str(Path(sys.executable).parent / "accelerate")
    config = REPO / "accelerate_configs" / ("2xCPU.yaml" if num_processes == 2 else "1xCPU.yaml")
    return [accelerate, "launch", "--config_file", str(config), "--main_process_port", str(port)]


TIMING = {"epoch_time_s", "train_time_s", "images_per_s"}


def without_timing(records: list[dict]) -> list[dict]:
    """metrics.jsonl records without the fields that measure time, which differ between runs."""
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def checkpointing_configs(tmp_path: Path, folder: Path, loader: str = "hf", **train_overrides) -> list[str]:
    """--data-cfg/--train-cfg of a tiny run (4 epochs of 3 steps by default) that checkpoints every 2 steps."""
    values = {"max_epochs": 4, "lr": 0.02}
    values.update(train_overrides)
    data = write(tmp_path / "data.toml", data_toml(folder).replace('name = "hf"', f'name = "{loader}"'))
    train = write(tmp_path / "train.toml", tiny_train_toml(**values) + "checkpoint_every_steps = 2\n")
    return ["--data-cfg", str(data), "--train-cfg", str(train)]


def uninterrupted_run(folder: Path, tmp: Path, loader: str) -> Path:
    """The run directory of a tiny checkpointing run that nothing interrupted."""
    args = checkpointing_configs(tmp, folder, loader) + ["--output-dir", str(tmp / "out")]
    result = run_train(args)
    assert result.returncode == 0, result.stderr
    return tmp / "out"


def batches_around_a_restore(make_loaders, stop_after: int, epochs: int = 1) -> tuple[list, list]:
    """For a mid-epoch restore of the training loader: (the batches an uninterrupted loader
    yields from batch ``stop_after`` of epoch 0 to the end of epoch ``epochs - 1``, the batches
    a loader restored from the state saved at that point yields over the same span).

    ``make_loaders()`` builds fresh ``Loaders``; the state goes through JSON, as a checkpoint
    stores it. The two lists are equal, tensor for tensor, when the restore is exact.
    """
    reference = make_loaders()
    expected = []
    for epoch in range(epochs):
        reference.set_epoch(epoch, 0)
        expected += [(images.clone(), labels.clone()) for images, labels in reference.train]
    interrupted = make_loaders()
    interrupted.set_epoch(0, 0)
    batches = iter(interrupted.train)
    for _ in range(stop_after):
        next(batches)
    state = json.loads(json.dumps(interrupted.state_dict()))
    resumed = make_loaders()
    resumed.set_epoch(0, stop_after)
    resumed.load_state_dict(state)
    restored = list(resumed.train)
    for epoch in range(1, epochs):
        resumed.set_epoch(epoch, 0)
        restored += list(resumed.train)
    return expected[stop_after:], restored


def save_then_train(accelerator, result: dict, argv: list[str]) -> None:
    """How a worker under ``accelerate launch`` ends: ``result`` to ``argv[1]/rank<r>.pt`` for the
    test to read; then, given trainer arguments after it, a training run in the same processes
    (one launch instead of two keeps the test suite fast)."""
    from train.cli import main as train_main

    torch.save(result, Path(argv[1]) / f"rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if len(argv) > 2:
        sys.exit(train_main(argv[2:]))
