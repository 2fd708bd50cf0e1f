"""Image verification on a cluster: one process of the job checks the files (the others wait
and share its verdict), and a file system without locks does not stop it."""

from __future__ import annotations

import errno

import pytest
from helpers import data_toml, make_image_folder, tiny_train_toml, write
from test_preemption import launch

from train import files
from train.data import verify
from train.data.verify import default_cache_file, verify_files


def dali_configs(tmp, folder) -> list[str]:
    data = write(tmp / "data.toml", data_toml(folder, workers=1).replace('"hf"', '"dali"'))
    train = write(tmp / "train.toml", tiny_train_toml(max_epochs=1))
    return ["--data-cfg", str(data), "--train-cfg", str(train), "--output-dir", str(tmp / "run")]


def test_only_the_main_process_checks_the_files_and_a_bad_one_stops_both(tmp_path):
    folder = make_image_folder(tmp_path / "imagenet")
    bad = folder / "train" / "n00000001" / "img_0003.JPEG"
    good = bad.read_bytes()
    bad.write_bytes(good[: len(good) // 2])  # truncated
    checks, stderr = tmp_path / "checks", []
    checks.mkdir()
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "RECORD_FILE_CHECKS": str(checks)}
    assert launch(dali_configs(tmp_path, folder), tmp_path / "status", stderr_lines=stderr, **env) == [2, 2]
    errors = [line for line in stderr if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: unreadable image {bad} (truncated"), stderr[-10:]

    bad.write_bytes(good)
    assert launch(dali_configs(tmp_path, folder), tmp_path / "status", **env) == [0, 0]
    assert sorted(p.name for p in checks.iterdir()) == ["rank0"]  # process 1 never looked at a file


@pytest.mark.parametrize("code", [errno.ENOSYS, errno.EOPNOTSUPP])
def test_a_file_system_without_locks_verifies_without_one(tmp_path, monkeypatch, caplog, code):
    class NoLocks:
        LOCK_EX, LOCK_UN = 2, 8

        @staticmethod
        def flock(file, operation):
            raise OSError(code, "Function not implemented")

    monkeypatch.setattr(files, "fcntl", NoLocks)
    root = make_image_folder(tmp_path / "d", classes=2, train_per_class=2, val_counts=(1, 1))
    paths = sorted(str(p) for p in root.rglob("*.JPEG"))
    decoded = []
    with caplog.at_level("WARNING", logger="train"):
        assert verify_files(paths, root, default_cache_file(root), 1, on_start=decoded.append) == []
    assert "does not support file locks" in caplog.text
    assert verify_files(paths, root, default_cache_file(root), 1, on_start=decoded.append) == []
    assert decoded == [len(paths)]  # cached as usual


def test_other_lock_failures_are_not_hidden(tmp_path, monkeypatch):
    class Broken:
        LOCK_EX, LOCK_UN = 2, 8

        @staticmethod
        def flock(file, operation):
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(files, "fcntl", Broken)
    root = make_image_folder(tmp_path / "d", classes=1, train_per_class=1, val_counts=(1,))
    with pytest.raises(OSError, match="Input/output error"):
        verify_files(sorted(str(p) for p in root.rglob("*.JPEG")), root, default_cache_file(root), 1)


def test_stats_in_parallel_blocks_see_every_change(tmp_path, monkeypatch):
    monkeypatch.setattr(verify, "STAT_BLOCK", 2)  # many blocks on a small folder
    root = make_image_folder(tmp_path / "d", classes=3, train_per_class=3, val_counts=(1, 1, 1))
    paths = sorted(str(p) for p in root.rglob("*.JPEG"))
    assert verify._signatures(paths) == [verify._signature(p) for p in paths]
    decoded = []
    verify_files(paths, root, default_cache_file(root), 2, on_start=decoded.append)
    with open(paths[7], "ab") as f:
        f.write(b"\0")  # a changed file is verified again
    verify_files(paths, root, default_cache_file(root), 2, on_start=decoded.append)
    assert decoded == [len(paths), 1]
