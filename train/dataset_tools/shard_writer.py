"""Writing WebDataset shards in the format ``train.data.shards`` reads (the converter's half)."""

from __future__ import annotations

import io
import os
import re
import tarfile
from collections.abc import Iterable
from pathlib import Path

from ..data.folder import DataError
from ..data.shards import INDEX_VERSION, index_path
from ..files import write_atomically


def sample_key(position: int, class_name: str, file_name: str) -> str:
    """A key unique within the split that still names the original file.

    DALI splits a member name at its first dot into key and extension, so dots become '_'.
    """
    stem = os.path.splitext(file_name)[0]
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{position:08d}-{class_name}-{stem}")


def write_shard(tar_path: Path, samples: Iterable[tuple[str, bytes, int]]) -> int:
    """Write ``(key, image bytes, label)`` samples to ``tar_path`` and its index, atomically;
    returns the number of samples (no files are left when there are none).

    Both files are written under temporary names and renamed, the index last, so an
    interrupted conversion never leaves a shard that looks complete.
    """
    staging = tar_path.with_name(tar_path.name + ".partial")
    count = 0
    with tarfile.open(staging, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, data, label in samples:
            for extension, payload in (("jpg", data), ("cls", str(label).encode())):
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(payload)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(payload))
            count += 1
    if count == 0:
        staging.unlink()
        return 0
    index = index_text(staging)
    os.replace(staging, tar_path)
    write_atomically(index_path(tar_path), index)
    return count


def index_text(tar_path: Path) -> str:
    """The DALI index (format v1.2) of a tar archive: one line per sample, its components'
    extension, data offset, size and member name."""
    samples: list[list[str]] = []
    last_key = None
    with tarfile.open(tar_path, "r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = member.name.rsplit("/", 1)[-1]
            if base.startswith(".") or "." not in base:
                continue
            dot = member.name.find(".", member.name.rfind("/") + 1)
            key, extension = member.name[:dot], member.name[dot + 1:]
            entry = f"{extension} {member.offset_data} {member.size} {member.name}"
            if key != last_key:
                samples.append([entry])
                last_key = key
            else:
                samples[-1].append(entry)
    if not samples:
        raise DataError(f"{tar_path}: the archive holds no samples")
    return f"{INDEX_VERSION} {len(samples)}\n" + "".join(" ".join(s) + "\n" for s in samples)
