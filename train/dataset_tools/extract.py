"""The units of work of ImageNet preparation: one training class, one batch of validation images.

Each function is self-contained and safe to run in parallel threads (file reads and writes
release the GIL, and that is where the time goes). None leaves a half-written result under
its final name: a class is written to ``train/.<wnid>.partial`` and renamed when its image
count is right; a validation image is written to a temporary name and renamed.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

COPY_BLOCK = 1 << 20


@dataclass(frozen=True)
class ClassJob:
    """Produce ``dest_root/<wnid>`` from a class tar (a region of a file) or a class folder."""
    wnid: str
    source: Path  # the file holding the class tar, or the class folder
    offset: int = 0  # where the class tar starts in `source` (0 for a tar file of its own)
    size: int = 0  # its length in bytes
    is_folder: bool = False
    expected: int = 0  # training images of this class, from the devkit
    link: bool = False  # symlink a class folder instead of copying it


@dataclass(frozen=True)
class ValItem:
    name: str  # ILSVRC2012_val_00000001.JPEG
    wnid: str
    source: Path  # the validation tar, or the image file itself
    size: int  # bytes
    in_tar: bool = False
    offset: int = 0  # where the image's bytes start in the tar


@dataclass
class Result:
    images: int = 0
    bytes_written: int = 0
    problems: list[str] = field(default_factory=list)


class _Region(io.RawIOBase):
    """Bytes [offset, offset + size) of a file, read as a file of their own.

    A class tar inside the training archive is read through this, so a damaged class tar
    can never run on into its neighbour's bytes.
    """

    def __init__(self, path: Path, offset: int, size: int):
        super().__init__()
        self._file = open(path, "rb")
        self._offset, self._size, self._pos = offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        count = max(0, min(len(buffer), self._size - self._pos))
        if count == 0:
            return 0
        self._file.seek(self._offset + self._pos)
        got = self._file.readinto(memoryview(buffer)[:count])
        self._pos += got
        return got

    def close(self) -> None:
        self._file.close()
        super().close()


def count_images(folder: Path) -> int:
    """Regular, non-hidden files in a folder (following a symlinked folder)."""
    return sum(1 for entry in os.scandir(folder) if entry.is_file() and not entry.name.startswith("."))


def member_file_name(name: str) -> str | None:
    """The file name a tar member is written under, or None when it is not a plain file name."""
    name = name[2:] if name.startswith("./") else name
    if not name or "/" in name or "\\" in name or name.startswith("."):
        return None
    return name


def extract_class(job: ClassJob, dest_root: Path) -> Result:
    final = dest_root / job.wnid
    partial = dest_root / f".{job.wnid}.partial"
    result = Result()
    if job.is_folder and job.link:
        result.images = count_images(job.source)
        if result.images != job.expected:
            result.problems.append(f"{job.source}: {result.images} images, the devkit lists {job.expected}")
        else:
            os.symlink(job.source.resolve(), final, target_is_directory=True)
        return result

    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir()
    if job.is_folder:
        _copy_folder(job.source, partial, result)
    else:
        _unpack_class_tar(job, partial, result)
    if not result.problems and result.images != job.expected:
        where = job.source if job.is_folder else f"{job.source} (class tar {job.wnid}.tar)"
        result.problems.append(f"{where}: {result.images} images, the devkit lists {job.expected}")
    if result.problems:
        shutil.rmtree(partial)
    else:
        partial.rename(final)
    return result


def _copy_folder(source: Path, partial: Path, result: Result) -> None:
    for entry in os.scandir(source):
        if entry.is_file() and not entry.name.startswith("."):
            shutil.copyfile(entry.path, partial / entry.name)
            result.images += 1
            result.bytes_written += entry.stat().st_size


def _unpack_class_tar(job: ClassJob, partial: Path, result: Result) -> None:
    where = f"{job.source} (class tar {job.wnid}.tar)" if job.offset else str(job.source)
    try:
        with io.BufferedReader(_Region(job.source, job.offset, job.size), COPY_BLOCK) as region, \
                tarfile.open(fileobj=region, mode="r:") as tar:
            for member in tar:
                if member.isdir():
                    continue
                name = member_file_name(member.name)
                if name is None or not member.isfile():
                    result.problems.append(f"{where}: unexpected member {member.name!r} (plain image files expected)")
                    return
                with tar.extractfile(member) as data, open(partial / name, "wb") as out:
                    shutil.copyfileobj(data, out, COPY_BLOCK)
                result.images += 1
                result.bytes_written += member.size
    except (tarfile.TarError, EOFError) as exc:
        result.problems.append(f"{where} is damaged or truncated ({exc}); download the archive again")


def place_val_images(items: list[ValItem], dest_root: Path, link: bool) -> Result:
    """Put each validation image into ``dest_root/<wnid>/``; images already in place are kept."""
    result = Result()
    open_tars: dict[Path, io.BufferedReader] = {}
    try:
        for item in items:
            folder = dest_root / item.wnid
            final = folder / item.name
            if link and not item.in_tar:
                target = item.source.resolve()
                if final.is_symlink() and Path(os.readlink(final)) == target:
                    result.images += 1
                    continue
                folder.mkdir(exist_ok=True)
                staging = folder / f".{item.name}.tmp"
                staging.unlink(missing_ok=True)
                os.symlink(target, staging)
                os.replace(staging, final)
                result.images += 1
                continue
            if final.is_file() and not final.is_symlink() and final.stat().st_size == item.size:
                result.images += 1  # written by an earlier, interrupted run
                continue
            folder.mkdir(exist_ok=True)
            staging = folder / f".{item.name}.tmp"
            if item.in_tar:
                if item.source not in open_tars:
                    open_tars[item.source] = open(item.source, "rb")
                tar = open_tars[item.source]
                tar.seek(item.offset)
                data = tar.read(item.size)
                if len(data) != item.size:
                    result.problems.append(f"{item.source} is truncated inside {item.name}; download it again")
                    continue
                staging.write_bytes(data)
            else:
                shutil.copyfile(item.source, staging)
            os.replace(staging, final)
            result.images += 1
            result.bytes_written += item.size
    finally:
        for handle in open_tars.values():
            handle.close()
    return result
