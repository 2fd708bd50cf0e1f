"""Writing a file so that no reader ever sees half of it: staging name, then rename.

Every small state file of the project (metrics, caches, manifests, configs) goes through
``write_atomically``: a process killed mid-write leaves the previous version, never a torn one.
Folders (checkpoints, class folders, model exports) follow the same idea with their own
staging folders, where they are built. Also: reading such a JSON file back, a lock file for
work that concurrent processes must do once, and where files go (for messages about a full disk).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
from pathlib import Path

from .errors import UserError

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Linux
    fcntl = None

LOG = logging.getLogger("train")


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


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def filesystem_of(path: Path) -> str:
    """The mount point that holds ``path``, with its type where Linux tells it: '/scratch (lustre)'."""
    mount = _nearest_existing(path).resolve()
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    try:
        with open("/proc/mounts", encoding="utf-8") as f:
            types = {fields[1]: fields[2] for fields in (line.split() for line in f) if len(fields) > 2}
    except OSError:  # not Linux
        types = {}
    return f"{mount} ({types[str(mount)]})" if str(mount) in types else str(mount)


def free_bytes(path: Path) -> int:
    """Free space for this user on the file system of ``path`` (or of its nearest existing parent)."""
    return shutil.disk_usage(_nearest_existing(path)).free


def tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def read_json(path: Path, what: str):
    """The JSON value in ``path``; when it cannot be read or parsed, a one-line error calling it ``what``."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: cannot read the {what} ({exc})") from None


# What flock raises on a file system that cannot lock (some Lustre and NFS mounts).
LOCKS_UNSUPPORTED = frozenset({errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK})


@contextlib.contextmanager
def exclusive_lock(path: Path, without_lock: str):
    """Held by one process at a time, among all that open ``path``. Where the file system cannot
    lock, a warning saying ``without_lock`` (what may then happen twice), and no lock; off Linux, no lock."""
    with open(path, "a") as lock:
        held = _lock(lock, path, without_lock)
        try:
            yield
        finally:
            if held:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _lock(lock, path: Path, without_lock: str) -> bool:
    """Take ``lock`` (blocking); False where it cannot be taken, after saying so."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
    except OSError as exc:
        if exc.errno not in LOCKS_UNSUPPORTED:
            raise
        LOG.warning(f"warning: the file system of {path.parent} does not support file locks ({exc.strerror}); "
                    f"going on without one ({without_lock})")
        return False
    return True
