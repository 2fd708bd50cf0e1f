"""Miniature ILSVRC2012 downloads with the official structure, for the prepare command's tests.

- ILSVRC2012_img_train.tar: a tar of <wnid>.tar, each a flat tar of <wnid>_<n>.JPEG
- ILSVRC2012_img_val.tar: ILSVRC2012_val_<8 digits>.JPEG, flat
- ILSVRC2012_devkit_t12.tar.gz: ILSVRC2012_devkit_t12/data/meta.mat (a ``synsets`` struct
  array with the devkit's fields, an inner WordNet node included) and
  data/ILSVRC2012_validation_ground_truth.txt (one ILSVRC2012_ID per validation image)

The devkit's ILSVRC2012_IDs are deliberately not in WNID order, as in the real one.
"""

from __future__ import annotations

import io
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

# wnid, readable names, ILSVRC2012_ID, training images
CLASSES = (
    ("n01440764", "tench, Tinca tinca", 3, 3),
    ("n01443537", "goldfish, Carassius auratus", 1, 4),
    ("n01484850", "great white shark, white shark, Carcharodon carcharias", 4, 2),
    ("n01491361", "tiger shark, Galeocerdo cuvieri", 2, 3),
)
INNER_NODE = ("n00000001", "fish", 1001)
VAL_IDS = (2, 4, 1, 3, 3, 1, 4, 2)  # ground truth: validation image i+1 is class VAL_IDS[i]
WNID_BY_ID = {ilsvrc_id: wnid for wnid, _, ilsvrc_id, _ in CLASSES}


@dataclass
class Downloads:
    folder: Path
    train_images: dict[str, dict[str, bytes]]  # wnid -> file name -> bytes
    val_images: dict[str, bytes]  # file name -> bytes
    wnid_by_id: dict[int, str]
    val_ids: tuple[int, ...]

    @property
    def train_tar(self) -> Path:
        return self.folder / "ILSVRC2012_img_train.tar"

    @property
    def val_tar(self) -> Path:
        return self.folder / "ILSVRC2012_img_val.tar"

    @property
    def devkit(self) -> Path:
        return self.folder / "ILSVRC2012_devkit_t12.tar.gz"

    def val_wnid(self, name: str) -> str:
        return self.wnid_by_id[self.val_ids[int(name[-13:-5]) - 1]]


def jpeg(rng: random.Random) -> bytes:
    image = Image.new("RGB", (12, 10), tuple(rng.randrange(256) for _ in range(3)))
    image.putpixel((rng.randrange(12), rng.randrange(10)), (255, 255, 255))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return buffer.getvalue()


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def tar_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in files.items():
            add_bytes(tar, name, data)
    return buffer.getvalue()


def meta_mat(classes=CLASSES, inner_node=INNER_NODE, fields=None) -> bytes:
    """A ``synsets`` struct array as in the devkit's data/meta.mat."""
    fields = fields or ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children",
                        "wordnet_height", "num_train_images")
    rows = [(ilsvrc_id, wnid, words, f"a {words.split(',')[0]}", 0, np.zeros((1, 0)), 0, count)
            for wnid, words, ilsvrc_id, count in classes]
    if inner_node:
        wnid, words, ilsvrc_id = inner_node
        children = np.array([[c[2] for c in classes]], dtype=np.float64)
        rows.append((ilsvrc_id, wnid, words, "a group", len(classes), children, 1, 0))
    full = ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height", "num_train_images")
    synsets = np.zeros((len(rows), 1), dtype=[(name, object) for name in fields])
    for i, row in enumerate(rows):
        for name, value in zip(full, row):
            if name in fields:
                synsets[i, 0][name] = value
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, {"synsets": synsets})
    return buffer.getvalue()


def devkit_tar_gz(path: Path, top: str = "ILSVRC2012_devkit_t12", meta: bytes | None = None,
                  meta_name: str = "meta.mat", val_ids=VAL_IDS) -> Path:
    truth = "".join(f"{i}\n" for i in val_ids).encode()
    with tarfile.open(path, "w:gz") as tar:
        add_bytes(tar, f"{top}/readme.txt", b"development kit\n")
        add_bytes(tar, f"{top}/data/{meta_name}", meta if meta is not None else meta_mat())
        add_bytes(tar, f"{top}/data/ILSVRC2012_validation_ground_truth.txt", truth)
    return path


def make_downloads(folder: Path, seed: int = 0, classes=CLASSES, val_ids=VAL_IDS, image=jpeg) -> Downloads:
    """The three files under their official names in ``folder``. ``image(rng)`` makes each
    image's bytes (the benchmark passes larger ones)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    train_images = {wnid: {f"{wnid}_{k}.JPEG": image(rng) for k in range(count)} for wnid, _, _, count in classes}
    val_images = {f"ILSVRC2012_val_{i + 1:08d}.JPEG": image(rng) for i in range(len(val_ids))}
    downloads = Downloads(folder, train_images, val_images, {c[2]: c[0] for c in classes}, tuple(val_ids))
    with tarfile.open(downloads.train_tar, "w", format=tarfile.GNU_FORMAT) as outer:
        for wnid, images in train_images.items():
            add_bytes(outer, f"{wnid}.tar", tar_bytes(images))
    downloads.val_tar.write_bytes(tar_bytes(val_images))
    devkit_tar_gz(downloads.devkit, meta=meta_mat(classes), val_ids=val_ids)
    return downloads


def extract_downloads(downloads: Downloads, folder: Path, class_tars: bool = False) -> tuple[Path, Path, Path]:
    """The three sources as a user who extracted them by hand has them: train as class folders
    (or as the 1,000 class tars), val flat, the devkit folder."""
    train, val = folder / "train", folder / "val"
    train.mkdir(parents=True)
    val.mkdir()
    for wnid, images in downloads.train_images.items():
        if class_tars:
            (train / f"{wnid}.tar").write_bytes(tar_bytes(images))
            continue
        (train / wnid).mkdir()
        for name, data in images.items():
            (train / wnid / name).write_bytes(data)
    for name, data in downloads.val_images.items():
        (val / name).write_bytes(data)
    with tarfile.open(downloads.devkit) as tar:
        tar.extractall(folder, filter="data")
    return train, val, folder / "ILSVRC2012_devkit_t12"
