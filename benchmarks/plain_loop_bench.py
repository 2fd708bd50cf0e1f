"""The trainer's training epochs against a plain timm + torchvision loop with the same recipe.

    pip install scikit-learn     # once: its handwritten digits are the data
    python benchmarks/plain_loop_bench.py [--rounds 3] [--epochs 2] [--workers 2]
                                          [--also-trainer OTHER_CHECKOUT] [--json OUT.json]

The data: scikit-learn's handwritten digits (1,797 real scans of 8 x 8 pixels, 10 classes),
enlarged to 64 px RGB JPEGs in an ImageNet-layout folder (4 in 5 for training), made once into
this project's cache folder. The recipe, on both sides: ResNet-18 from timm, batches of 64,
random-area crops resized to 64 px and random flips, SGD (momentum 0.9, weight decay 5e-5,
lr 0.2 on a per-step cosine), label smoothing 0.1, float32 on the CPU (or the GPU's default
when there is one), ``--workers`` loader processes.

* "trainer": ``python -m train`` on that folder with the HF loader; its time is the sum of the
  ``epoch_time_s`` of its records (each epoch's training, from the first batch asked for to the
  last step; start-up and evaluations are not counted).
* "plain": torchvision's ``ImageFolder``, ``RandomResizedCrop`` (the same area and aspect
  ranges), ``RandomHorizontalFlip``, ``ToTensor`` and ``Normalize`` in a ``DataLoader`` with
  persistent workers, a timm model and ``torch.optim.SGD``, timed the same way.
* ``--also-trainer DIR``: another checkout of this project (a git worktree of an earlier commit,
  say), timed in the same rounds: the before and after of a change, each against the plain loop.

Each run is a process of its own; every round runs each side once, the order rotating from round
to round, so that a machine whose load changes weighs on every side alike. Printed: each run's
seconds, then the median over the rounds and each trainer's speed relative to the plain loop
(plain seconds / trainer seconds: 1.00 is as fast, above 1 faster).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GENERATOR_VERSION = 1
SIDE = 64
BATCH = 64
LR = 0.2

TRAIN_TOML = """\
batch_size = {batch}
max_epochs = {epochs}
lr = {lr}
label_smoothing = 0.1
arch = "resnet18"
use_amp = false

[preprocess]
interpolation = "bilinear"
train_crop_size = {side}
val_image_size = {val_size}
val_crop_size = {side}

[optim]
name = "sgd"
momentum = 0.9
weight_decay = 5e-5

[lr_scheduler]
name = "cosine"
warmup_epochs = 0

[reproduce]
seed = 0

[log]
log_freq = 10
checkpoint_freq = 1000
"""


def digits_folder(root: Path) -> Path:
    """scikit-learn's digits as 64 px JPEGs in train/<digit>/ and val/<digit>/, made once."""
    done = root / f"COMPLETE-{GENERATOR_VERSION}"
    if done.exists():
        return root
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("error: this benchmark's data are scikit-learn's digits: pip install scikit-learn") from None
    from PIL import Image
    digits = load_digits()
    for index, (pixels, digit) in enumerate(zip(digits.images, digits.target)):
        split = "val" if index % 5 == 4 else "train"
        folder = root / split / f"digit_{digit}"
        folder.mkdir(parents=True, exist_ok=True)
        gray = Image.fromarray((pixels * (255 / 16)).round().astype("uint8")).resize((SIDE, SIDE), Image.BICUBIC)
        gray.convert("RGB").save(folder / f"{index:04d}.JPEG", quality=90)
    done.touch()
    return root


# ----------------------------------------------------------------------- the plain loop


def plain_loop(folder: Path, epochs: int, workers: int) -> list[float]:
    """Each epoch's seconds of a bare timm + torchvision loop with the trainer's recipe."""
    import timm
    import torch
    from torchvision import datasets, transforms

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mean, std = timm.data.IMAGENET_DEFAULT_MEAN, timm.data.IMAGENET_DEFAULT_STD
    augment = transforms.Compose([
        transforms.RandomResizedCrop(SIDE, scale=(0.1, 1.0), ratio=(0.8, 1.25)),  # the trainer's ranges
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean, std)])
    train_set = datasets.ImageFolder(str(folder / "train"), augment)
    loader = torch.utils.data.DataLoader(train_set, batch_size=BATCH, shuffle=True, drop_last=True,
                                         num_workers=workers, persistent_workers=workers > 0,
                                         pin_memory=device.type == "cuda")
    model = timm.create_model("resnet18", num_classes=len(train_set.classes)).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=5e-5)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * len(loader))
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    seconds = []
    for _ in range(epochs):
        started = time.perf_counter()
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            loss = criterion(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    return seconds


# ---------------------------------------------------------------------------- the rounds


def run_trainer(checkout: Path, folder: Path, args: argparse.Namespace, work: Path) -> list[float]:
    """Each epoch's seconds of ``python -m train`` from ``checkout`` (its own ``train`` package)."""
    data = work / "data.toml"
    data.write_text(f'data_dir = "{folder}"\nnum_classes = 10\n\n[dataloader]\nname = "hf"\n'
                    f"num_data_workers = {args.workers}\n")
    train = work / "train.toml"
    train.write_text(TRAIN_TOML.format(batch=BATCH, epochs=args.epochs, lr=LR, side=SIDE, val_size=SIDE + 8))
    run_dir = work / "run"
    command = [sys.executable, "-m", "train", "--data-cfg", str(data), "--train-cfg", str(train),
               "--output-dir", str(run_dir)]
    env = {key: value for key, value in os.environ.items() if not key.startswith("ACCELERATE_")}
    result = subprocess.run(command, cwd=checkout, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"error: the trainer in {checkout} failed ({result.returncode}):\n{result.stderr[-2000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [record["epoch_time_s"] for record in records]


def run_plain(folder: Path, args: argparse.Namespace) -> list[float]:
    command = [sys.executable, __file__, "--plain-only", str(folder), "--epochs", str(args.epochs),
               "--workers", str(args.workers)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"error: the plain loop failed ({result.returncode}):\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--also-trainer", type=Path, default=None, metavar="OTHER_CHECKOUT",
                        help="another checkout of this project, timed in the same rounds")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plain-only", type=Path, default=None, help=argparse.SUPPRESS)  # one plain run
    args = parser.parse_args(argv)
    if args.plain_only:
        print(json.dumps(plain_loop(args.plain_only, args.epochs, args.workers)))
        return 0
    from train.data.builtin import default_cache_root
    folder = digits_folder(default_cache_root() / "sklearn-digits-64")
    sides = {"trainer": REPO}
    if args.also_trainer:
        if not (args.also_trainer / "train" / "__main__.py").is_file():
            parser.error(f"--also-trainer {args.also_trainer}: not a checkout of this project (no train/__main__.py)")
        sides["other trainer"] = args.also_trainer.resolve()
    names = [*sides, "plain"]
    seconds: dict[str, list[float]] = {name: [] for name in names}
    per_epoch: dict[str, list[list[float]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="plain-loop-bench-") as scratch:
        for index in range(args.rounds):
            order = names[index % len(names):] + names[:index % len(names)]
            for name in order:
                work = Path(scratch) / f"{index}-{name.replace(' ', '-')}"
                work.mkdir()
                epochs = (run_plain(folder, args) if name == "plain" else run_trainer(sides[name], folder, args, work))
                seconds[name].append(sum(epochs))
                per_epoch[name].append(epochs)
                print(f"round {index + 1} {name:>13}: {sum(epochs):6.1f} s for {args.epochs} epoch(s) "
                      f"({', '.join(f'{s:.1f}' for s in epochs)})", flush=True)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    print(f"median seconds over {args.rounds} rounds: " + ", ".join(f"{n} {s:.1f}" for n, s in medians.items()))
    # The first epoch also starts the loader's workers; the later ones show the steady state.
    first = {name: statistics.median(run[0] for run in runs) for name, runs in per_epoch.items()}
    later = {name: statistics.median(sum(run[1:]) for run in runs) for name, runs in per_epoch.items()}
    for name in sides:
        print(f"{name} ({sides[name]}): {medians['plain'] / medians[name]:.3f}x the plain loop's speed "
              f"(first epoch {first['plain'] / first[name]:.3f}x"
              + (f", later epochs {later['plain'] / later[name]:.3f}x)" if args.epochs > 1 else ")"))
    if args.json:
        args.json.write_text(json.dumps({"seconds": seconds, "medians": medians, "per_epoch": per_epoch,
                                         "checkouts": {n: str(p) for n, p in sides.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
