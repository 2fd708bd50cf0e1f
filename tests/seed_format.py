"""Shards in the seed project's own WebDataset format, written here from an ImageNet-layout folder.

What the seed's converter produces, as the issue describes it: per split, archives
``<split>-shard-NNNNNN.tar`` (Python's tarfile, default format), samples keyed ``00000000``,
``00000001``, ... within each archive, each with ``.jpg`` (the file's bytes), ``.cls`` (the
class index packed as a little-endian int64) and ``.json`` (metadata); the training samples
shuffled, the validation ones in class order; ``<split>_manifest.json`` with ``num_shards``
and ``total_samples``; and DALI's ``wds2idx`` run on every archive, writing ``<name>.tar.idx``.
"""

from __future__ import annotations

import io
import json
import random
import struct
import subprocess
import sys
import tarfile
from pathlib import Path


def _member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def write_seed_shards(folder: Path, out: Path, train_shards: int = 3, val_shards: int = 2, seed: int = 42) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for split, num_shards in (("train", train_shards), ("val", val_shards)):
        classes = sorted(p.name for p in (folder / split).iterdir() if p.is_dir())
        samples = [(path, index) for index, name in enumerate(classes)
                   for path in sorted((folder / split / name).iterdir())]
        if split == "train":
            random.Random(seed).shuffle(samples)
        for shard in range(num_shards):
            part = samples[round(shard * len(samples) / num_shards):round((shard + 1) * len(samples) / num_shards)]
            tar_path = out / f"{split}-shard-{shard:06d}.tar"
            with tarfile.open(tar_path, "w") as tar:
                for i, (path, label) in enumerate(part):
                    meta = {"original_path": f"{path.parent.name}/{path.name}", "label": label}
                    _member(tar, f"{i:08d}.jpg", path.read_bytes())
                    _member(tar, f"{i:08d}.cls", struct.pack("<q", label))
                    _member(tar, f"{i:08d}.json", json.dumps(meta).encode())
            subprocess.run([sys.executable, "-m", "wds2idx", str(tar_path), f"{tar_path}.idx"], check=True,
                           capture_output=True)
        manifest = {"split": split, "num_shards": num_shards, "total_samples": len(samples)}
        (out / f"{split}_manifest.json").write_text(json.dumps(manifest, indent=2))
    return out
