"""``[preprocess] preload_local``: train from a copy of the data set on the node's own disk.

A shared file system serves a million small reads per epoch slowly; the node's local disk
(``$TMPDIR``, which SLURM sites point at local scratch) does not. One process per node (the
node's first) makes the copy, ``$TMPDIR/imagenet-trainer/<folder name>-<hash of its path>/``;
the node's other processes wait for it and then read the same copy.

The copy is made file by file in parallel threads (a shared file system answers many
requests at once better than one at a time), with a progress line, and is checked before use:
the copy must hold every file of the source with the same size, and nothing else. A
requeued job on the same node finds the copy and reuses it, after copying again only what is
missing or of another size (a copy interrupted half-way, or a source that changed). A
``<copy>.json`` next to the copy says it passed the check; it is removed while the copy is
being changed. When the local disk has too little space, the run stops before copying.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from ..files import exclusive_lock, write_json
from .folder import DataError

LOG = logging.getLogger("train")

LOCAL_FOLDER = "imagenet-trainer"
COPY_THREADS = 16
RESERVE_BYTES = 1 << 30  # left free on the local disk for everything else the node writes
KEY = "train.preprocess.preload_local"


def local_root() -> Path:
    """Where node-local copies go: ``$TMPDIR``, else the system's temporary folder."""
    return Path(os.environ.get("TMPDIR") or tempfile.gettempdir())


def local_copy_path(source: Path, root: Path) -> Path:
    digest = hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:12]
    return root / LOCAL_FOLDER / f"{source.name}-{digest}"


def _marker(copy: Path) -> Path:
    return copy.with_name(copy.name + ".json")


def list_files(root: Path, workers: int = COPY_THREADS) -> dict[str, int]:
    """``relative path -> size`` of every file under ``root`` (links followed), folders
    scanned in parallel: on a shared file system each one is a round trip."""
    files: dict[str, int] = {}
    folders = [root]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        while folders:
            found = list(pool.map(_scan, folders))
            folders = []
            for entries, subfolders in found:
                files.update((os.path.relpath(path, root), size) for path, size in entries)
                folders += subfolders
    return files


def _scan(folder: Path) -> tuple[list[tuple[str, int]], list[Path]]:
    entries, subfolders = [], []
    with os.scandir(folder) as it:
        for entry in it:
            if entry.is_dir():
                subfolders.append(Path(entry.path))
            elif entry.is_file():
                entries.append((entry.path, entry.stat().st_size))
    return entries, subfolders


def free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"


def make_local_copy(source: Path, root: Path, threads: int = COPY_THREADS) -> Path:
    """Bring the node-local copy of ``source`` up to date, check it, and return it.

    Called by one process per node; the others call ``find_local_copy`` afterwards.
    """
    source = Path(source)
    if not source.is_dir():
        raise DataError(f"{KEY}: data.data_dir {source} is not a folder to copy")
    copy = local_copy_path(source, root)
    copy.parent.mkdir(parents=True, exist_ok=True)
    # One copier, also across jobs on the node.
    lock = copy.with_name(copy.name + ".lock")
    with exclusive_lock(lock, without_lock="two jobs starting on this node at once may both copy the data"):
        wanted = list_files(source, threads)
        if not wanted:
            raise DataError(f"{KEY}: data.data_dir {source} holds no files")
        present = list_files(copy, threads) if copy.is_dir() else {}
        todo = sorted(name for name, size in wanted.items() if present.get(name) != size)
        extra = sorted(name for name in present if name not in wanted)
        if todo or extra:
            _marker(copy).unlink(missing_ok=True)
            for name in extra:  # left by an older version of the source
                (copy / name).unlink()
            if todo:
                _copy_files(source, copy, root, todo, wanted, threads)
        problem = _difference(wanted, list_files(copy, threads))
        if problem:
            raise DataError(f"{KEY}: the local copy {copy} of {source} is not complete ({problem}); "
                            "run again to copy what is missing")
        total = sum(wanted.values())
        write_json(_marker(copy), {"source": str(source.resolve()), "files": len(wanted), "bytes": total})
    how = f"copied {len(todo)} file(s)" if todo else "nothing to copy"
    LOG.info(f"preload_local: training reads {copy}, the local copy of {source} "
             f"({len(wanted)} files, {_gib(total)}; {how}, checked by count and size)")
    return copy


def _copy_files(source: Path, copy: Path, root: Path, names: list[str], sizes: dict[str, int], threads: int) -> None:
    need = sum(sizes[name] for name in names)
    free = free_bytes(root)
    if need + RESERVE_BYTES > free:
        raise DataError(f"{KEY}: {root} has {_gib(free)} free, but the copy of {source} needs {_gib(need)} more "
                        f"(and {_gib(RESERVE_BYTES)} is kept spare); point TMPDIR at a larger local disk, free space "
                        f"there, or set {KEY} = false")
    LOG.info(f"preload_local: copying {len(names)} file(s), {_gib(need)}, of {source} to {copy} "
             f"with {threads} threads")
    for folder in sorted({os.path.dirname(name) for name in names}):
        (copy / folder).mkdir(parents=True, exist_ok=True)
    progress = _Progress(need)

    def one(name: str) -> int:
        shutil.copy2(source / name, copy / name)  # keeps modification times, which caches compare
        return sizes[name]

    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for size in pool.map(one, names):
                progress.update(size)
    except OSError as exc:
        if exc.errno == 28:  # ENOSPC: something else filled the disk meanwhile
            raise DataError(f"{KEY}: {root} ran out of space while copying {source}; point TMPDIR at a larger "
                            f"local disk, free space there, or set {KEY} = false") from None
        raise DataError(f"{KEY}: copying {source} to {copy} failed: {exc}") from None
    finally:
        progress.close()


class _Progress:
    """A bar on a terminal; in a log file a line at every tenth of the bytes."""

    def __init__(self, total: int):
        self.total, self.done, self.started, self.next_tenth = total, 0, time.monotonic(), 1
        self.bar = tqdm(total=total, unit="B", unit_scale=True, desc="preload_local", dynamic_ncols=True,
                        mininterval=1.0) if sys.stderr.isatty() else None

    def update(self, size: int) -> None:
        self.done += size
        if self.bar is not None:
            self.bar.update(size)
            return
        while self.total and self.done * 10 >= self.next_tenth * self.total:
            seconds = max(time.monotonic() - self.started, 1e-9)
            rate = self.done / seconds
            left = (self.total - self.done) / rate if rate else 0.0
            LOG.info(f"preload_local: {self.next_tenth * 10}% ({_gib(self.done)} of {_gib(self.total)}), "
                     f"{rate / 2**20:.0f} MiB/s, {left:.0f} s left")
            self.next_tenth += 1

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _difference(wanted: dict[str, int], present: dict[str, int]) -> str | None:
    """How the copy's listing differs from the source's (count, then sizes), or None."""
    missing = sorted(set(wanted) - set(present))
    extra = sorted(set(present) - set(wanted))
    if missing or extra:
        first = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        return f"{len(present)} files instead of {len(wanted)}: {first}"
    for name in sorted(wanted):
        if present[name] != wanted[name]:
            return f"{name} has {present[name]} bytes instead of {wanted[name]}"
    return None


def find_local_copy(source: Path, root: Path) -> Path:
    """The copy the node's first process made and checked (the node's other processes)."""
    copy = local_copy_path(Path(source), root)
    try:
        state = json.loads(_marker(copy).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        state = {}
    if state.get("source") != str(Path(source).resolve()) or not copy.is_dir():
        raise DataError(f"{KEY}: no checked local copy of {source} at {copy}: the node's first process "
                        "did not finish it (see its error)")
    return copy


def node_local_copy(source: str | Path, first_on_node: bool) -> Path:
    """The local copy this process reads: made (or brought up to date) by the node's first
    process, found by the others, which must only ask once it has finished."""
    root = local_root()
    return make_local_copy(Path(source), root) if first_on_node else find_local_copy(Path(source), root)
