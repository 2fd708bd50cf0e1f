"""The ImageNet folder layout: ``data_dir/{train,val}/<class>/<image>``.

Both loaders read their file lists from here, so the class index of a folder (its position
among the sorted folder names) is the same whichever loader serves it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
# Written by python -m train.data.prepare into the folder it fills; "complete" turns true
# only after the finished layout has been checked.
PREPARE_STATE = ".prepare.json"


class DataError(UserError):
    pass


@dataclass(frozen=True)
class FolderSplit:
    root: Path
    class_names: tuple[str, ...]
    paths: tuple[str, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.paths)


def _class_folders(split_dir: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(split_dir)
                  if entry.is_dir() and not entry.name.startswith("."))


def _images_in(folder: Path) -> list[str]:
    return sorted(entry.path for entry in os.scandir(folder)
                  if entry.is_file() and not entry.name.startswith(".")
                  and entry.name.lower().endswith(IMAGE_EXTENSIONS))


def scan_split(data_dir: Path, split: str) -> FolderSplit:
    split_dir = data_dir / split
    if not split_dir.is_dir():
        raise DataError(f"data.data_dir: {data_dir} has no '{split}/' folder "
                        f"(expected {split}/<class>/<image> as in the ImageNet layout)")
    class_names = _class_folders(split_dir)
    if not class_names:
        raise DataError(f"data.data_dir: {split_dir} holds no class folders")
    paths: list[str] = []
    labels: list[int] = []
    for index, name in enumerate(class_names):
        images = _images_in(split_dir / name)
        if not images:
            raise DataError(f"data.data_dir: class folder {split_dir / name} holds no images "
                            f"({', '.join(IMAGE_EXTENSIONS)})")
        paths.extend(images)
        labels.extend([index] * len(images))
    return FolderSplit(split_dir, tuple(class_names), tuple(paths), tuple(labels))


def preparation_finished(data_dir: Path) -> bool:
    """False while the prepare command is still (or was last) filling the folder."""
    state = data_dir / PREPARE_STATE
    if not state.is_file():
        return True  # not made by the prepare command: nothing to say
    try:
        return bool(json.loads(state.read_text(encoding="utf-8")).get("complete"))
    except (ValueError, AttributeError):
        return False


def scan_image_folder(data_dir: str | Path, num_classes: int) -> tuple[FolderSplit, FolderSplit]:
    """The train and val file lists of an ImageNet-layout folder, checked for consistency."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data.data_dir: folder {data_dir} does not exist")
    if not preparation_finished(data_dir):
        raise DataError(f"data.data_dir: {data_dir} is not ready: python -m train.data.prepare has not "
                        "finished filling it; re-run that command to complete it")
    train, val = scan_split(data_dir, "train"), scan_split(data_dir, "val")
    if train.class_names != val.class_names:
        only_train = sorted(set(train.class_names) - set(val.class_names))
        only_val = sorted(set(val.class_names) - set(train.class_names))
        parts = []
        if only_train:
            parts.append(f"only in train/: {', '.join(only_train[:5])}{' ...' if len(only_train) > 5 else ''}")
        if only_val:
            parts.append(f"only in val/: {', '.join(only_val[:5])}{' ...' if len(only_val) > 5 else ''}")
        raise DataError(f"data.data_dir: {data_dir} has different class folders in train/ and val/ "
                        f"({'; '.join(parts)})")
    if len(train.class_names) != num_classes:
        raise DataError(f"data.num_classes = {num_classes} but {data_dir} has {len(train.class_names)} "
                        "class folders; set data.num_classes to match")
    return train, val
