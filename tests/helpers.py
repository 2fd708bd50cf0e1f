"""Test helpers: tiny ImageNet-layout folders and running the trainer as a real command."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train import checkpoint as ckpt
from train import loop
from train.cli import main as train_main
from train.config import DataConfig, DataloaderConfig
from train.data import build_loaders
from train.data.builtin import render_image
from train.evaluate import load_model, preprocess_of
from train.rundir import read_metrics
from train.startup import Run

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


def free_port() -> int:
    """A TCP port nothing listens on now, for a launch's rendezvous (other test sessions may share the machine)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def accelerate_launch(num_processes: int, port: int) -> list[str]:
    accelerate = str(Path(sys.executable).parent / "accelerate")
    config = REPO / "accelerate_configs" / ("2xCPU.yaml" if num_processes == 2 else "1xCPU.yaml")
    return [accelerate, "launch", "--config_file", str(config), "--main_process_port", str(port)]


TIMING = {"epoch_time_s", "train_time_s", "images_per_s", "eval_time_s", "eta_s", "gpu_hours"}


def without_timing(records: list[dict]) -> list[dict]:
    """metrics.jsonl records without the fields that measure time, which differ between runs."""
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


# The tiny runs below: 24 training images at global batch 8.
STEPS_PER_EPOCH = 3


def run_configs(tmp_path: Path, folder: Path, train_toml: str, loader: str = "hf", workers: int = 0,
                every_steps: int = 2) -> list[str]:
    """--data-cfg/--train-cfg: ``train_toml`` on ``folder``, checkpointing every ``every_steps`` steps.

    Every 2 steps over 2 epochs of 3 gives checkpoints 2 and 4 inside an epoch, 6 at the end:
    a run killed as soon as checkpoint 2 is complete has left only mid-epoch ones.
    """
    data = write(tmp_path / "data.toml",
                 data_toml(folder, workers=workers).replace('name = "hf"', f'name = "{loader}"'))
    train = write(tmp_path / "train.toml", train_toml + f"checkpoint_every_steps = {every_steps}\n")
    return ["--data-cfg", str(data), "--train-cfg", str(train)]


def checkpointing_configs(tmp_path: Path, folder: Path, loader: str = "hf", workers: int = 0, every_steps: int = 2,
                          **train_overrides) -> list[str]:
    """A tiny run of 4 epochs (12 steps) that checkpoints every ``every_steps`` steps."""
    values = {"max_epochs": 4, "lr": 0.02}
    values.update(train_overrides)
    return run_configs(tmp_path, folder, tiny_train_toml(**values), loader, workers, every_steps)


def schedule_free_toml(**overrides) -> str:
    """The tiny training config with Schedule-Free SGD (warm-up over 2 epochs inside the
    optimizer, constant schedule) and BatchNorm statistics recomputed over 16 images."""
    return tiny_train_toml(num_samples_for_stats=16, **overrides).replace(
        '[optim]\nname = "sgd"\nmomentum = 0.9\nweight_decay = 1e-4',
        '[optim]\nname = "sgd-schedule-free"\nmomentum = 0.9\nweight_decay = 1e-4\nwarmup_epochs = 2').replace(
        'name = "cosine"\nwarmup_epochs = 0.5', 'name = "constant"')


def sam_v2_toml(**overrides) -> str:
    """The tiny training config with single-step (v2) adaptive SAM."""
    return tiny_train_toml(**overrides).replace(
        '[optim]\nname = "sgd"\nmomentum = 0.9\nweight_decay = 1e-4',
        '[optim]\nname = "sgd-sam"\nmomentum = 0.9\nweight_decay = 1e-4\nrho = 0.5\nadaptive = true\nv2 = true')


@dataclass(frozen=True)
class LaunchedRun:
    """A finished run: its directory, the config arguments it ran with, what it printed."""
    dir: Path
    args: list[str]
    stdout: str
    stderr: str


def launched_run(args: list[str], out: Path, launcher: list[str] | None = None, **env) -> LaunchedRun:
    """``python -m train ARGS --output-dir OUT`` (under ``launcher``) to its end, which must be a success."""
    result = run_train(args + ["--output-dir", str(out)], launcher=launcher, **env)
    assert result.returncode == 0, result.stderr[-3000:]
    return LaunchedRun(out, args, result.stdout, result.stderr)




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
    torch.save(result, Path(argv[1]) / f"rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if len(argv) > 2:
        sys.exit(train_main(argv[2:]))


# ------------------------------------------------------------------ killing a run


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process below it, read from /proc (torchrun starts each worker in a
    session of its own, so a process group does not reach them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += children.get(current, [])
    return tree


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def kill_after_checkpoint(args: list[str], out: Path, step: int, launcher: list[str] | None = None,
                          timeout: float = 300, **env) -> Path:
    """Start ``python -m train ARGS --output-dir OUT`` (under ``launcher``), SIGKILL it and every
    process it started as soon as checkpoint ``step`` is complete, as a crashed node would
    end; returns the newest checkpoint left behind."""
    command = (launcher or [sys.executable]) + ["-m", "train"] + args + ["--output-dir", str(out)]
    log = out.parent / f"{out.name}-killed.log"
    with log.open("w") as output:
        process = subprocess.Popen(command, cwd=REPO, env=clean_env(**env), stdout=output, stderr=subprocess.STDOUT)
    target = out / ckpt.CHECKPOINTS / f"{step:08d}" / ckpt.MANIFEST
    deadline = time.monotonic() + timeout
    try:
        while not target.exists():
            assert process.poll() is None, f"training ended early:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "timed out waiting for the checkpoint"
            time.sleep(0.005)
    finally:
        tree = process_tree(process.pid)
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.wait()
        while any(alive(pid) for pid in tree):
            time.sleep(0.01)
    assert not (out / "model").exists(), "the run finished before it was killed: the test proves nothing"
    newest = ckpt.latest_valid_checkpoint(out)
    assert newest is not None
    return newest


def assert_rerun_reproduces(args: list[str], out: Path, newest: Path, reference: Path,
                            launcher: list[str] | None = None, **env) -> None:
    """The killed run's command again: it resumes from ``newest`` and ends with the metrics of
    the ``reference`` run, which nothing interrupted."""
    result = run_train(args + ["--output-dir", str(out)], launcher=launcher, **env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {newest}" in result.stdout
    assert without_timing(read_metrics(out / "metrics.jsonl")) == \
        without_timing(read_metrics(reference / "metrics.jsonl"))


def batches_done(checkpoint: Path, rank: int = 0) -> int:
    """Where in its epoch the checkpoint was written (batches of this process's shard)."""
    return json.loads((checkpoint / f"process_{rank}.json").read_text())["batches_done"]


def assert_mid_epoch(checkpoint: Path) -> None:
    assert 0 < batches_done(checkpoint) < STEPS_PER_EPOCH, f"{checkpoint} is not inside an epoch"


# ------------------------------------------------------------- watching the real loop


@dataclass
class Snapshot:
    """The model and optimizer at one moment of a run (copies, on the CPU)."""
    step: int
    params: dict[str, torch.Tensor]  # the unwrapped model's named parameters
    buffers: dict[str, torch.Tensor]  # its buffers: BatchNorm statistics
    z: dict[str, torch.Tensor]  # Schedule-Free's z sequence per parameter; empty for other optimizers
    train_mode: bool | None  # Schedule-Free's flag: the parameters hold y (True) or x (False)
    stored: dict[str, torch.Tensor] | None = None  # for a save: the model state the checkpoint holds


@dataclass
class WatchedRun:
    """A run of ``train.cli.main`` and what the loop held at its own moments."""
    run: Run | None = None
    trained: list[Snapshot] = field(default_factory=list)  # each epoch's end of training, before evaluating
    evaluated: list[Snapshot] = field(default_factory=list)  # the model as each evaluation received it
    saved: list[Snapshot] = field(default_factory=list)  # the model just before each checkpoint


def snapshot(run: Run, step: int) -> Snapshot:
    model = run.accelerator.unwrap_model(run.model)
    state = run.optimizer.state
    return Snapshot(step=step, params={n: p.detach().clone() for n, p in model.named_parameters()},
                    buffers={n: b.detach().clone() for n, b in model.named_buffers()},
                    z={n: state[p]["z"].clone() for n, p in model.named_parameters() if "z" in state.get(p, {})},
                    train_mode=run.optimizer.param_groups[0].get("train_mode"))


def watched_run(args: list[str]) -> WatchedRun:
    """``python -m train ARGS`` in this process, the loop's own functions wrapped to take
    snapshots: nothing about the run changes, the wrappers only copy tensors."""
    watched = WatchedRun()
    real = {name: getattr(loop, name) for name in ("start_run", "epoch_mean_loss", "evaluate", "save_checkpoint")}

    def start_run(config, options):
        run, epoch_state = real["start_run"](config, options)
        watched.run = run
        return run, epoch_state

    def epoch_mean_loss(run, state):
        watched.trained.append(snapshot(run, run.trainer.step + state.batches_done))
        return real["epoch_mean_loss"](run, state)

    def evaluate(*args, **kwargs):
        watched.evaluated.append(snapshot(watched.run, watched.run.trainer.step))
        return real["evaluate"](*args, **kwargs)

    def save_checkpoint(run, state):
        seen = snapshot(run, run.trainer.step + state.batches_done)
        real["save_checkpoint"](run, state)
        # Read now: pruning removes older checkpoints as the run goes on.
        seen.stored = load_file(str(run.run_dir / ckpt.CHECKPOINTS / f"{seen.step:08d}" / "model.safetensors"))
        watched.saved.append(seen)

    with pytest.MonkeyPatch.context() as patch:
        for name, wrapper in (("start_run", start_run), ("epoch_mean_loss", epoch_mean_loss),
                              ("evaluate", evaluate), ("save_checkpoint", save_checkpoint)):
            patch.setattr(loop, name, wrapper)
        assert train_main(args) == 0
    return watched


# ------------------------------------------------------------ evaluating an exported model


@dataclass(frozen=True)
class PerImage:
    """One process's evaluation of a model, image by image, in the validation loader's order."""
    loss: torch.Tensor
    top1: torch.Tensor
    top5: torch.Tensor


@torch.no_grad()
def evaluate_per_image(model_dir: Path, data_dir: Path, loader: str, label_smoothing: float = 0.1) -> PerImage:
    """An exported model on one process with the run's validation preprocessing (from its
    ``pretrained_cfg``, as ``train.evaluate`` takes it) and the loss the run reports (the tiny
    configs' label smoothing)."""
    model = load_model(str(model_dir)).eval().to(memory_format=torch.channels_last)
    data = DataConfig(data_dir=str(data_dir), num_classes=model.num_classes,
                      dataloader=DataloaderConfig(name=loader, num_data_workers=1))
    loaders = build_loaders(data, preprocess_of(model), 8, 1, 0, seed=0)
    losses, top1, top5 = [], [], []
    for images, labels in loaders.val:
        logits = model(images.contiguous(memory_format=torch.channels_last)).float()
        losses.append(torch.nn.functional.cross_entropy(logits, labels, label_smoothing=label_smoothing,
                                                        reduction="none"))
        best = logits.topk(min(5, model.num_classes), dim=1).indices
        top1.append(best[:, 0] == labels)
        top5.append((best == labels[:, None]).any(dim=1))
    return PerImage(torch.cat(losses), torch.cat(top1), torch.cat(top5))
