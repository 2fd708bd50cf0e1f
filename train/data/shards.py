"""WebDataset shards: ``train-NNNNN.tar`` and ``val-NNNNN.tar``, each with a DALI index file.

This module reads them (the converter in ``train.dataset_tools`` writes them). A shard holds
one ``<key>.jpg`` (the original file's bytes, whatever its format) and one
``<key>.cls`` (the class index as ASCII digits, the WebDataset convention) per sample. Next to
each ``.tar`` lies its ``.idx``, the index DALI's webdataset reader needs to find samples
without scanning the archive at every start. ``manifest.json`` records the class names, so the
class index of a sample means the same as in the folder it was converted from, their readable
names when the folder had a class table (``class_descriptions``, absent otherwise), and the
sample count of every shard.

Shards made by other tools work too: without a manifest the classes are named "0", "1", ...
and the counts are read from the index files. The seed project's shards
(``train-shard-NNNNNN.tar``, binary labels; ``seed_shards.py``) are read as they are.
"""

from __future__ import annotations

import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

from ..files import read_json
from . import seed_shards
from .folder import DataError
from .verify import CHECK_COMMAND

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
SPLITS = ("train", "val")
INDEX_VERSION = "v1.2"  # the index format of DALI's wds2idx
TAR_BLOCK = 512
TAIL_BYTES = 65536  # enough for the last line of an index
ASCII_LABELS = "ascii"  # how a ``.cls`` component holds the class index (the seed's: seed_shards.LABEL_ENCODING)
_SHARD_NAME = re.compile(r"^(train|val)-(\d+)\.tar$")


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.tar"


def index_path(tar_path: Path) -> Path:
    return tar_path.with_suffix(".idx")


def is_shard_set(root: Path) -> bool:
    """True when ``root`` holds ``train-*.tar`` shards, the converter's or the seed's (rather
    than an ImageNet-layout folder)."""
    return (root.is_dir() and any(_SHARD_NAME.match(p.name) for p in root.glob("train-*.tar"))) \
        or seed_shards.is_seed_shard_set(root)


# ------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Shard:
    tar: Path
    index: Path
    samples: int
    label_encoding: str = ASCII_LABELS


@dataclass(frozen=True)
class ShardSet:
    root: Path
    class_names: tuple[str, ...]
    train: tuple[Shard, ...]
    val: tuple[Shard, ...]
    # Readable name per class (from the source folder's class table); () when unknown.
    class_descriptions: tuple[str, ...] = ()
    label_encoding: str = ASCII_LABELS

    def split(self, name: str) -> tuple[Shard, ...]:
        return self.train if name == "train" else self.val

    def num_samples(self, split: str) -> int:
        return sum(shard.samples for shard in self.split(split))


def read_manifest(root: Path) -> dict | None:
    path = root / MANIFEST
    if not path.exists():
        return None
    manifest = read_json(path, "shard manifest")
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        raise DataError(f"{path}: not a manifest of this version ({MANIFEST_VERSION}); "
                        "convert the folder again with python -m train.data.convert")
    return manifest


def _index_entries(index: Path) -> tuple[int, list[str]]:
    """The sample count of an index file and its first and last sample lines (read from
    the ends of the file: ImageNet's indices hold a million lines)."""
    with open(index, "rb") as f:
        header = f.readline().decode("utf-8", errors="replace").split()
        first = f.readline().decode("utf-8", errors="replace")
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - TAIL_BYTES))
        tail = [line for line in f.read().decode("utf-8", errors="replace").splitlines() if line.strip()]
    if len(header) != 2 or header[0] != INDEX_VERSION or not header[1].isdigit():
        raise DataError(f"{index}: not a DALI index file (first line should be '{INDEX_VERSION} <samples>'); "
                        f"rebuild it, and run {CHECK_COMMAND} on the shard folder")
    return int(header[1]), [first, tail[-1] if tail else first]


def _components(line: str) -> list[tuple[int, int]]:
    """(data offset, size) of each component of an index line: 'ext offset size name ...'."""
    fields = line.split()
    if not fields or len(fields) % 4:
        raise ValueError(line)
    return [(int(fields[i + 1]), int(fields[i + 2])) for i in range(0, len(fields), 4)]


def check_index(tar: Path, index: Path, expected_samples: int | None = None, remedy: str = "") -> int:
    """Confirm that ``index`` exists and describes ``tar`` as it is now; returns the sample count.

    A stale index (the archive was rewritten after it) makes DALI read garbage at wrong
    offsets. So the sample count must match the manifest's, and the first and last entries
    must each point just past a tar header whose size field matches. (Modification times
    prove nothing here: a plain ``cp -r`` gives the index, copied first, the older one.)
    """
    hint = f"run {CHECK_COMMAND} {tar.parent}"
    if not index.exists():
        remedy = remedy or "convert again (python -m train.data.convert resumes)"
        raise DataError(f"{index} is missing: shard {tar.name} has no DALI index file; {remedy} or {hint}")
    count, lines = _index_entries(index)
    if expected_samples is not None and count != expected_samples:
        raise DataError(f"{index} is stale: it lists {count} samples but the manifest says {expected_samples}; {hint}")
    tar_size = tar.stat().st_size
    with open(tar, "rb") as archive:
        for line in lines:
            try:
                components = _components(line)
            except ValueError:
                raise DataError(f"{index}: malformed line {line.strip()[:80]!r}; {hint}") from None
            for offset, size in components:
                if offset < TAR_BLOCK or offset + size > tar_size:
                    raise DataError(f"{index} is stale: it points past the end of {tar.name}; {hint}")
                archive.seek(offset - TAR_BLOCK)
                if not _header_size_is(archive.read(TAR_BLOCK), size):
                    raise DataError(f"{index} is stale: its offsets do not match {tar.name}; {hint}")
    return count


def _header_size_is(header: bytes, size: int) -> bool:
    if len(header) != TAR_BLOCK or header[257:262] != b"ustar":
        return False
    try:
        return int(header[124:136].strip(b"\0 ") or b"0", 8) == size
    except ValueError:
        return False


def open_shard_set(root: str | Path, num_classes: int) -> ShardSet:
    """The shards of ``root``, every index checked against its archive."""
    root = Path(root)
    if seed_shards.is_seed_shard_set(root):
        return open_seed_shard_set(root, num_classes)
    manifest = read_manifest(root)
    descriptions: tuple[str, ...] = ()
    if manifest is not None:
        class_names = tuple(manifest["class_names"])
        if len(class_names) != num_classes:
            raise DataError(f"data.num_classes = {num_classes} but {root / MANIFEST} lists {len(class_names)} "
                            "classes; set data.num_classes to match")
        descriptions = _manifest_descriptions(manifest, root)
    else:
        class_names = tuple(str(i) for i in range(num_classes))
    splits = {}
    for split in SPLITS:
        tars = sorted(root.glob(f"{split}-*.tar"), key=lambda p: p.name)
        tars = [t for t in tars if _SHARD_NAME.match(t.name)]
        if not tars:
            raise DataError(f"data.data_dir: {root} has no {split}-*.tar shards")
        listed = {s["name"]: s["samples"] for s in manifest["splits"][split]} if manifest else {}
        if manifest is not None:
            missing = sorted(set(listed) - {t.name for t in tars})
            if missing:
                raise DataError(f"data.data_dir: shard {root / missing[0]} listed in {MANIFEST} is missing "
                                f"({len(missing)} missing); convert again (python -m train.data.convert resumes)")
        shards = []
        for tar in tars:
            count = check_index(tar, index_path(tar), listed.get(tar.name))
            shards.append(Shard(tar, index_path(tar), count))
        splits[split] = tuple(shards)
    return ShardSet(root, class_names, splits["train"], splits["val"], descriptions)


def open_seed_shard_set(root: Path, num_classes: int) -> ShardSet:
    """The seed's shards of ``root``: every index checked, the counts against its manifests."""
    splits = {}
    for split in SPLITS:
        tars = seed_shards.split_tars(root, split)
        if not tars:
            raise DataError(f"data.data_dir: {root} has no {split}-shard-*.tar shards")
        shards = tuple(Shard(tar, seed_shards.index_path(tar),
                             check_index(tar, seed_shards.index_path(tar), remedy=seed_shards.index_remedy(tar)),
                             seed_shards.LABEL_ENCODING) for tar in tars)
        problem = seed_shards.manifest_problem(root, split, len(tars), sum(s.samples for s in shards))
        if problem:
            raise DataError(f"data.data_dir: {problem}")
        splits[split] = shards
    # The seed's shards name no classes: they are numbered, as many as data.num_classes says.
    return ShardSet(root, tuple(str(i) for i in range(num_classes)), splits["train"], splits["val"],
                    label_encoding=seed_shards.LABEL_ENCODING)


def _manifest_descriptions(manifest: dict, root: Path) -> tuple[str, ...]:
    """The manifest's readable class names, parallel to its class names; () in manifests
    written before they were recorded, or from a folder without a class table."""
    descriptions = manifest.get("class_descriptions", [])
    if not (isinstance(descriptions, list) and all(isinstance(d, str) for d in descriptions)
            and len(descriptions) in (0, len(manifest["class_names"]))):
        raise DataError(f"{root / MANIFEST}: class_descriptions must be a list of {len(manifest['class_names'])} "
                        "strings, one per class; convert the folder again with python -m train.data.convert")
    return tuple(descriptions)


def iter_shard_samples(shard: Shard):
    """``(sample name, image bytes, label)`` for each sample of a shard, in stored order.

    A sample's components are consecutive members, so the archive is streamed, not loaded.
    """
    key, parts = None, {}
    with tarfile.open(shard.tar, "r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            dot = member.name.find(".", member.name.rfind("/") + 1)
            if dot < 0:
                continue
            member_key, extension = member.name[:dot], member.name[dot + 1:]
            if member_key != key:
                if key is not None:
                    yield _sample(shard, key, parts)
                key, parts = member_key, {}
            parts[extension] = tar.extractfile(member).read()
    if key is not None:
        yield _sample(shard, key, parts)


def _sample(shard: Shard, key: str, parts: dict[str, bytes]) -> tuple[str, bytes | None, int | None]:
    label = parts.get("cls")
    return f"{shard.tar}:{key}", parts.get("jpg"), None if label is None else _parse_label(label, shard.label_encoding)


def _parse_label(raw: bytes, encoding: str = ASCII_LABELS) -> int | None:
    if encoding == seed_shards.LABEL_ENCODING:
        return seed_shards.decode_label(raw)
    text = raw.decode("ascii", errors="replace").strip()
    return int(text) if text.isdigit() else None
