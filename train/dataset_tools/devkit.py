"""The ILSVRC2012 development kit: class list, readable names and validation ground truth.

``ILSVRC2012_devkit_t12.tar.gz`` (or the folder it unpacks to) holds

- ``data/meta.mat``: the ``synsets`` table. Its 1,000 leaves (``num_children == 0``,
  ``ILSVRC2012_ID`` 1..1000) are the classes; each has a ``WNID`` (the training tar and
  folder name), ``words`` (readable names) and ``num_train_images``.
- ``data/ILSVRC2012_validation_ground_truth.txt``: line i is the ``ILSVRC2012_ID`` of
  ``ILSVRC2012_val_<i, 8 digits>.JPEG``.

Class indices follow the sorted WNIDs (the folder order the loaders and every public
ImageNet model use), not the devkit's ``ILSVRC2012_ID`` order.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io
import torch

from ..errors import UserError
from ..files import write_atomically

DEVKIT_FOLDER = "ILSVRC2012_devkit_t12"
DEVKIT_ARCHIVE = f"{DEVKIT_FOLDER}.tar.gz"
META = "data/meta.mat"
GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
META_FIELDS = ("ILSVRC2012_ID", "WNID", "words", "num_children", "num_train_images")
TORCHVISION_META = "meta.bin"  # what torchvision.datasets.ImageNet reads from the data folder


class DevkitError(UserError):
    pass


@dataclass(frozen=True)
class Devkit:
    wnids: tuple[str, ...]  # sorted: position = class index
    names: dict[str, str]  # wnid -> readable names ("tench, Tinca tinca")
    train_counts: dict[str, int]  # wnid -> number of training images
    val_wnids: tuple[str, ...]  # class of validation image i + 1

    @property
    def num_train(self) -> int:
        return sum(self.train_counts.values())

    def digest(self) -> str:
        """Identifies the class list and ground truth, to tell two devkits apart."""
        text = "\n".join(self.wnids) + "\0" + "\n".join(self.val_wnids)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_devkit(source: Path) -> Devkit:
    """Parse the devkit from its ``.tar.gz`` or from the folder it was unpacked to."""
    if not source.exists():
        raise DevkitError(f"{source}: no such file; download {DEVKIT_ARCHIVE} from image-net.org "
                          "(ILSVRC2012, 'Development kit (Task 1 & 2)')")
    if source.is_dir():
        files = _files_from_folder(source)
    else:
        files = _files_from_archive(source)
    return _parse(source, files[META], files[GROUND_TRUTH])


def _another_year(source: Path, found: str) -> DevkitError:
    return DevkitError(f"{source} is not the ILSVRC2012 task 1&2 devkit (it holds {found}); "
                       f"use {DEVKIT_ARCHIVE} from the ILSVRC2012 downloads")


def _files_from_folder(folder: Path) -> dict[str, bytes]:
    # Either the devkit folder itself or a folder that contains it.
    root = folder / DEVKIT_FOLDER if (folder / DEVKIT_FOLDER).is_dir() else folder
    files = {}
    for name in (META, GROUND_TRUTH):
        if not (root / name).is_file():
            found = ", ".join(sorted(p.name for p in root.iterdir())[:6]) or "nothing"
            if root.name != DEVKIT_FOLDER:
                raise _another_year(folder, found)
            raise DevkitError(f"{root}: missing {name}; unpack {DEVKIT_ARCHIVE} again")
        files[name] = (root / name).read_bytes()
    return files


def _files_from_archive(archive: Path) -> dict[str, bytes]:
    wanted = {f"{DEVKIT_FOLDER}/{name}": name for name in (META, GROUND_TRUTH)}
    files = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            tops = set()
            for member in tar:
                tops.add(member.name.split("/")[0])
                if member.name in wanted and member.isfile():
                    files[wanted[member.name]] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DevkitError(f"{archive} is damaged or truncated ({exc.__class__.__name__}: {exc}); "
                          f"download {DEVKIT_ARCHIVE} again") from None
    if DEVKIT_FOLDER not in tops:
        raise _another_year(archive, ", ".join(sorted(tops)[:4]) or "no files")
    missing = [name for name in (META, GROUND_TRUTH) if name not in files]
    if missing:
        raise DevkitError(f"{archive} has no {DEVKIT_FOLDER}/{missing[0]}: the archive is incomplete; "
                          "download it again")
    return files


def _parse(source: Path, meta_bytes: bytes, truth_bytes: bytes) -> Devkit:
    try:
        synsets = scipy.io.loadmat(io.BytesIO(meta_bytes), squeeze_me=True)["synsets"]
    except Exception as exc:  # scipy raises several types for a damaged .mat file
        raise DevkitError(f"{source}: cannot read {META} ({exc.__class__.__name__}: {exc}); "
                          "download the devkit again") from None
    synsets = np.atleast_1d(synsets)
    fields = synsets.dtype.names or ()
    missing = [name for name in META_FIELDS if name not in fields]
    if missing:
        raise DevkitError(f"{source}: {META} has no field {missing[0]} (fields: {', '.join(fields)}); "
                          f"this is not the ILSVRC2012 devkit; use {DEVKIT_ARCHIVE}")
    by_id: dict[int, str] = {}
    names: dict[str, str] = {}
    counts: dict[str, int] = {}
    for synset in synsets:
        if int(synset["num_children"]) != 0:
            continue  # an inner node of the WordNet tree, not a class
        wnid = str(synset["WNID"])
        by_id[int(synset["ILSVRC2012_ID"])] = wnid
        names[wnid] = " ".join(str(synset["words"]).split())  # no tabs or line breaks
        counts[wnid] = int(synset["num_train_images"])
    if not by_id:
        raise DevkitError(f"{source}: {META} lists no leaf classes")

    val_wnids = []
    for number, line in enumerate(truth_bytes.decode("ascii", errors="replace").splitlines(), start=1):
        try:
            val_wnids.append(by_id[int(line)])
        except (ValueError, KeyError):
            raise DevkitError(f"{source}: {GROUND_TRUTH} line {number}: {line!r} is not a class id "
                              f"between 1 and {len(by_id)}") from None
    if not val_wnids:
        raise DevkitError(f"{source}: {GROUND_TRUTH} is empty")
    return Devkit(tuple(sorted(names)), names, counts, tuple(val_wnids))


def write_torchvision_meta(devkit: Devkit, folder: Path) -> Path:
    """``meta.bin`` as ``torchvision.datasets.ImageNet`` writes it, so it can read the folder too."""
    wnid_to_classes = {wnid: tuple(devkit.names[wnid].split(", ")) for wnid in devkit.wnids}
    buffer = io.BytesIO()
    torch.save((wnid_to_classes, list(devkit.val_wnids)), buffer)
    return write_atomically(folder / TORCHVISION_META, buffer.getvalue())
