"""python -m train.data.prepare archives/check: miniature official archives -> the seed's layout.

The archives come from tests/imagenet_archives.py: same structure as the real downloads
(a tar of class tars, a flat validation tar, the devkit with meta.mat and ground truth),
four classes instead of 1,000.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torchvision
from helpers import REPO
from imagenet_archives import (
    CLASSES,
    VAL_IDS,
    WNID_BY_ID,
    devkit_tar_gz,
    extract_downloads,
    make_downloads,
    meta_mat,
    tar_bytes,
)

import train.dataset_tools.extract as extract
import train.dataset_tools.imagenet as imagenet
from train.data.classes import read_class_table
from train.data.folder import DataError, scan_image_folder
from train.dataset_tools.prepare import EXIT_INCOMPLETE, EXIT_INTERRUPTED, EXIT_USER_ERROR, main

WNIDS = sorted(c[0] for c in CLASSES)


@pytest.fixture
def downloads(tmp_path):
    return make_downloads(tmp_path / "downloads")


def prepare(*args) -> int:
    return main(["archives", *map(str, args), "--workers", "2"])


def assert_layout(out: Path, downloads) -> None:
    """Every training image in its class folder, every validation image in the class the
    ground truth gives it, byte for byte; nothing else."""
    wnids = sorted(downloads.train_images)
    for wnid in wnids:
        folder = out / "train" / wnid
        assert sorted(os.listdir(folder)) == sorted(downloads.train_images[wnid])
        for name, data in downloads.train_images[wnid].items():
            assert (folder / name).read_bytes() == data
    placed = {}
    for wnid in wnids:
        for name in os.listdir(out / "val" / wnid):
            placed[name] = wnid
            assert (out / "val" / wnid / name).read_bytes() == downloads.val_images[name]
    assert placed == {name: downloads.val_wnid(name) for name in downloads.val_images}
    assert sorted(p.name for p in (out / "train").iterdir()) == wnids


def state(out: Path) -> dict:
    return json.loads((out / ".prepare.json").read_text())


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# ------------------------------------------------------------------------ the finished layout


def test_archives_become_the_seed_layout_that_trainer_and_torchvision_read(downloads, tmp_path, capsys):
    out = tmp_path / "data" / "Imagenet"
    assert prepare(downloads.folder, "--output", out) == 0
    assert_layout(out, downloads)
    assert (out / "dev" / "ILSVRC2012_devkit_t12" / "data" / "meta.mat").is_file()
    assert state(out)["complete"] is True
    assert "train images: 12 of 12   val images: 8 of 8" in capsys.readouterr().out

    # Class table: sorted-wnid index order (the loaders' order), the devkit's readable names.
    assert list(read_class_table(out)) == WNIDS
    assert read_class_table(out)["n01443537"] == "goldfish, Carassius auratus"
    lines = (out / "classes.tsv").read_text().splitlines()
    assert lines[0] == "index\twnid\tnames" and lines[1] == "0\tn01440764\ttench, Tinca tinca"

    # torchvision's ImageNet reads meta.bin and the folders: names and labels as the devkit says.
    val = torchvision.datasets.ImageNet(str(out), split="val")
    assert val.wnids == WNIDS
    assert val.classes[WNIDS.index("n01491361")] == ("tiger shark", "Galeocerdo cuvieri")
    labels = {Path(path).name: WNIDS[label] for path, label in val.samples}
    assert labels == {f"ILSVRC2012_val_{i + 1:08d}.JPEG": WNID_BY_ID[VAL_IDS[i]] for i in range(len(VAL_IDS))}

    # The trainer's loaders accept it.
    train_split, val_split = scan_image_folder(out, len(CLASSES))
    assert (len(train_split), len(val_split)) == (12, 8)

    assert main(["check", str(out)]) == 0


def test_rerun_of_a_finished_folder_writes_nothing(downloads, tmp_path, capsys):
    out = tmp_path / "out"
    assert prepare(downloads.folder, "--output", out) == 0
    files = sorted(p for p in out.rglob("*.JPEG"))
    before = {p: p.stat().st_ino for p in files}
    capsys.readouterr()
    assert prepare(downloads.folder, "--output", out) == 0
    assert "4 of 4 classes already done" in capsys.readouterr().out
    assert {p: p.stat().st_ino for p in files} == before


def test_extracted_folders_can_be_symlinked_or_copied(downloads, tmp_path):
    train, val, devkit = extract_downloads(downloads, tmp_path / "extracted")
    linked = tmp_path / "linked"
    assert prepare("--train", train, "--val", val, "--devkit", devkit, "--output", linked, "--link") == 0
    assert_layout(linked, downloads)
    assert all((linked / "train" / wnid).is_symlink() for wnid in WNIDS)
    assert all(p.is_symlink() for p in (linked / "val").rglob("*.JPEG"))
    assert (linked / "dev" / "ILSVRC2012_devkit_t12").is_symlink()
    assert main(["check", str(linked)]) == 0

    copied = tmp_path / "copied"
    assert prepare("--train", train, "--val", val, "--devkit", devkit, "--output", copied) == 0
    assert_layout(copied, downloads)
    assert not any(p.is_symlink() for p in copied.rglob("*"))

    # Only the outer training tar extracted (a folder of the 1,000 class tars).
    class_tars, _, _ = extract_downloads(downloads, tmp_path / "class-tars", class_tars=True)
    from_tars = tmp_path / "from-tars"
    assert prepare("--train", class_tars, "--val", downloads.val_tar, "--devkit", downloads.devkit,
                   "--output", from_tars) == 0
    assert_layout(from_tars, downloads)


# ------------------------------------------------------------------------ interruption and resumption


def test_interrupted_run_is_refused_by_the_trainer_and_resumes(downloads, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    calls = []
    real_extract = extract.extract_class

    def interrupted_after_two(job, dest_root):
        calls.append(job.wnid)
        if len(calls) > 2:
            raise KeyboardInterrupt  # what Ctrl-C does in the middle of the third class
        return real_extract(job, dest_root)

    monkeypatch.setattr(imagenet, "extract_class", interrupted_after_two)
    assert main(["archives", str(downloads.folder), "--output", str(out), "--workers", "1"]) == EXIT_INTERRUPTED
    assert "re-run the same command to resume" in capsys.readouterr().err
    done = [wnid for wnid in WNIDS if (out / "train" / wnid).is_dir()]
    assert done == calls[:2]
    assert state(out)["complete"] is False
    with pytest.raises(DataError, match="not ready: python -m train.data.prepare has not finished"):
        scan_image_folder(out, len(CLASSES))
    assert main(["check", str(out)]) == EXIT_INCOMPLETE
    assert f"{out / 'train' / calls[2]}: no such folder" in capsys.readouterr().out

    # A half-written class from a killed run, and a finished class that lost an image.
    (out / "train" / f".{calls[2]}.partial").mkdir()
    (out / "train" / f".{calls[2]}.partial" / "half.JPEG").write_bytes(b"\xff\xd8")
    damaged = out / "train" / done[1]
    next(damaged.iterdir()).unlink()
    kept = {p: p.stat().st_ino for p in (out / "train" / done[0]).iterdir()}

    monkeypatch.setattr(imagenet, "extract_class", real_extract)
    capsys.readouterr()
    assert main(["archives", str(downloads.folder), "--output", str(out), "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert f"{damaged} is incomplete" in printed and "1 of 4 classes already done" in printed
    assert_layout(out, downloads)
    assert {p: p.stat().st_ino for p in (out / "train" / done[0]).iterdir()} == kept  # not written again
    assert not list((out / "train").glob(".*"))
    assert state(out)["complete"] is True
    scan_image_folder(out, len(CLASSES))


def test_disk_filling_up_midway_stops_with_one_line_and_resumes(downloads, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    real_copy = extract.shutil.copyfileobj
    written = []

    def copy_until_full(source, target, length=0):
        if len(written) >= 5:
            raise OSError(28, "No space left on device", str(target.name))
        written.append(target)
        return real_copy(source, target, length)

    monkeypatch.setattr(extract.shutil, "copyfileobj", copy_until_full)
    assert main(["archives", str(downloads.folder), "--output", str(out), "--workers", "1"]) == EXIT_USER_ERROR
    assert "the disk filled up while writing" in one_error_line(capsys)
    assert state(out)["complete"] is False
    monkeypatch.setattr(extract.shutil, "copyfileobj", real_copy)
    assert prepare(downloads.folder, "--output", out) == 0
    assert_layout(out, downloads)


# ------------------------------------------------------------------------ bad input


def test_too_little_free_space_is_refused_before_writing(downloads, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"

    class Usage:
        free = 1000  # bytes

    monkeypatch.setattr(imagenet.shutil, "disk_usage", lambda path: Usage)
    assert prepare(downloads.folder, "--output", out) == EXIT_USER_ERROR
    line = one_error_line(capsys)
    assert f"{out}: needs about" in line and "GB free" in line and "choose another --output" in line
    assert not out.exists()


def test_missing_archive_names_the_file(downloads, tmp_path, capsys):
    downloads.val_tar.unlink()
    assert prepare(downloads.folder, "--output", tmp_path / "out") == EXIT_USER_ERROR
    assert f"{downloads.folder}: no ILSVRC2012_img_val.tar" in one_error_line(capsys)
    assert prepare("--train", tmp_path / "nope.tar", "--output", tmp_path / "out") == EXIT_USER_ERROR
    assert "nope.tar: no such file or folder" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def test_truncated_training_archive_is_refused(downloads, tmp_path, capsys):
    out = tmp_path / "out"
    size = downloads.train_tar.stat().st_size
    truncate(downloads.train_tar, size // 2 + 100)  # inside a class tar
    assert prepare(downloads.folder, "--output", out) == EXIT_USER_ERROR
    line = one_error_line(capsys)
    assert str(downloads.train_tar) in line and "truncated" in line and "download it again" in line
    assert not out.exists()

    # Cut exactly after the second class tar: the archive looks whole but lacks classes.
    with tarfile.open(make_downloads(tmp_path / "again").train_tar) as tar:
        second = tar.getmembers()[1]
    again = tmp_path / "again"
    truncate(again / "ILSVRC2012_img_train.tar", second.offset_data + -(-second.size // 512) * 512)
    assert prepare(again, "--output", out) == EXIT_USER_ERROR
    line = one_error_line(capsys)
    assert "holds 2 of the 4 class tars the devkit lists (missing n01484850, n01491361)" in line
    assert not out.exists()


def test_truncated_validation_archive_and_devkit_are_refused(downloads, tmp_path, capsys):
    out = tmp_path / "out"
    with tarfile.open(downloads.val_tar) as tar:
        last = tar.getmembers()[-1]
    truncate(downloads.val_tar, last.offset_data + last.size // 2)  # inside the last image
    assert prepare(downloads.folder, "--output", out) == EXIT_USER_ERROR
    line = one_error_line(capsys)
    assert str(downloads.val_tar) in line and "truncated" in line and "download it again" in line

    fresh = make_downloads(tmp_path / "fresh")
    truncate(fresh.devkit, fresh.devkit.stat().st_size // 2)
    assert prepare(fresh.folder, "--output", out) == EXIT_USER_ERROR
    assert f"{fresh.devkit} is damaged or truncated" in one_error_line(capsys)
    assert not out.exists()


def test_devkit_of_another_year_is_refused(downloads, tmp_path, capsys):
    out = tmp_path / "out"
    downloads.devkit.unlink()
    devkit_tar_gz(downloads.devkit, top="ILSVRC2014_devkit", meta_name="meta_clsloc.mat")
    assert prepare(downloads.folder, "--output", out) == EXIT_USER_ERROR
    line = one_error_line(capsys)
    assert "is not the ILSVRC2012 task 1&2 devkit (it holds ILSVRC2014_devkit)" in line

    # Right folder name, but a meta.mat without the 2012 fields.
    downloads.devkit.unlink()
    devkit_tar_gz(downloads.devkit, meta=meta_mat(fields=("WNID", "words", "num_children")))
    assert prepare(downloads.folder, "--output", out) == EXIT_USER_ERROR
    assert "meta.mat has no field ILSVRC2012_ID" in one_error_line(capsys)
    assert not out.exists()


def test_foreign_or_mismatched_targets_are_refused(downloads, tmp_path, capsys):
    # A partial layout some other script left.
    out = tmp_path / "out"
    (out / "train" / "n01440764").mkdir(parents=True)
    assert prepare(downloads.folder, "--output", out) == EXIT_USER_ERROR
    assert "already holds train/ or val/ that this command did not write" in one_error_line(capsys)
    assert os.listdir(out) == ["train"]

    # A folder filled from another devkit (here: different ground truth).
    done = tmp_path / "done"
    assert prepare(downloads.folder, "--output", done) == 0
    other = make_downloads(tmp_path / "other")
    other.devkit.unlink()
    devkit_tar_gz(other.devkit, val_ids=VAL_IDS[1:] + VAL_IDS[:1])
    capsys.readouterr()
    assert prepare(other.folder, "--output", done) == EXIT_USER_ERROR
    assert "was filled from a different devkit" in one_error_line(capsys)
    assert prepare(downloads.folder, "--output", done, "--link") == EXIT_USER_ERROR
    assert "was filled without --link" in one_error_line(capsys)

    # An output path that is a file.
    (tmp_path / "a-file").write_text("x")
    assert prepare(downloads.folder, "--output", tmp_path / "a-file") == EXIT_USER_ERROR
    assert f"--output {tmp_path / 'a-file'} is a file" in one_error_line(capsys)

    # Output inside an extracted source.
    train, val, devkit = extract_downloads(downloads, tmp_path / "x")
    assert prepare("--train", train, "--val", val, "--devkit", devkit, "--output", train / "out") == EXIT_USER_ERROR
    assert "overlap" in one_error_line(capsys)


def test_archives_with_foreign_members_are_refused(downloads, tmp_path, capsys):
    downloads.val_tar.write_bytes(tar_bytes({**downloads.val_images, "notes.txt": b"x"}))
    assert prepare(downloads.folder, "--output", tmp_path / "out") == EXIT_USER_ERROR
    assert "holds 'notes.txt', which the devkit's ground truth does not cover" in one_error_line(capsys)

    fresh = make_downloads(tmp_path / "fresh")
    fresh.train_tar.write_bytes(tar_bytes({"n09999999.tar": tar_bytes({"a.JPEG": b"1"})}))
    assert prepare(fresh.folder, "--output", tmp_path / "out") == EXIT_USER_ERROR
    assert "holds 'n09999999.tar', which is not a class tar of the devkit" in one_error_line(capsys)


def test_class_tar_with_wrong_image_count_leaves_the_layout_incomplete(tmp_path, capsys):
    downloads = make_downloads(tmp_path / "downloads")
    images = dict(downloads.train_images)
    images["n01443537"] = dict(list(images["n01443537"].items())[:3])  # the devkit says 4
    downloads.train_tar.write_bytes(tar_bytes({f"{w}.tar": tar_bytes(files) for w, files in images.items()}))
    out = tmp_path / "out"
    assert prepare(downloads.folder, "--output", out) == EXIT_INCOMPLETE
    captured = capsys.readouterr()
    assert "(class tar n01443537.tar): 3 images, the devkit lists 4" in captured.out
    assert "is NOT complete" in captured.err
    assert not (out / "train" / "n01443537").exists()
    assert state(out)["complete"] is False


def test_check_reports_what_a_hand_made_layout_lacks(downloads, tmp_path, capsys):
    out = tmp_path / "out"
    assert prepare(downloads.folder, "--output", out) == 0
    (out / "val" / "n01440764" / "ILSVRC2012_val_00000004.JPEG").unlink()
    (out / "train" / "n09999999").mkdir()
    capsys.readouterr()
    assert main(["check", str(out)]) == EXIT_INCOMPLETE
    printed = capsys.readouterr().out
    assert f"{out / 'val' / 'n01440764'}: 1 images, expected 2" in printed
    assert "holds folders that are not devkit classes (n09999999)" in printed

    # A layout made by other means has no dev/ folder: the devkit is given explicitly.
    hand_made = tmp_path / "hand-made"
    hand_made.mkdir()
    (out / "train").rename(hand_made / "train")
    assert main(["check", str(hand_made)]) == EXIT_USER_ERROR
    assert "has no dev/ILSVRC2012_devkit_t12 to count against; pass --devkit" in one_error_line(capsys)
    assert main(["check", str(hand_made), "--devkit", str(downloads.devkit)]) == EXIT_INCOMPLETE
    assert f"{hand_made / 'val'}: no such folder" in capsys.readouterr().out


def test_command_line_exit_status_and_one_line_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "train.data.prepare", "archives", str(tmp_path / "none"),
                             "--output", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == EXIT_USER_ERROR
    assert result.stderr.strip() == f"error: {tmp_path / 'none'}: no such folder"


def default_signal_state() -> None:
    """In a child before it runs its program: nothing blocked, Ctrl-C's default action."""
    import signal
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_real_ctrl_c_and_sigkill_of_the_command_then_resume(tmp_path):
    """The command as a process: SIGINT mid-extraction exits 130 with the resume hint, SIGKILL
    leaves no class half-written under its final name, and the next run completes the layout."""
    import random
    import signal
    import time

    # Enough classes that the command is still extracting when the signal comes, even when this
    # test shares two cores with another pytest process (120 were not: it finished first).
    classes = [(f"n{20_000_000 + i:08d}", f"class {i}", i + 1, 12) for i in range(360)]
    val_ids = [i % len(classes) + 1 for i in range(720)]
    random.Random(1).shuffle(val_ids)
    downloads = make_downloads(tmp_path / "downloads", classes=classes, val_ids=val_ids,
                               image=lambda rng: rng.randbytes(40_000))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "train.data.prepare", "archives", str(downloads.folder), "--output", str(out),
               "--workers", "1"]

    def start_and_signal(sig) -> subprocess.CompletedProcess:
        # At the lowest priority (nice execs Python: the signals reach it), so that on two busy
        # cores this test's own polling is not starved while the command runs to its end.
        # With the default signal state, whatever an earlier test in this process left blocked.
        process = subprocess.Popen(["nice", "-n", "19", *command], cwd=REPO, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, preexec_fn=default_signal_state)
        started = time.monotonic()
        deadline = started + 120
        seen = 0
        while time.monotonic() < deadline and process.poll() is None:
            train = out / "train"
            seen = sum(1 for p in train.iterdir() if not p.name.startswith(".")) if train.is_dir() else 0
            if seen >= 3:
                break
            time.sleep(0.002)
        polled = (time.monotonic() - started, seen, process.poll())
        process.send_signal(sig)
        stdout, stderr = process.communicate(timeout=120)
        blocked = next(line for line in open("/proc/self/status") if line.startswith("SigBlk"))
        return subprocess.CompletedProcess(command, process.returncode, stdout,
                                           stderr + f"\n[polled (seconds, classes, exit) {polled}; here {blocked}]")

    interrupted = start_and_signal(signal.SIGINT)
    assert interrupted.returncode == EXIT_INTERRUPTED, interrupted.stderr
    assert "re-run the same command to resume" in interrupted.stderr
    assert state(out)["complete"] is False

    killed = start_and_signal(signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    assert state(out)["complete"] is False
    for folder in (out / "train").iterdir():  # every class under its final name is whole
        if not folder.name.startswith("."):
            assert len(os.listdir(folder)) == 12, folder

    finished = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert state(out)["complete"] is True
    assert_layout(out, downloads)
