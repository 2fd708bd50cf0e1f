"""The data set commands: the folder-to-shards converter and the check command."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
from helpers import make_image_folder

from train.data.folder import scan_image_folder
from train.data.shards import MANIFEST, index_path, iter_shard_samples, open_shard_set
from train.dataset_tools import check, convert


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture
def folder(tmp_path):
    return make_image_folder(tmp_path / "imagenet", classes=3, train_per_class=7, val_counts=(3, 2, 4), size=24)


def shard_contents(dst: Path, split: str) -> list[tuple[bytes, int]]:
    shard_set = open_shard_set(dst, 3)
    return [(image, label) for shard in shard_set.split(split) for _, image, label in iter_shard_samples(shard)]


def folder_contents(root: Path, split: str) -> list[tuple[bytes, int]]:
    train, val = scan_image_folder(root, 3)
    files = train if split == "train" else val
    return [(Path(path).read_bytes(), label) for path, label in zip(files.paths, files.labels)]


# -------------------------------------------------------------------------- converter


def test_conversion_round_trip_keeps_every_sample_and_label(folder, tmp_path, capsys):
    dst = tmp_path / "shards"
    assert convert.main([str(folder), str(dst), "--shards", "3", "--workers", "2"]) == 0
    assert "3 train shards (21 images), 1 val shards (9 images), 3 classes" in capsys.readouterr().out
    for split in ("train", "val"):
        stored = shard_contents(dst, split)
        assert sorted(stored) == sorted(folder_contents(folder, split))  # same bytes, same labels
    train_labels = [label for _, label in shard_contents(dst, "train")]
    assert train_labels != sorted(train_labels)
    manifest = json.loads((dst / MANIFEST).read_text())
    assert manifest["class_names"] == ["n00000000", "n00000001", "n00000002"]
    assert manifest["samples"] == {"train": 21, "val": 9} and manifest["skipped"] == []
    assert [s["samples"] for s in manifest["splits"]["train"]] == [7, 7, 7]
    # Each index names the archive's members at their offsets, as DALI's wds2idx would.
    with tarfile.open(dst / "train-00000.tar") as tar:
        members = {m.name: (m.offset_data, m.size) for m in tar}
    lines = index_path(dst / "train-00000.tar").read_text().splitlines()
    assert lines[0] == "v1.2 7"
    for line in lines[1:]:
        fields = line.split()
        for ext, offset, size, name in zip(fields[::4], fields[1::4], fields[2::4], fields[3::4]):
            assert members[name] == (int(offset), int(size)) and name.endswith("." + ext)


def test_an_interrupted_conversion_resumes_with_the_missing_shards(folder, tmp_path):
    dst = tmp_path / "shards"
    convert.convert(folder, dst, 3, 1, workers=1, seed=0, progress=False)
    manifest = (dst / MANIFEST).read_text()
    # As if stopped while writing the second shard: no manifest, that shard half-written.
    (dst / MANIFEST).unlink()
    index_path(dst / "train-00001.tar").unlink()
    (dst / "train-00001.tar").rename(dst / "train-00001.tar.partial")
    kept = {p.name: p.stat().st_mtime_ns for p in dst.glob("*-0000[02].*")}
    convert.convert(folder, dst, 3, 1, workers=1, seed=0, progress=False)
    assert (dst / MANIFEST).read_text() == manifest
    assert {p.name: p.stat().st_mtime_ns for p in dst.glob("*-0000[02].*")} == kept  # not rewritten
    assert (dst / "train-00001.tar").exists() and not (dst / "train-00001.tar.partial").exists()


def test_another_conversion_into_the_same_folder_is_refused(folder, tmp_path, capsys):
    dst = tmp_path / "shards"
    convert.convert(folder, dst, 3, 1, workers=1, seed=0, progress=False)
    assert convert.main([str(folder), str(dst), "--shards", "2", "--workers", "1"]) == 2
    assert "holds shards of another conversion" in capsys.readouterr().err


def test_converter_leaves_out_and_lists_images_it_cannot_decode(folder, tmp_path, capsys):
    bad = folder / "train" / "n00000001" / "img_0003.JPEG"
    bad.write_bytes(bad.read_bytes()[:200])
    dst = tmp_path / "shards"
    assert convert.main([str(folder), str(dst), "--shards", "2", "--workers", "1"]) == 1
    err = capsys.readouterr().err
    assert f"{bad}: truncated image" in err
    manifest = json.loads((dst / MANIFEST).read_text())
    assert manifest["samples"]["train"] == 20 and manifest["skipped"][0]["path"] == str(bad)
    assert len(shard_contents(dst, "train")) == 20


# ----------------------------------------------------------------------- check command


def test_check_counts_images_per_class_of_a_clean_folder(folder, capsys):
    assert check.main([str(folder), "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "n00000000         7         3" in out and "n00000002         7         4" in out
    assert "total            21         9" in out and "no problems found" in out


def test_check_lists_every_unreadable_image_of_a_folder(folder, capsys):
    truncated = folder / "train" / "n00000000" / "img_0001.JPEG"
    truncated.write_bytes(truncated.read_bytes()[:150])
    empty = folder / "val" / "n00000001" / "img_0000.JPEG"
    empty.write_bytes(b"")
    not_image = folder / "train" / "n00000002" / "saved_page.JPEG"
    not_image.write_text("<html>not found</html>")
    ignored = folder / "train" / "n00000002" / "notes.txt"
    ignored.write_text("a note")
    assert check.main([str(folder), "--workers", "2"]) == 1
    out = capsys.readouterr().out
    assert f"unreadable: {truncated}: truncated image" in out
    assert f"unreadable: {empty}: empty file (0 bytes)" in out
    assert f"unreadable: {not_image}: not an image" in out
    assert f"note: {ignored} is not read by the loaders" in out
    assert "3 problem(s) found" in out


def test_check_reports_a_shard_set_and_its_stale_index(folder, tmp_path, capsys):
    dst = tmp_path / "shards"
    convert.convert(folder, dst, 3, 1, workers=1, seed=0, progress=False)
    assert check.main([str(dst), "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "n00000001         7         2" in out and "no problems found" in out
    index = index_path(dst / "train-00002.tar")
    index.write_text(index.read_text().replace("v1.2 7", "v1.2 6"))
    assert check.main([str(dst)]) == 1
    out = capsys.readouterr().out
    assert f"shard: {index} is stale: it lists 6 samples but the manifest says 7" in out


def test_check_of_a_missing_folder_is_a_usage_error(tmp_path, capsys):
    assert check.main([str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err
