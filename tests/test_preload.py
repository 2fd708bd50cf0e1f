"""``preload_local``: the node-local copy of a data set folder or shard set, its check by count
and size, its reuse, and a local disk that is too small. The same copy made for a real
two-process run is tested in test_seed_features.py."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from helpers import make_image_folder
from seed_format import write_seed_shards

from train.config import DataConfig, DataloaderConfig, PreprocessConfig, load_config
from train.data import build_loaders, preload
from train.data.folder import DataError
from train.errors import UserError


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture
def folder(tmp_path):
    root = make_image_folder(tmp_path / "shared" / "imagenet", classes=3, train_per_class=5, val_counts=(2, 2, 2),
                             size=24)
    (root / "classes.tsv").write_text("index\twnid\tnames\n0\tn00000000\ta\n1\tn00000001\tb\n2\tn00000002\tc\n")
    return root


@pytest.fixture
def local(tmp_path):
    """A stand-in for the node's $TMPDIR."""
    return tmp_path / "node-local"


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def copied(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "preload_local: copying" in r.getMessage()]


def test_a_folder_is_copied_whole_and_checked(folder, local, caplog):
    with caplog.at_level(logging.INFO, logger="train"):
        copy = preload.make_local_copy(folder, local)
    assert copy.parent == local / preload.LOCAL_FOLDER and copy.name.startswith("imagenet-")
    assert tree(copy) == tree(folder)  # every file, the class table included
    assert copied(caplog) == [f"preload_local: copying 22 file(s), 0.00 GiB, of {folder} to {copy} with 16 threads"]
    assert any(f"training reads {copy}, the local copy of {folder} (22 files" in r.getMessage()
               for r in caplog.records)
    # Progress lines without a terminal: the last says 100%.
    assert [m for m in (r.getMessage() for r in caplog.records) if "preload_local: 100%" in m]


def test_a_second_job_on_the_node_reuses_the_copy_and_copies_only_what_is_missing(folder, local, caplog):
    copy = preload.make_local_copy(folder, local)
    caplog.clear()  # what the first copy logged, if the logger let it through
    with caplog.at_level(logging.INFO, logger="train"):
        assert preload.make_local_copy(folder, local) == copy
    assert copied(caplog) == [] and "nothing to copy" in caplog.text
    # An interrupted copy: one file gone, one cut short, and a file the source no longer has.
    gone = copy / "train" / "n00000001" / "img_0003.JPEG"
    gone.unlink()
    short = copy / "val" / "n00000002" / "img_0000.JPEG"
    short.write_bytes(short.read_bytes()[:50])
    stale = copy / "train" / "n00000000" / "removed.JPEG"
    stale.write_bytes(b"old")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="train"):
        preload.make_local_copy(folder, local)
    assert copied(caplog) == [f"preload_local: copying 2 file(s), 0.00 GiB, of {folder} to {copy} with 16 threads"]
    assert tree(copy) == tree(folder)


def test_the_copy_is_checked_by_count_and_size_before_use(folder, local, monkeypatch):
    real_copy = preload.shutil.copy2

    def short_copy(src, dst):  # a copy that silently loses the end of one file
        real_copy(src, dst)
        if str(dst).endswith("img_0002.JPEG") and "n00000001" in str(dst) and "train" in str(dst):
            Path(dst).write_bytes(Path(dst).read_bytes()[:-10])

    monkeypatch.setattr(preload.shutil, "copy2", short_copy)
    with pytest.raises(DataError) as error:
        preload.make_local_copy(folder, local)
    message = str(error.value)
    assert len(message.splitlines()) == 1 and "is not complete" in message
    assert f"train{os.sep}n00000001{os.sep}img_0002.JPEG has" in message and "bytes instead of" in message
    copy = preload.local_copy_path(folder, local)
    with pytest.raises(DataError, match="did not finish it"):  # the node's other processes do not use it
        preload.find_local_copy(folder, local)
    monkeypatch.setattr(preload.shutil, "copy2", real_copy)
    assert preload.make_local_copy(folder, local) == copy  # the next attempt repairs it
    assert preload.find_local_copy(folder, local) == copy


def test_too_little_local_space_stops_before_copying(folder, local, monkeypatch):
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    monkeypatch.setattr(preload, "free_bytes", lambda path: preload.RESERVE_BYTES + size - 1)
    with pytest.raises(DataError) as error:
        preload.make_local_copy(folder, local)
    message = str(error.value)
    assert len(message.splitlines()) == 1
    assert message.startswith(f"train.preprocess.preload_local: {local} has 1.00 GiB free, but the copy of {folder} "
                              "needs 0.00 GiB more") and "TMPDIR" in message
    assert not list(preload.local_copy_path(folder, local).rglob("*.JPEG"))  # nothing was copied
    monkeypatch.setattr(preload, "free_bytes", lambda path: preload.RESERVE_BYTES + size)
    preload.make_local_copy(folder, local)


def test_shards_are_copied_and_load_from_the_copy(folder, local, tmp_path):
    shards = write_seed_shards(folder, tmp_path / "shared" / "imagenet-1k-wds")
    copy = preload.make_local_copy(shards, local)
    assert tree(copy) == tree(shards)
    data = DataConfig(data_dir=str(copy), num_classes=3, dataloader=DataloaderConfig(name="dali", num_data_workers=1))
    built = build_loaders(data, PreprocessConfig(train_crop_size=16, val_image_size=20, val_crop_size=16), 3, 1, 0,
                          seed=0)
    assert built.num_train == 15 and sum(len(labels) for _, labels in built.val) == 6


def test_the_copy_goes_to_tmpdir(monkeypatch, tmp_path):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "scratch"))
    assert preload.local_root() == tmp_path / "scratch"


def test_a_hub_data_set_cannot_be_preloaded(tmp_path):
    data = tmp_path / "d.toml"
    data.write_text('data_dir = "hf-hub:ILSVRC/imagenet-1k"\n[dataloader]\nname = "hf"\n')
    train = tmp_path / "t.toml"
    train.write_text("[preprocess]\npreload_local = true\n")
    with pytest.raises(UserError, match="preload_local = true copies a folder, but data.data_dir = "
                                        "'hf-hub:ILSVRC/imagenet-1k' is a Hub data set"):
        load_config(data, train)
