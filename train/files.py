"""Writing a file so that no reader ever sees half of it: staging name, then rename.

Every small state file of the project (metrics, caches, manifests, configs) goes through
``write_atomically``: a process killed mid-write leaves the previous version, never a torn one.
Folders (checkpoints, class folders, model exports) follow the same idea with their own
staging folders, where they are built. Also: reading such a JSON file back, and a lock file
for work that concurrent processes must do once.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from .errors import UserError

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Linux
    fcntl = None


def write_atomically(path: Path, data: str | bytes, fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` through a hidden staging file in the same folder, then rename.

    ``fsync`` also forces the bytes to disk before the rename (for files that must survive a
    power loss, such as the metrics of a long run).
    """
    path = Path(path)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: concurrent writers never share one
    try:
        with open(staging, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
    return path


def write_json(path: Path, value, fsync: bool = False) -> Path:
    return write_atomically(path, json.dumps(value, indent=1), fsync=fsync)


def read_json(path: Path, what: str):
    """The JSON value in ``path``; when it cannot be read or parsed, a one-line error calling it ``what``."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: cannot read the {what} ({exc})") from None


@contextlib.contextmanager
def exclusive_lock(path: Path):
    """Held by one process at a time, among all that open ``path`` (on Linux; elsewhere no lock)."""
    with open(path, "a") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_UN)
