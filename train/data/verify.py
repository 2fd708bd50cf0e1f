"""Finding unreadable images before DALI does.

DALI's CPU decoder, given a truncated JPEG, can kill the whole process with a segmentation
fault, or fail with a message that does not name the file. So every file of a folder data
set is opened and decoded once with Pillow (at 1/8 scale where the format allows: every
byte is still parsed, so truncation shows, at a fraction of the cost) before DALI sees it.

Results are cached by path, size and modification time, one cache file per data set, so an
ImageNet-sized folder is decoded once and a later start only looks at the files' sizes and
times (in parallel threads: on a network file system each stat waits on the server). In a
training run only the main process verifies (``dali.open_sources``); a lock file keeps two
runs on the same data from doing the work twice, where the file system can lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import sys
import warnings
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from ..files import exclusive_lock, write_atomically
from .builtin import default_cache_root

# Bump when the checks change, so results of older checks are not trusted.
CACHE_VERSION = 1
CACHE_HEADER = f"# imagenet-trainer image verification v{CACHE_VERSION}\n"
# Pillow's names of the formats DALI's decoders read (PPM covers the PNM family).
DALI_FORMATS = frozenset({"JPEG", "PNG", "BMP", "TIFF", "PPM", "WEBP", "JPEG2000"})
LOG = logging.getLogger("train")
CHECK_COMMAND = "python -m train.data.check"
VERIFY_BLOCK = 1024
SAVE_EVERY_BLOCKS = 64  # the cache is rewritten every 65,536 files during a first pass
# A stat waits on the file server (Lustre, NFS) rather than on the CPU, so many threads pay
# off even on few cores: checking a warm cache takes seconds instead of minutes.
STAT_THREADS = 32
STAT_BLOCK = 4096
# What flock raises where the file system does not lock (Lustre mounted without -o flock, some NFS).


@dataclass(frozen=True)
class Problem:
    path: str
    reason: str


def image_problem(data: bytes) -> str | None:
    """Why DALI could not decode ``data``, or None when it is a whole image DALI reads."""
    if not data:
        return "empty file (0 bytes)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's decompression-bomb and EXIF warnings
            with Image.open(io.BytesIO(data)) as image:
                if image.format not in DALI_FORMATS:
                    return f"{image.format} image, a format DALI does not decode"
                image.draft("RGB", (1, 1))  # JPEG: decode at 1/8 scale, still reading every byte
                image.load()
    except UnidentifiedImageError:
        return f"not an image (starts with {data[:8]!r})"
    except Exception as exc:  # Pillow raises many types for a damaged file; all mean the same here
        message = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "truncated" in message.lower():
            return f"truncated image ({message})"
        return f"cannot decode: {message}"
    return None


def file_problem(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        return f"cannot read: {exc.strerror or exc}"
    return image_problem(data)


def default_cache_file(root: Path) -> Path:
    digest = hashlib.sha1(str(Path(root).resolve()).encode()).hexdigest()[:16]
    return default_cache_root() / "verified" / f"{digest}.tsv"


def _signature(path: str) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


class VerificationCache:
    """``relative path -> (size, mtime_ns, problem or '')`` of one data set, as a TSV file."""

    def __init__(self, file: Path, root: Path):
        self.file = Path(file)
        self.root = str(Path(root).resolve())
        # Paths listed from the folder start with the root as it was given: cutting that off
        # is the relative path, without normalising a million paths one by one.
        self.prefixes = tuple(dict.fromkeys(p + os.sep for p in (str(root), os.path.abspath(root), self.root)))

    def key(self, path: str) -> str:
        for prefix in self.prefixes:
            if path.startswith(prefix):
                return path[len(prefix):]
        absolute = os.path.abspath(path)
        return os.path.relpath(absolute, self.root) if absolute.startswith(self.root + os.sep) else absolute

    def load(self) -> dict[str, tuple[int, int, str]]:
        entries: dict[str, tuple[int, int, str]] = {}
        try:
            with open(self.file, encoding="utf-8") as f:
                if f.readline() != CACHE_HEADER:
                    return entries
                for line in f:
                    fields = line.rstrip("\n").split("\t")
                    if len(fields) == 4 and fields[1].isdigit() and fields[2].isdigit():
                        entries[fields[0]] = (int(fields[1]), int(fields[2]), fields[3])
        except (OSError, UnicodeDecodeError):
            pass  # no cache yet, or an unreadable one: everything gets verified again
        return entries

    def save(self, entries: dict[str, tuple[int, int, str]]) -> None:
        self.file.parent.mkdir(parents=True, exist_ok=True)
        rows = "".join(f"{path}\t{size}\t{mtime}\t{problem}\n" for path, (size, mtime, problem) in entries.items())
        write_atomically(self.file, CACHE_HEADER + rows)

    @contextlib.contextmanager
    def locked(self):
        """Held while verifying, so concurrent processes verify each file once between them."""
        self.file.parent.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(self.file.with_suffix(".lock"),
                            without_lock="two jobs starting on the same data at once may both verify it"):
            yield


def _clean(reason: str) -> str:
    return " ".join(reason.split())  # the cache is tab- and line-separated


def verify_files(paths: Iterable[str], root: Path, cache_file: Path | None, workers: int,
                 progress: bool = True, on_start=None, trust_cache: bool = True) -> list[Problem]:
    """The problems among ``paths`` (files under ``root``), verifying only what the cache lacks.

    ``cache_file`` None verifies everything and caches nothing; ``trust_cache`` False
    verifies everything and caches the results. ``on_start(n)`` is called before ``n``
    files are decoded, when there are any.
    """
    paths = list(paths)
    if cache_file is None:
        problems, todo = _consult(paths, {}, None)
        return _finish(paths, problems, _decode(todo, {}, workers, progress, on_start))
    cache = VerificationCache(cache_file, root)
    # Without the lock first: when everything is cached (every start but the first), the
    # processes of a run need not wait for one another.
    if trust_cache:
        problems, todo = _consult(paths, cache.load(), cache)
        if not todo:
            return _finish(paths, problems, {})
    with cache.locked():
        entries = cache.load()  # again: another process may have verified the files meanwhile
        problems, todo = _consult(paths, entries if trust_cache else {}, cache)
        found = _decode(todo, entries, workers, progress, on_start, save=lambda: cache.save(entries))
    return _finish(paths, problems, found)


def _consult(paths: list[str], entries: dict, cache: VerificationCache | None):
    """Problems known from ``entries``, and (path, cache key, size and mtime) of the rest."""
    problems: dict[str, str] = {}
    todo: list[tuple[str, str, tuple[int, int] | None]] = []
    for path, signature in zip(paths, _signatures(paths)):
        key = cache.key(path) if cache is not None else path
        cached = entries.get(key)
        if signature is not None and cached is not None and cached[:2] == signature:
            if cached[2]:
                problems[path] = cached[2]
        else:
            todo.append((path, key, signature))
    return problems, todo


def _signatures(paths: list[str]) -> list[tuple[int, int] | None]:
    """Each path's (size, mtime), stat'ed by STAT_THREADS threads in blocks."""
    if len(paths) <= STAT_BLOCK:
        return [_signature(path) for path in paths]
    blocks = [paths[start:start + STAT_BLOCK] for start in range(0, len(paths), STAT_BLOCK)]
    with ThreadPoolExecutor(max_workers=STAT_THREADS) as pool:
        return [signature for block in pool.map(lambda block: [_signature(p) for p in block], blocks)
                for signature in block]


def _decode(todo: list, entries: dict, workers: int, progress: bool, on_start, save=None) -> dict[str, str]:
    """Decode the files of ``todo``, record them in ``entries``; returns their problems.

    ``save()`` is called now and then and at the end, so an interrupted first pass over a
    large data set keeps what it has done."""
    problems: dict[str, str] = {}
    if not todo:
        return problems
    if on_start is not None:
        on_start(len(todo))
    bar = tqdm(total=len(todo), desc="verifying images", unit="img", dynamic_ncols=True,
               disable=not (progress and sys.stderr.isatty()), mininterval=1.0)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        # Pillow releases the GIL while decoding, so threads decode in parallel. Blocks keep
        # the number of pending futures small for a million files.
        for start in range(0, len(todo), VERIFY_BLOCK):
            block = todo[start:start + VERIFY_BLOCK]
            for (path, key, signature), problem in zip(block, pool.map(file_problem, [t[0] for t in block])):
                if problem:
                    problems[path] = _clean(problem)
                if signature is not None:
                    entries[key] = (*signature, _clean(problem or ""))
            bar.update(len(block))
            if save is not None and (start // VERIFY_BLOCK + 1) % SAVE_EVERY_BLOCKS == 0:
                save()
    bar.close()
    if save is not None:
        save()
    return problems


def _finish(paths: list[str], known: dict[str, str], found: dict[str, str]) -> list[Problem]:
    problems = {**known, **found}
    return [Problem(path, problems[path]) for path in paths if path in problems]


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def describe_problems(problems: list[Problem], where: str | Path) -> str:
    """One line: how many unreadable images, the first one named, and the command to list them."""
    first = problems[0]
    more = f" and {len(problems) - 1} more" if len(problems) > 1 else ""
    return (f"unreadable image {first.path} ({first.reason}){more}; "
            f"run {CHECK_COMMAND} {where} to list them all, then remove or replace them")
