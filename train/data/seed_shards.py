"""The seed project's own WebDataset shards, read as they are (no conversion).

The seed's converter writes ``train-shard-NNNNNN.tar`` and ``val-shard-NNNNNN.tar``; each
sample is ``<key>.jpg`` (the original file's bytes), ``<key>.cls`` (the class index as an
8-byte little-endian int64, binary) and ``<key>.json`` (metadata, not read here). Next to
each archive lies the DALI index that ``wds2idx`` made, ``<name>.tar.idx``. Per split,
``<split>_manifest.json`` records ``num_shards`` and ``total_samples``; there are no class
names, so classes are numbered and their count comes from ``data.num_classes``.

``shards.py`` assembles these into the same ``ShardSet`` as the converter's shards; this
module knows only the seed's names, manifests and label encoding.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from ..files import read_json
from .folder import DataError

LOG = logging.getLogger("train")

LABEL_ENCODING = "int64"  # ``.cls`` holds struct.pack("<q", label)
LABEL_BYTES = 8
TAR_NAME = re.compile(r"^(train|val)-shard-(\d+)\.tar$")
INDEX_COMMAND = "wds2idx"  # DALI's tool, installed with it; the seed's converter runs it


def is_seed_shard_set(root: Path) -> bool:
    """True when ``root`` holds the seed's ``train-shard-*.tar`` archives."""
    return root.is_dir() and any(TAR_NAME.match(p.name) for p in root.glob("train-shard-*.tar"))


def split_tars(root: Path, split: str) -> list[Path]:
    """The archives of one split, in shard order."""
    return sorted((p for p in root.glob(f"{split}-shard-*.tar") if TAR_NAME.match(p.name)), key=lambda p: p.name)


def index_path(tar: Path) -> Path:
    """``wds2idx``'s index as the seed names it (``<name>.tar.idx``), or ``<name>.idx`` when
    only that one exists."""
    seed_name = tar.with_name(tar.name + ".idx")
    other = tar.with_suffix(".idx")
    return other if not seed_name.exists() and other.exists() else seed_name


def index_remedy(tar: Path) -> str:
    return f"make it with {INDEX_COMMAND} {tar} {tar}.idx"


def manifest_path(root: Path, split: str) -> Path:
    return root / f"{split}_manifest.json"


def read_manifest(root: Path, split: str) -> dict | None:
    """``<split>_manifest.json`` (``num_shards``, ``total_samples``), or None when absent."""
    path = manifest_path(root, split)
    if not path.exists():
        return None
    manifest = read_json(path, "shard manifest")
    if not (isinstance(manifest, dict) and isinstance(manifest.get("num_shards"), int)
            and isinstance(manifest.get("total_samples"), int)):
        raise DataError(f"{path}: expected the seed's manifest with integer 'num_shards' and 'total_samples'")
    return manifest


def manifest_problem(root: Path, split: str, num_tars: int, num_samples: int) -> str | None:
    """What the split's archives lack against its manifest, or None when they agree.

    The seed's converter counts every image it found in ``total_samples``, also one it then
    skipped as unreadable, so fewer samples than that is a note (logged), not a problem.
    """
    manifest = read_manifest(root, split)
    if manifest is None:
        return None
    path = manifest_path(root, split)
    if num_tars != manifest["num_shards"]:
        return (f"{path} lists {manifest['num_shards']} shards but {root} holds {num_tars} "
                f"{split}-shard-*.tar files; copy the missing ones")
    if num_samples > manifest["total_samples"]:
        return (f"{path} counts {manifest['total_samples']} samples but the index files list {num_samples}; "
                "an archive or its index was replaced: rebuild the index files")
    if num_samples < manifest["total_samples"]:
        LOG.info(f"note: {split} shards of {root} hold {num_samples} samples, {path.name} counts "
                 f"{manifest['total_samples']}: the seed's converter skipped "
                 f"{manifest['total_samples'] - num_samples} image(s) it could not read")
    return None


def decode_label(raw: bytes) -> int | None:
    """The class index of a ``.cls`` component, or None when it is not 8 bytes."""
    if len(raw) != LABEL_BYTES:
        return None
    return int.from_bytes(raw, "little", signed=True)
