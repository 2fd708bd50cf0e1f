"""Convert an ImageNet-layout folder to WebDataset shards for DALI.

    python -m train.data.convert SRC DST --shards 1024 [--val-shards N] [--workers N] [--seed S]

SRC holds ``train/<class>/*`` and ``val/<class>/*``. DST receives ``train-NNNNN.tar`` and
``val-NNNNN.tar``, each with its DALI index (``.idx``), and ``manifest.json`` (class names,
their readable names when SRC has a ``classes.tsv``, samples per shard, skipped files). The
samples of a split are spread over its shards in a seeded random order, so reading shards
sequentially already mixes the classes.

Every image is decoded as it is packed; the ones that cannot be are left out and listed (in
the manifest too), and the command then exits with status 1. Shards are written by parallel
worker processes, each under a temporary name renamed when complete, and the finished ones
are kept: after an interruption the same command resumes, writing only the missing shards.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..data.classes import class_descriptions
from ..data.folder import DataError, FolderSplit, scan_image_folder, scan_split
from ..data.shards import MANIFEST, MANIFEST_VERSION, SPLITS, check_index, index_path, shard_name
from ..data.verify import available_cpus, file_problem, image_problem
from ..errors import UserError, report_error
from ..files import write_json
from .shard_writer import sample_key, write_shard

PLAN_MARKER = ".convert-plan"  # which conversion an unfinished output folder belongs to
EXIT_SKIPPED = 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.data.convert",
                                     description="Pack an ImageNet-layout folder into WebDataset shards with DALI "
                                                 "index files. Re-running the same command resumes it.",
                                     epilog="Documentation: docs/data.md")
    parser.add_argument("src", type=Path, help="folder with train/<class>/* and val/<class>/*")
    parser.add_argument("dst", type=Path, help="output folder for the shards (created)")
    parser.add_argument("--shards", type=int, required=True, help="number of training shards")
    parser.add_argument("--val-shards", type=int, default=None,
                        help="number of validation shards (default: in proportion to --shards)")
    parser.add_argument("--workers", type=int, default=available_cpus(), help="parallel worker processes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the order of samples in the shards")
    return parser.parse_args(argv)


def plan_shards(train: FolderSplit, val: FolderSplit, train_shards: int, val_shards: int,
                seed: int) -> dict[str, list[list[tuple[str, str, int]]]]:
    """For each split, the shards as lists of (key, file path, label), in a seeded order."""
    plan = {}
    for split, files, count in (("train", train, train_shards), ("val", val, val_shards)):
        order = np.random.default_rng([seed, SPLITS.index(split)]).permutation(len(files))
        shards = []
        for s in range(count):
            chosen = order[len(files) * s // count:len(files) * (s + 1) // count]
            shards.append([(sample_key(int(i), files.class_names[files.labels[i]], os.path.basename(files.paths[i])),
                            files.paths[i], files.labels[i]) for i in chosen])
        plan[split] = shards
    return plan


def plan_digest(plan: dict, class_names: tuple[str, ...], root: Path) -> str:
    """Identifies a conversion: the same source files, classes, seed and shard counts."""
    digest = hashlib.sha256(json.dumps(list(class_names)).encode())
    for split in SPLITS:
        for shard in plan[split]:
            digest.update(f"|{split}|{len(shard)}".encode())
            for key, path, label in shard:
                digest.update(f"{key}\0{os.path.relpath(path, root)}\0{os.path.getsize(path)}\0{label}\n".encode())
    return digest.hexdigest()


def write_one_shard(dst: str, name: str, samples: list[tuple[str, str, int]]) -> tuple[str, int, list[list[str]]]:
    """Runs in a worker: pack ``samples`` into shard ``name``, leaving out undecodable images."""
    skipped: list[list[str]] = []

    def readable():
        for key, path, label in samples:
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as exc:
                skipped.append([path, f"cannot read: {exc.strerror or exc}"])
                continue
            problem = image_problem(data)
            if problem:
                skipped.append([path, problem])
            else:
                yield key, data, label

    tar = Path(dst) / name
    count = write_shard(tar, readable()) if samples else 0
    return name, count, skipped


def _set_descriptions(manifest: dict, descriptions: tuple[str, ...]) -> None:
    """Record the readable class names, parallel to ``class_names``; no key when unknown."""
    if descriptions:
        manifest["class_descriptions"] = list(descriptions)
    else:
        manifest.pop("class_descriptions", None)


def _load_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: cannot read ({exc}); remove it to start the conversion afresh") from None


def _finished_shard(tar: Path, planned: list[tuple[str, str, int]]) -> list[list[str]] | None:
    """If ``tar`` was completed by an earlier run of this conversion: the images it left out.

    A shard is finished when its index is current and lists only planned samples. The
    planned ones it lacks were left out as unreadable; they are checked again, and if one
    decodes now (it was replaced) the shard is written anew.
    """
    index = index_path(tar)
    if not (tar.exists() and index.exists()):
        return None
    try:
        check_index(tar, index)
        with open(index, encoding="utf-8") as f:
            f.readline()
            present = {line.split()[3].split(".", 1)[0] for line in f if line.strip()}
    except (DataError, IndexError, OSError):
        return None
    planned_keys = {key for key, _, _ in planned}
    if not present <= planned_keys:
        return None
    skipped = []
    for key, path, _ in planned:
        if key not in present:
            problem = file_problem(path)
            if problem is None:
                return None
            skipped.append([path, problem])
    return skipped


def convert(src: Path, dst: Path, train_shards: int, val_shards: int | None, workers: int, seed: int,
            progress: bool = True) -> dict:
    """Write the shards and manifest; returns the manifest. Resumes an interrupted run."""
    if train_shards < 1 or (val_shards is not None and val_shards < 1) or workers < 1:
        raise UserError("--shards, --val-shards and --workers must be at least 1")
    train = scan_split(src, "train")
    train, val = scan_image_folder(src, len(train.class_names))
    if val_shards is None:
        val_shards = max(1, round(train_shards * len(val) / len(train)))
    for split, files, count in (("train", train, train_shards), ("val", val, val_shards)):
        if count > len(files):
            raise UserError(f"{count} {split} shards for {len(files)} {split} images: ask for fewer shards")
    descriptions = class_descriptions(src, train.class_names)  # before packing: a bad table stops here
    plan = plan_shards(train, val, train_shards, val_shards, seed)
    digest = plan_digest(plan, train.class_names, src)

    dst.mkdir(parents=True, exist_ok=True)
    manifest = _load_json(dst / MANIFEST)
    marker = dst / PLAN_MARKER
    earlier = marker.read_text(encoding="utf-8").strip() if marker.exists() else digest
    if (manifest is not None and manifest.get("plan") != digest) or earlier != digest:
        raise UserError(f"{dst} holds shards of another conversion (other files, seed or shard counts); "
                        "choose an empty folder")
    if manifest is not None:
        # Finished already; a class table written since (by train.data.prepare) is taken
        # over without packing the images again.
        if manifest.get("class_descriptions", []) != list(descriptions):
            _set_descriptions(manifest, descriptions)
            write_json(dst / MANIFEST, manifest)
        return manifest
    marker.write_text(digest + "\n", encoding="utf-8")

    names = [(split, shard_name(split, i), shard) for split in SPLITS for i, shard in enumerate(plan[split])]
    done: dict[str, dict] = {}
    for _, name, shard in names:
        skipped = _finished_shard(dst / name, shard)
        if skipped is not None:
            done[name] = {"samples": len(shard) - len(skipped), "skipped": skipped}
    pending = [(name, shard) for _, name, shard in names if name not in done]

    total = sum(len(shard) for _, _, shard in names)
    bar = tqdm(total=total, initial=total - sum(len(shard) for _, shard in pending), desc="packing shards",
               unit="img", dynamic_ncols=True, disable=not (progress and sys.stderr.isatty()))
    if workers == 1:
        for name, shard in pending:
            _, count, skipped = write_one_shard(str(dst), name, shard)
            done[name] = {"samples": count, "skipped": skipped}
            bar.update(len(shard))
    elif pending:
        # Spawned, not forked: a process that already runs threads (DALI's, a test's) can
        # leave a forked child deadlocked on a lock held at the moment of the fork.
        with ProcessPoolExecutor(max_workers=min(workers, len(pending)), mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(write_one_shard, str(dst), name, shard): len(shard) for name, shard in pending}
            try:
                for future in as_completed(futures):
                    name, count, skipped = future.result()
                    done[name] = {"samples": count, "skipped": skipped}
                    bar.update(futures[future])
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
    bar.close()

    manifest = {
        "version": MANIFEST_VERSION,
        "plan": digest,
        "seed": seed,
        "class_names": list(train.class_names),
        "splits": {split: [{"name": name, "samples": done[name]["samples"]}
                           for s, name, _ in names if s == split and done[name]["samples"] > 0] for split in SPLITS},
        "samples": {split: sum(done[name]["samples"] for s, name, _ in names if s == split) for split in SPLITS},
        "skipped": [{"path": path, "reason": reason} for _, name, _ in names for path, reason in done[name]["skipped"]],
    }
    _set_descriptions(manifest, descriptions)
    write_json(dst / MANIFEST, manifest)
    marker.unlink()
    return manifest


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        manifest = convert(args.src, args.dst, args.shards, args.val_shards, args.workers, args.seed)
    except (UserError, DataError) as exc:
        return report_error(exc)
    counts = manifest["samples"]
    print(f"{args.dst}: {len(manifest['splits']['train'])} train shards ({counts['train']} images), "
          f"{len(manifest['splits']['val'])} val shards ({counts['val']} images), "
          f"{len(manifest['class_names'])} classes; manifest {args.dst / MANIFEST}")
    skipped = manifest["skipped"]
    if skipped:
        print(f"left out {len(skipped)} unreadable image(s):", file=sys.stderr)
        for entry in skipped:
            print(f"  {entry['path']}: {entry['reason']}", file=sys.stderr)
        return EXIT_SKIPPED
    return 0


if __name__ == "__main__":
    sys.exit(main())
