"""Turn the official ILSVRC2012 files into the training layout, and check a finished layout.

Sources: ``ILSVRC2012_img_train.tar`` (a tar of 1,000 ``<wnid>.tar``), ``ILSVRC2012_img_val.tar``
(50,000 images in one folder) and ``ILSVRC2012_devkit_t12.tar.gz``, or the folders they were
already extracted to. Result, under the output folder::

    train/<wnid>/*.JPEG       one folder per class
    val/<wnid>/*.JPEG         validation images sorted into classes by the devkit's ground truth
    dev/ILSVRC2012_devkit_t12 the devkit, unpacked
    meta.bin                  class names and validation labels as torchvision's ImageNet reads them
    classes.tsv               index, wnid, readable names (exported models use it)
    .prepare.json             "complete": true once the whole layout has been checked

Everything is planned and checked before the first byte is written: a truncated archive,
a devkit of another year or too little free space stops the command with one line. Classes
are written in parallel; a re-run skips finished classes after re-counting their images.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tarfile
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from ..data.classes import CLASS_TABLE, write_class_table
from ..data.folder import PREPARE_STATE
from ..errors import UserError
from ..files import write_json
from .devkit import DEVKIT_ARCHIVE, DEVKIT_FOLDER, META, TORCHVISION_META, Devkit, read_devkit, write_torchvision_meta
from .extract import ClassJob, Result, ValItem, count_images, extract_class, member_file_name, place_val_images

TRAIN_ARCHIVE = "ILSVRC2012_img_train.tar"
VAL_ARCHIVE = "ILSVRC2012_img_val.tar"
# What ILSVRC2012 has; a devkit describing anything else is reported, not refused.
OFFICIAL_CLASSES, OFFICIAL_TRAIN, OFFICIAL_VAL = 1000, 1_281_167, 50_000
VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.JPEG")
VAL_BATCH = 500  # validation images per unit of work
BLOCK = 4096  # file system block: each written file takes a whole number of them
STATE_FORMAT = 1


class PrepareError(UserError):
    pass


class Interrupted(Exception):
    """Ctrl-C during extraction; what was finished is kept."""


@dataclass(frozen=True)
class Sources:
    train: Path
    val: Path
    devkit: Path


def find_sources(archives: Path | None, train: Path | None, val: Path | None, devkit: Path | None) -> Sources:
    """The three sources: given explicitly, or found in ``archives`` under their official names
    (or as the folders they extract to)."""
    candidates = {
        "train": (TRAIN_ARCHIVE, "ILSVRC2012_img_train", "train"),
        "val": (VAL_ARCHIVE, "ILSVRC2012_img_val", "val"),
        "devkit": (DEVKIT_ARCHIVE, DEVKIT_FOLDER),
    }
    given = {"train": train, "val": val, "devkit": devkit}
    found = {}
    for role, names in candidates.items():
        if given[role] is not None:
            if not given[role].exists():
                raise PrepareError(f"--{role} {given[role]}: no such file or folder")
            found[role] = given[role]
            continue
        if archives is None:
            raise PrepareError(f"no source for the {role} data: pass a folder holding {names[0]} or --{role} PATH")
        if not archives.is_dir():
            raise PrepareError(f"{archives}: no such folder")
        present = [archives / name for name in names if (archives / name).exists()]
        if not present:
            extracted = " or ".join(n + "/" for n in names[1:])
            raise PrepareError(f"{archives}: no {names[0]} (nor an extracted {extracted}); "
                               f"download it from image-net.org (ILSVRC2012) or pass --{role} PATH")
        found[role] = present[0]
    return Sources(**found)


# ----------------------------------------------------------------------------- planning


def _tar_members(archive: Path) -> list[tarfile.TarInfo]:
    """The archive's members, refusing one whose data runs past the end of the file."""
    size = archive.stat().st_size
    try:
        with tarfile.open(archive, "r:") as tar:
            members = tar.getmembers()
    except (tarfile.TarError, EOFError) as exc:
        raise PrepareError(f"{archive} is damaged or truncated ({exc}); download it again") from None
    for member in members:
        if member.offset_data + member.size > size:
            raise PrepareError(f"{archive} is truncated: {member.name} should end at byte "
                               f"{member.offset_data + member.size:,} but the file has {size:,} bytes; "
                               "download it again")
    return members


def _missing(what: Path, kind: str, names: list[str], total: int) -> PrepareError:
    shown = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
    return PrepareError(f"{what} holds {total - len(names):,} of the {total:,} {kind} the devkit lists "
                        f"(missing {shown}); the download is incomplete: download it again")


def plan_train(source: Path, devkit: Devkit, link: bool) -> list[ClassJob]:
    """One job per class, from the training archive, a folder of class tars or of class folders."""
    jobs: dict[str, ClassJob] = {}
    if source.is_file():
        for member in _tar_members(source):
            wnid = member.name.removesuffix(".tar")
            if not member.isfile() or not member.name.endswith(".tar") or wnid not in devkit.train_counts:
                raise PrepareError(f"{source} holds {member.name!r}, which is not a class tar of the devkit "
                                   f"(<wnid>.tar); is this {TRAIN_ARCHIVE}?")
            jobs[wnid] = ClassJob(wnid, source, member.offset_data, member.size, expected=devkit.train_counts[wnid])
    else:
        for wnid in devkit.wnids:
            folder, tar = source / wnid, source / f"{wnid}.tar"
            if folder.is_dir():
                size = sum(_rounded(entry.stat().st_size) for entry in os.scandir(folder) if entry.is_file())
                jobs[wnid] = ClassJob(wnid, folder, 0, size, is_folder=True, expected=devkit.train_counts[wnid],
                                      link=link)
            elif tar.is_file():
                jobs[wnid] = ClassJob(wnid, tar, 0, tar.stat().st_size, expected=devkit.train_counts[wnid])
    missing = [wnid for wnid in devkit.wnids if wnid not in jobs]
    if missing:
        raise _missing(source, "class tars" if source.is_file() else "class folders or tars", missing,
                       len(devkit.wnids))
    return [jobs[wnid] for wnid in devkit.wnids]


def plan_val(source: Path, devkit: Devkit) -> list[ValItem]:
    """Every validation image with its class, from the validation archive or a folder of the images."""
    items: dict[int, ValItem] = {}

    def add(name: str, make) -> None:
        match = VAL_NAME.fullmatch(name)
        number = int(match.group(1)) if match else 0
        if not 1 <= number <= len(devkit.val_wnids):
            raise PrepareError(f"{source} holds {name!r}, which the devkit's ground truth does not cover "
                               f"(ILSVRC2012_val_00000001.JPEG .. {len(devkit.val_wnids):08d}); is this {VAL_ARCHIVE}?")
        items[number] = make(devkit.val_wnids[number - 1])

    if source.is_file():
        for member in _tar_members(source):
            name = member_file_name(member.name)
            if member.isdir():
                continue
            if name is None or not member.isfile():
                raise PrepareError(f"{source} holds {member.name!r}; {VAL_ARCHIVE} holds only image files")
            add(name, lambda wnid, m=member, n=name: ValItem(n, wnid, source, m.size, True, m.offset_data))
    else:
        # Flat (as extracted) or already sorted into class folders one level down.
        for path in sorted(source.glob("*.JPEG")) + sorted(source.glob("*/*.JPEG")):
            add(path.name, lambda wnid, p=path: ValItem(p.name, wnid, p, p.stat().st_size))
    missing = [f"ILSVRC2012_val_{n:08d}.JPEG" for n in range(1, len(devkit.val_wnids) + 1) if n not in items]
    if missing:
        raise _missing(source, "validation images", missing, len(devkit.val_wnids))
    return [items[n] for n in sorted(items)]


def _rounded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


# ----------------------------------------------------------------------------- the layout


@dataclass
class LayoutReport:
    """How a folder compares with what the devkit says it should hold."""
    devkit: Devkit
    train_images: int = 0
    val_images: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        d = self.devkit
        lines = [f"classes: {len(d.wnids):,}   train images: {self.train_images:,} of {d.num_train:,}   "
                 f"val images: {self.val_images:,} of {len(d.val_wnids):,}"]
        if (len(d.wnids), d.num_train, len(d.val_wnids)) != (OFFICIAL_CLASSES, OFFICIAL_TRAIN, OFFICIAL_VAL):
            lines.append(f"note: the devkit describes {len(d.wnids):,} classes, {d.num_train:,} training and "
                         f"{len(d.val_wnids):,} validation images, not ILSVRC2012's {OFFICIAL_CLASSES:,} / "
                         f"{OFFICIAL_TRAIN:,} / {OFFICIAL_VAL:,}")
        shown = self.problems[:20]
        lines += [f"missing or wrong: {problem}" for problem in shown]
        if len(self.problems) > len(shown):
            lines.append(f"... and {len(self.problems) - len(shown)} more")
        return "\n".join(lines)


def check_layout(out: Path, devkit: Devkit) -> LayoutReport:
    """Count every class folder's images against the devkit; list whatever differs."""
    report = LayoutReport(devkit)
    val_counts: dict[str, int] = {}
    for wnid in devkit.val_wnids:
        val_counts[wnid] = val_counts.get(wnid, 0) + 1
    for split, expected in (("train", devkit.train_counts), ("val", val_counts)):
        root = out / split
        if not root.is_dir():
            report.problems.append(f"{root}: no such folder")
            continue
        for wnid in devkit.wnids:
            folder = root / wnid
            if not folder.is_dir():
                report.problems.append(f"{folder}: no such folder")
                continue
            found = count_images(folder)
            if split == "train":
                report.train_images += found
            else:
                report.val_images += found
            if found != expected.get(wnid, 0):
                report.problems.append(f"{folder}: {found} images, expected {expected.get(wnid, 0)}")
        extra = sorted(entry.name for entry in os.scandir(root)
                       if entry.is_dir() and not entry.name.startswith(".") and entry.name not in devkit.train_counts)
        if extra:
            report.problems.append(f"{root} holds folders that are not devkit classes ({', '.join(extra[:5])}); "
                                   "the loaders would train on them: remove them")
    for name in (TORCHVISION_META, CLASS_TABLE, f"dev/{DEVKIT_FOLDER}/{META}"):
        if not (out / name).exists():
            report.problems.append(f"{out / name}: no such file")
    return report


# ----------------------------------------------------------------------------- the run


class Progress:
    """A bar on a terminal; in a log file, a line at every tenth of the work."""

    def __init__(self, total: int, done: int):
        self.total, self.done = total, done
        self.tty = sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=done, unit="img", desc="preparing", dynamic_ncols=True,
                        disable=not self.tty)
        self.next_line = (done * 10 // max(total, 1) + 1) * total / 10
        self.start = time.monotonic()

    def update(self, images: int) -> None:
        self.done += images
        self.bar.update(images)
        if not self.tty and self.done >= self.next_line and self.done < self.total:
            print(f"prepared {self.done:,} of {self.total:,} images ({100 * self.done / self.total:.0f} %, "
                  f"{time.monotonic() - self.start:.0f} s)", flush=True)
            self.next_line = (self.done * 10 // self.total + 1) * self.total / 10

    def close(self) -> None:
        self.bar.close()


def _read_state(out: Path) -> dict | None:
    path = out / PREPARE_STATE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise PrepareError(f"{path} is damaged; delete it and {out / 'train'}, {out / 'val'} to start over") from None


def _write_state(out: Path, devkit: Devkit, link: bool, complete: bool) -> None:
    write_json(out / PREPARE_STATE, {"format": STATE_FORMAT, "devkit": devkit.digest(), "link": link,
                                     "complete": complete})


def _check_output(out: Path, sources: Sources, devkit: Devkit, link: bool) -> None:
    """Refuse an output folder this command cannot safely continue in."""
    resolved = out.resolve()
    for role in ("train", "val"):
        source = getattr(sources, role).resolve()
        if source.is_dir() and (resolved == source or source in resolved.parents or resolved in source.parents):
            raise PrepareError(f"--output {out} and the {role} source {getattr(sources, role)} overlap; "
                               "choose an output folder outside the sources")
    if out.exists() and not out.is_dir():
        raise PrepareError(f"--output {out} is a file; give a folder")
    state = _read_state(out) if out.is_dir() else None
    if state is None:
        if out.is_dir() and any((out / name).exists() for name in ("train", "val")):
            raise PrepareError(f"{out} already holds train/ or val/ that this command did not write (a partial "
                               f"or hand-made layout); check it with python -m train.data.prepare check {out}, "
                               "or remove it or choose another --output")
        return
    if state.get("devkit") != devkit.digest():
        raise PrepareError(f"{out} was filled from a different devkit ({out / PREPARE_STATE}); "
                           "remove it or choose another --output")
    if bool(state.get("link")) != link:
        raise PrepareError(f"{out} was filled {'with' if state.get('link') else 'without'} --link; re-run "
                           f"{'with' if state.get('link') else 'without'} it, or remove the folder")


def _finished(job: ClassJob, train_root: Path) -> bool:
    """Whether an earlier run completed this class; a class that does not count up is removed."""
    final = train_root / job.wnid
    if not (final.exists() or final.is_symlink()):
        return False
    if final.is_dir() and count_images(final) == job.expected:
        return True
    print(f"note: {final} is incomplete ({count_images(final) if final.is_dir() else 0} of {job.expected} "
          "images); preparing it again", flush=True)
    _remove(final)
    return False


def _free_bytes(folder: Path) -> int:
    existing = folder
    while not existing.exists():
        existing = existing.parent
    return shutil.disk_usage(existing).free


def _needed_bytes(jobs: list[ClassJob], val_items: list[ValItem], link: bool, out: Path) -> int:
    train = sum(job.size for job in jobs if not (job.is_folder and link))
    val = sum(_rounded(item.size) for item in val_items if (item.in_tar or not link) and not _placed(item, out))
    return train + val


def _placed(item: ValItem, out: Path) -> bool:
    """A validation image an earlier run already wrote (resumed runs need no space for it)."""
    final = out / "val" / item.wnid / item.name
    return final.is_file() and not final.is_symlink() and final.stat().st_size == item.size


def _remove(path: Path) -> None:
    """A symlink, file or folder tree left by an earlier run."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _copy_devkit(source: Path, out: Path, link: bool) -> None:
    """``dev/ILSVRC2012_devkit_t12``: unpacked from the archive, or copied (linked) from a folder."""
    dest = out / "dev" / DEVKIT_FOLDER
    if (dest / META).is_file():
        return  # done by an earlier run
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove(dest)
    if source.is_dir():
        folder = source / DEVKIT_FOLDER if (source / DEVKIT_FOLDER).is_dir() else source
        if link:
            os.symlink(folder.resolve(), dest, target_is_directory=True)
            return
    staging = dest.parent / f".{DEVKIT_FOLDER}.partial"
    _remove(staging)
    if source.is_dir():
        shutil.copytree(folder, staging / DEVKIT_FOLDER, symlinks=True)
    else:
        with tarfile.open(source, "r:*") as tar:
            tar.extractall(staging, filter="data")  # refuses absolute paths and ".." in member names
    (staging / DEVKIT_FOLDER).rename(dest)
    shutil.rmtree(staging)


def prepare_from_sources(sources: Sources, out: Path, link: bool, workers: int) -> LayoutReport:
    """Plan, check, extract, then check the finished layout. The state file says "complete"
    only when that last check found nothing missing."""
    started = time.monotonic()
    devkit = read_devkit(sources.devkit)
    print(f"devkit {sources.devkit}: {len(devkit.wnids):,} classes, {devkit.num_train:,} training and "
          f"{len(devkit.val_wnids):,} validation images", flush=True)
    jobs = plan_train(sources.train, devkit, link)
    val_items = plan_val(sources.val, devkit)
    for role in ("train", "val"):
        if link and getattr(sources, role).is_file():
            print(f"note: --link needs extracted folders; {getattr(sources, role)} is an archive, so its "
                  "images are extracted", flush=True)
    _check_output(out, sources, devkit, link)

    train_root = out / "train"
    pending = [job for job in jobs if not _finished(job, train_root)] if train_root.is_dir() else jobs
    needed = _needed_bytes(pending, val_items, link, out)
    free = _free_bytes(out)
    if needed * 1.02 > free:
        raise PrepareError(f"{out}: needs about {needed * 1.02 / 1e9:,.1f} GB free for what is left to write, but its "
                           f"disk has {free / 1e9:,.1f} GB free; free some space or choose another --output "
                           "(finished classes are kept)")

    out.mkdir(parents=True, exist_ok=True)
    _write_state(out, devkit, link, complete=False)
    train_root.mkdir(exist_ok=True)
    (out / "val").mkdir(exist_ok=True)
    for stale in train_root.glob(".*.partial"):
        shutil.rmtree(stale)
    for stale in (out / "val").glob("*/.*.tmp"):
        stale.unlink()
    _copy_devkit(sources.devkit, out, link)
    write_torchvision_meta(devkit, out)
    write_class_table(out, [(wnid, devkit.names[wnid]) for wnid in devkit.wnids])

    done_train = devkit.num_train - sum(job.expected for job in pending)
    print(f"{len(jobs) - len(pending):,} of {len(jobs):,} classes already done; writing the rest with "
          f"{workers} threads into {out}", flush=True)
    problems = _run(pending, val_items, out, link, workers, Progress(devkit.num_train + len(val_items), done_train))
    report = check_layout(out, devkit)
    report.problems = problems + report.problems
    if report.complete:
        _write_state(out, devkit, link, complete=True)
    print(f"took {time.monotonic() - started:,.0f} s", flush=True)
    return report


def _run(jobs: list[ClassJob], val_items: list[ValItem], out: Path, link: bool, workers: int,
         progress: Progress) -> list[str]:
    problems: list[str] = []
    batches = [val_items[i:i + VAL_BATCH] for i in range(0, len(val_items), VAL_BATCH)]
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    futures = [pool.submit(extract_class, job, out / "train") for job in jobs]
    futures += [pool.submit(place_val_images, batch, out / "val", link) for batch in batches]
    try:
        remaining = set(futures)
        while remaining:
            finished, remaining = wait(remaining, return_when=FIRST_EXCEPTION)
            for future in finished:
                result: Result = future.result()  # re-raises a worker's error here
                problems += result.problems
                progress.update(result.images)
    except KeyboardInterrupt:
        pool.shutdown(wait=True, cancel_futures=True)
        raise Interrupted() from None
    except OSError as exc:
        pool.shutdown(wait=True, cancel_futures=True)
        if exc.errno == 28:  # ENOSPC
            raise PrepareError(f"{out}: the disk filled up while writing {exc.filename or 'an image'}; free some "
                               "space and re-run the same command (finished classes are kept)") from None
        raise PrepareError(f"cannot write {exc.filename or out}: {exc.strerror or exc}") from None
    finally:
        progress.close()
    pool.shutdown(wait=True)
    return problems
