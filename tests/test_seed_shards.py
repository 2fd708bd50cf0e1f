"""The seed project's own WebDataset shards, read as they are: detection, binary labels, the
manifests, the check command, and each kind of damage. The DALI loader's batches, shuffling,
sharding, exact validation and mid-epoch restore on these shards are tested with the other
formats in test_dali.py (its ``dataset`` fixture)."""

from __future__ import annotations

import io
import json
import logging
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from helpers import REPO, clean_env, make_image_folder
from seed_format import write_seed_shards

from train.config import DataConfig, DataloaderConfig, PreprocessConfig, load_config
from train.data import build_loaders, seed_shards
from train.data.folder import DataError, scan_image_folder
from train.data.shards import is_shard_set, iter_shard_samples, open_shard_set
from train.dataset_tools import check


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("seed") / "imagenet", classes=3, train_per_class=7,
                             val_counts=(3, 2, 4), size=24)


@pytest.fixture(scope="module")
def seed_shard_set(folder, tmp_path_factory):
    return write_seed_shards(folder, tmp_path_factory.mktemp("seed-shards") / "imagenet-1k-wds")


@pytest.fixture
def shards(seed_shard_set, tmp_path):
    """A copy to damage."""
    import shutil
    return Path(shutil.copytree(seed_shard_set, tmp_path / "imagenet-1k-wds"))


def folder_contents(root: Path, split: str) -> list[tuple[bytes, int]]:
    train, val = scan_image_folder(root, 3)
    files = train if split == "train" else val
    return [(Path(path).read_bytes(), label) for path, label in zip(files.paths, files.labels)]


def rewrite_shard(tar_path: Path, change) -> None:
    """Rewrite one archive with ``change(name, payload) -> payload`` applied, then index it again."""
    with tarfile.open(tar_path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(tar_path, "w") as tar:
        for name, payload in members:
            payload = change(name, payload)
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    subprocess.run([sys.executable, "-m", "wds2idx", str(tar_path), f"{tar_path}.idx"], check=True,
                   capture_output=True)


# ------------------------------------------------------------------------------- reading


def test_the_seeds_shards_are_detected_and_every_sample_keeps_its_binary_label(folder, seed_shard_set):
    assert is_shard_set(seed_shard_set) and seed_shards.is_seed_shard_set(seed_shard_set)
    assert not seed_shards.is_seed_shard_set(folder)
    shard_set = open_shard_set(seed_shard_set, 3)
    assert shard_set.class_names == ("0", "1", "2")  # the seed's shards name no classes
    assert [s.tar.name for s in shard_set.train] == [f"train-shard-{i:06d}.tar" for i in range(3)]
    assert [s.index.name for s in shard_set.val] == ["val-shard-000000.tar.idx", "val-shard-000001.tar.idx"]
    assert (shard_set.num_samples("train"), shard_set.num_samples("val")) == (21, 9)
    for split in ("train", "val"):
        stored = [(image, label) for shard in shard_set.split(split) for _, image, label in iter_shard_samples(shard)]
        assert sorted(stored) == sorted(folder_contents(folder, split))  # same bytes, labels from the int64


def test_the_data_config_for_the_seeds_shards_is_the_seeds():
    config = load_config(REPO / "configs/data/imagenet-1k-wds.toml", REPO / "configs/train/resnet50-sgd.toml")
    assert config.data.data_dir == "./data/imagenet-1k-wds" and config.data.num_classes == 1000
    assert (config.data.dataloader.name, config.data.dataloader.num_data_workers) == ("dali", 8)


def test_a_label_that_is_not_eight_bytes_is_not_taken_for_a_class():
    assert seed_shards.decode_label(struct.pack("<q", 999)) == 999
    assert seed_shards.decode_label(b"7") is None


def test_the_hf_loader_refuses_the_seeds_shards_with_a_clear_error(seed_shard_set):
    data = DataConfig(data_dir=str(seed_shard_set), num_classes=3, dataloader=DataloaderConfig(name="hf"))
    with pytest.raises(DataError, match="holds WebDataset shards, which only"):
        build_loaders(data, PreprocessConfig(), 4, 1, 0, seed=0)


def test_a_shard_missing_against_the_manifest_is_a_one_line_error(shards):
    (shards / "train-shard-000001.tar").unlink()
    (shards / "train-shard-000001.tar.idx").unlink()
    with pytest.raises(DataError) as error:
        open_shard_set(shards, 3)
    message = str(error.value)
    assert len(message.splitlines()) == 1
    assert "train_manifest.json lists 3 shards but" in message and "holds 2 train-shard-*.tar" in message


def test_a_missing_index_names_the_command_that_makes_it(shards):
    tar = shards / "val-shard-000001.tar"
    Path(f"{tar}.idx").unlink()
    with pytest.raises(DataError, match=f"{tar}.idx is missing: .* make it with wds2idx {tar} {tar}.idx"):
        open_shard_set(shards, 3)


def test_images_the_seeds_converter_skipped_are_a_note_not_an_error(shards, caplog):
    manifest = shards / "train_manifest.json"
    manifest.write_text(json.dumps({"split": "train", "num_shards": 3, "total_samples": 22}))
    with caplog.at_level(logging.INFO, logger="train"):
        assert open_shard_set(shards, 3).num_samples("train") == 21
    assert "the seed's converter skipped 1 image(s)" in caplog.text
    manifest.write_text(json.dumps({"split": "train", "num_shards": 3, "total_samples": 20}))
    with pytest.raises(DataError, match="counts 20 samples but the index files list 21"):
        open_shard_set(shards, 3)


# ------------------------------------------------------------------------- the check command


def test_the_check_command_counts_the_seeds_shards_per_class(seed_shard_set):
    # As a user runs it, under its original name.
    result = subprocess.run([sys.executable, "-m", "train.data.check", str(seed_shard_set), "--workers", "2"],
                            cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "0             7         3" in lines and "2             7         4" in lines
    assert "total        21         9" in lines
    assert "no problems found" in result.stdout and "name no classes" in result.stdout


def test_the_check_command_lists_damage_in_the_seeds_shards(shards, capsys):
    rewrite_shard(shards / "train-shard-000002.tar",
                  lambda name, payload: payload[:100] if name == "00000003.jpg" else
                  struct.pack("<q", 5) if name == "00000004.cls" else payload)
    missing_index = shards / "val-shard-000000.tar"
    Path(f"{missing_index}.idx").unlink()
    assert check.main([str(shards), "--workers", "2", "--num-classes", "3"]) == 1
    out = capsys.readouterr().out
    assert f"unreadable: {shards / 'train-shard-000002.tar'}:00000003: truncated image" in out
    assert f"unreadable: {shards / 'train-shard-000002.tar'}:00000004: missing or invalid .cls " \
           "(class index 0..2 expected)" in out
    assert f"shard: {missing_index}.idx is missing" in out and "wds2idx" in out
    assert "3 problem(s) found" in out
