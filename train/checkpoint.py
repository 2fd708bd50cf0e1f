"""Training checkpoints: atomic save, verified load, pruning, and the resume decision.

A checkpoint is ``<run>/checkpoints/<step>/``: Accelerate's ``save_state`` (model as
safetensors, optimizer, grad scaler, each process's RNG states) plus our own JSON files
(``trainer_state.json`` with epoch, step, time and the metrics so far; ``process_<rank>.json``
with each process's position inside the epoch; the lr schedule), the weights' moving average
``ema.safetensors`` when ``[train.ema]`` keeps one, a copy of the run's ``config.toml``, and
``manifest.json`` listing every file's size and SHA-256.

It is written to ``checkpoints/.tmp-<step>/`` and renamed into place only when complete, so
a kill at any moment leaves the previous checkpoint intact; the manifest catches a checkpoint
damaged afterwards (a truncated file), and resuming then falls back to the one before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from accelerate.utils import gather_object

from .config import ConfigError, flatten, load_config_text, to_dict
from .errors import StorageError, UserError, first_line
from .files import filesystem_of, free_bytes, tree_bytes, write_json

LOG = logging.getLogger("train")

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
SCHEDULE_STATE = "lr_schedule.json"
CONFIG_COPY = "config.toml"
EMA_WEIGHTS = "ema.safetensors"
TMP_PREFIX = ".tmp-"

# Config keys that may change between a run and its resumption: they do not change what a
# step computes (logging, checkpoint cadence, where the same data lives, worker count, where a
# run without checkpoints starts) or are the natural thing to extend (max_epochs).
SAFE_TO_CHANGE = {
    "train.max_epochs", "train.eval_freq", "train.log.log_freq", "train.log.checkpoint_freq",
    "train.log.checkpoint_every_steps", "train.log.checkpoint_every_minutes", "train.log.keep_last",
    "train.log.wandb_on", "train.log.project", "data.data_dir", "data.dataloader.num_data_workers",
    "train.log.wandb_project", "train.log.profile_steps", "train.preprocess.preload_local", "train.checkpoint_dir",
}


@dataclass
class TrainerState:
    """Where training stands, common to all processes."""
    epoch: int = 0  # the epoch in progress (0-based); == max_epochs when finished
    step: int = 0  # optimizer steps done before the epoch in progress
    train_time_s: float = 0.0  # training time before the current epoch
    eval_time_s: float = 0.0  # time spent in evaluations so far (0 in checkpoints written before it was recorded)
    metrics: list[dict] = field(default_factory=list)  # every evaluation record so far
    class_names: list[str] = field(default_factory=list)  # class index -> folder name, for exports
    # class index -> readable name (classes.tsv), for exports; empty when unknown, and in
    # checkpoints written before it was recorded.
    class_descriptions: list[str] = field(default_factory=list)


@dataclass
class EpochState:
    """One process's position inside the current epoch."""
    batches_done: int = 0  # optimizer steps (global batches): a step is never saved half-accumulated
    loss_sum: float = 0.0  # this process's summed training loss over those batches
    seconds: float = 0.0  # training time spent in this epoch so far
    loader_state: dict | None = None  # reader position for loaders that have one (DALI)


# --------------------------------------------------------------------------------- files


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_manifest(folder: Path) -> None:
    files = {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    write_json(folder / MANIFEST, {"files": files})


def checkpoint_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a usable checkpoint, or None when every file is as written."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return "no manifest.json (incomplete)"
    try:
        files = json.loads(manifest_path.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError) as exc:
        return f"unreadable manifest.json ({exc})"
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{name} has {path.stat().st_size} bytes, expected {expected['size']}"
        if _sha256(path) != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete-looking checkpoint folders, oldest first (by step)."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.isdigit()]
    return sorted(found, key=lambda p: int(p.name))


def latest_valid_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint that passes verification; damaged ones are named in a warning."""
    for folder in reversed(list_checkpoints(run_dir)):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        LOG.warning(f"warning: checkpoint {folder} is damaged ({problem}); trying the previous one")
    return None


def read_trainer_state(folder: Path) -> TrainerState:
    return TrainerState(**json.loads((folder / TRAINER_STATE).read_text(encoding="utf-8")))


def read_epoch_state(folder: Path, rank: int) -> EpochState:
    path = folder / f"process_{rank}.json"
    if not path.is_file():
        raise UserError(f"checkpoint {folder} has no state for process {rank}: it was written by a run "
                        "with fewer processes; resume it with the same number of processes")
    return EpochState(**json.loads(path.read_text(encoding="utf-8")))


def prune(run_dir: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` checkpoints and the best by validation top-1.

    Our own rather than Accelerate's ``ProjectConfiguration(total_limit=...)``, which keeps
    the newest only and would delete the best checkpoint of a run that later got worse.
    """
    folders = list_checkpoints(run_dir)
    keep = set(folders[-keep_last:])
    scored = []
    for folder in folders:
        try:
            metrics = read_trainer_state(folder).metrics
        except (OSError, ValueError, TypeError):
            continue
        # Only a checkpoint of the very weights that were evaluated can be "the best".
        if metrics and metrics[-1]["step"] == int(folder.name):
            scored.append((metrics[-1]["val_acc1"], int(folder.name), folder))
    if scored:
        keep.add(max(scored)[2])  # ties go to the later checkpoint
    for folder in folders:
        if folder not in keep:
            shutil.rmtree(folder, ignore_errors=True)


def remove_partial_saves(run_dir: Path) -> None:
    root = run_dir / CHECKPOINTS
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith(TMP_PREFIX):
                shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------- save and load


def save(accelerator, run_dir: Path, trainer: TrainerState, epoch_state: EpochState, scheduler,
         keep_last: int, ema=None) -> Path:
    """Write a checkpoint from every process (collective: all processes must call it).

    ``ema``: the weights' moving average (``optim.ema.WeightAverage``) or None. The main
    process's copy is stored: its weights are every process's, and its BatchNorm statistics
    are the ones evaluations use (``validation.sync_buffers``), as for the trained weights.

    It is named after the global step: the epoch's starting step plus its batches done. A
    file that cannot be written (a full disk) on any process stops every process with the
    same ``StorageError``, the staging folder removed and the previous checkpoint untouched.
    """
    step = trainer.step + epoch_state.batches_done
    root = run_dir / CHECKPOINTS
    final = root / f"{step:08d}"
    staging = root / f"{TMP_PREFIX}{step:08d}"
    previous = ([p for p in list_checkpoints(run_dir) if p != final] or [None])[-1]
    saving = _Saving(accelerator, final, staging, previous)

    def prepare() -> None:
        warn_if_short_of_space(root, previous)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)

    def write_own_part() -> None:
        accelerator.save_state(str(staging))
        write_json(staging / f"process_{accelerator.process_index}.json", asdict(epoch_state))

    def complete() -> None:
        write_json(staging / TRAINER_STATE, asdict(trainer))
        write_json(staging / SCHEDULE_STATE, scheduler.state_dict())
        if ema is not None:
            ema.save(staging / EMA_WEIGHTS)
        shutil.copyfile(run_dir / CONFIG_COPY, staging / CONFIG_COPY)
        write_manifest(staging)
        _fsync_tree(staging)
        if final.exists():  # the same step saved again (e.g. a signal right after a periodic save)
            shutil.rmtree(final)
        staging.rename(final)

    saving.together(prepare if accelerator.is_main_process else None)
    saving.together(write_own_part)
    saving.together(complete if accelerator.is_main_process else None)
    if accelerator.is_main_process:
        prune(run_dir, keep_last)
    return final


def checkpoint_bytes(folder: Path) -> int:
    """A checkpoint's size, from its manifest (no walk over the files) where it has one."""
    try:
        files = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["files"]
        return sum(entry["size"] for entry in files.values())
    except (OSError, ValueError, KeyError, TypeError):
        return tree_bytes(folder)


def warn_if_short_of_space(root: Path, previous: Path | None) -> None:
    """A warning before a save that will probably not fit: less free space than the last checkpoint."""
    if previous is None:
        return
    needed, free = checkpoint_bytes(previous), free_bytes(root)
    if free < needed:
        LOG.warning(f"warning: {free / 2**30:.2f} GiB free on {filesystem_of(root)}, less than the last checkpoint "
                    f"({previous.name}, {needed / 2**30:.2f} GiB): the next checkpoint may not fit")


def is_storage_failure(exc: BaseException) -> bool:
    """Whether ``exc`` says a file could not be written, rather than a bug.

    Python raises OSError; torch's writer a RuntimeError ("unexpected pos" after a short
    write, "file write failed"); safetensors its own error naming the OS error.
    """
    if isinstance(exc, OSError):
        return True
    text = str(exc).lower()
    return any(sign in text for sign in ("unexpected pos", "file write failed", "no space left", "os error",
                                         "i/o error", "disk quota", "file too large"))


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror + (f" ({Path(exc.filename).name})" if exc.filename else "")
    return first_line(exc, with_type=True)


class _Saving:
    """One checkpoint being written: the processes' failures, agreed on after each part."""

    def __init__(self, accelerator, final: Path, staging: Path, previous: Path | None):
        self.accelerator, self.final, self.staging, self.previous = accelerator, final, staging, previous

    def together(self, work) -> None:
        """Run ``work`` (None: nothing for this process), then learn every process's outcome
        (collective): when one failed, all raise, so none waits for the others forever."""
        error = None
        if work is not None:
            try:
                work()
            except Exception as exc:  # every failure must reach the other processes
                error = exc
        outcome = None if error is None else (is_storage_failure(error), _reason(error))
        outcomes = [outcome] if self.accelerator.num_processes == 1 else gather_object([outcome])
        failed = [(rank, o) for rank, o in enumerate(outcomes) if o is not None]
        if not failed:
            return
        if error is not None and not is_storage_failure(error):
            raise error  # a bug: keep its traceback
        rank, (storage, reason) = failed[0]
        if not storage:
            raise RuntimeError(f"process {rank} failed while writing checkpoint {self.final}: {reason}")
        raise self.storage_error(reason if rank == 0 else f"process {rank}: {reason}")

    def storage_error(self, reason: str) -> StorageError:
        written = 0
        if self.accelerator.is_main_process:
            written = tree_bytes(self.staging) if self.staging.is_dir() else 0
            shutil.rmtree(self.staging, ignore_errors=True)  # its space is what the next attempt needs
        root = self.final.parent
        if self.previous is not None:
            need = f"a checkpoint takes about {checkpoint_bytes(self.previous) / 2**30:.2f} GiB"
            then = (f"the previous checkpoint {self.previous} is intact: free some space, then run the same "
                    "command to resume from it")
        else:
            need = f"more than the {written / 2**30:.2f} GiB written before the failure"
            then = "there is no earlier checkpoint: free some space, then run the same command to start again"
        return StorageError(f"cannot write checkpoint {self.final}: {reason}; {filesystem_of(root)} has "
                            f"{free_bytes(root) / 2**30:.2f} GiB free, {need}; {then}")


def load(accelerator, folder: Path, scheduler, ema=None) -> tuple[TrainerState, EpochState]:
    """Restore model, optimizer, scaler, RNG states, the schedule (and ``ema``'s average) from ``folder``.

    Accelerate reads its pickle-based files with ``weights_only`` loading; our own state is JSON.
    """
    accelerator.load_state(str(folder))
    scheduler.load_state_dict(json.loads((folder / SCHEDULE_STATE).read_text(encoding="utf-8")))
    if ema is not None:
        ema.load(folder / EMA_WEIGHTS)
    return read_trainer_state(folder), read_epoch_state(folder, accelerator.process_index)


# -------------------------------------------------------------------- resume decision


def config_differences(old: dict, new: dict) -> list[str]:
    """'key: old -> new' for every key whose value differs and is not safe to change."""
    a, b = flatten(old), flatten(new)
    changed = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key) and key not in SAFE_TO_CHANGE:
            changed.append(f"{key}: {a.get(key, '(unset)')!r} -> {b.get(key, '(unset)')!r}")
    return changed


def _read_config(path: Path) -> dict:
    """The stored config as nested dicts, with the schema's defaults for keys it predates (a key
    added since, at its default, is no difference); as written when it no longer validates."""
    try:
        text = path.read_text(encoding="utf-8")
        raw = tomllib.loads(text)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"{path}: cannot read the stored config ({exc})") from None
    try:
        return to_dict(load_config_text(text, str(path)))
    except ConfigError:
        return raw


def _refuse_if_different(stored: Path, config: dict, what: str) -> None:
    changed = config_differences(_read_config(stored), config)
    if changed:
        shown = "; ".join(changed[:6]) + (f"; and {len(changed) - 6} more" if len(changed) > 6 else "")
        raise UserError(f"{what} was made with a different config ({shown}); "
                        "resume with the same config, or give a new --output-dir")


def choose_resume_point(run_dir: Path, config: dict, explicit: Path | None,
                        named_by: str = "--resume") -> Path | None:
    """The checkpoint to resume from, or None to start afresh. Reads only; decides on refusal.

    ``config`` is the new run's resolved config as nested dicts; ``named_by`` says where the
    ``explicit`` checkpoint was given, for errors.
    """
    if explicit is not None:
        problem = checkpoint_problem(explicit) if explicit.is_dir() else "not a folder"
        if problem:
            raise UserError(f"{named_by} {explicit}: not a usable checkpoint ({problem})")
        _refuse_if_different(explicit / CONFIG_COPY, config, f"checkpoint {explicit}")
        return explicit
    stored = run_dir / CONFIG_COPY
    if not stored.is_file():
        return None
    _refuse_if_different(stored, config, f"run directory {run_dir}")
    checkpoint = latest_valid_checkpoint(run_dir)
    if checkpoint is not None:
        _refuse_if_different(checkpoint / CONFIG_COPY, config, f"checkpoint {checkpoint}")
    return checkpoint
