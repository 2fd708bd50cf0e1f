"""The built-in demo data set: small procedurally generated JPEGs in the ImageNet folder layout.

``data_dir = "builtin:shapes"`` resolves to a cache folder holding ``train/<class>/*.JPEG``
and ``val/<class>/*.JPEG``, generated on first use. Because the files are ordinary JPEGs in
the ImageNet layout, the very readers that serve ImageNet serve this set too, so the demo
exercises the real input pipeline.

Each class is a texture (stripes, checks, dots, rings, ...) in a warm or a cool palette.
Texture and colour survive the random-area crops and flips of training, so a ResNet-18 can
learn the set in a few CPU minutes, while the per-image randomness (frequency, phase, hue,
brightness, noise) keeps it from being a lookup table.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import UserError

# Bump when the generated images change, so stale caches are never reused.
GENERATOR_VERSION = 1
IMAGE_SIZE = 48
PATTERNS = ("hstripes", "vstripes", "checks", "dots", "rings")
PALETTES = ("warm", "cool")
CLASS_NAMES = tuple(f"{pattern}-{palette}" for pattern in PATTERNS for palette in PALETTES)
SPLIT_SIZES = {"train": 200, "val": 50}  # images per class
KNOWN_SETS = ("shapes",)


def default_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "imagenet-trainer"


def _palette_colour(palette: str, rng: np.random.Generator) -> np.ndarray:
    """An RGB colour in [0, 1] whose hue is in the warm (red-yellow) or cool (green-blue) range."""
    hue = rng.uniform(0.0, 0.15) if palette == "warm" else rng.uniform(0.45, 0.7)
    saturation, value = rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0)
    # HSV -> RGB for one colour, written out to avoid a colorsys loop per pixel.
    i = int(hue * 6) % 6
    f = hue * 6 - int(hue * 6)
    p, q, t = value * (1 - saturation), value * (1 - f * saturation), value * (1 - (1 - f) * saturation)
    rgb = [(value, t, p), (q, value, p), (p, value, t), (p, q, value), (t, p, value), (value, p, q)][i]
    return np.array(rgb)


def _pattern_mask(pattern: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """A [size, size] array in [0, 1]: where the foreground colour shows."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    period = rng.uniform(5.0, 10.0)
    phase_x, phase_y = rng.uniform(0, period, size=2)
    if pattern == "hstripes":
        wave = np.sin(2 * np.pi * (y + phase_y) / period)
    elif pattern == "vstripes":
        wave = np.sin(2 * np.pi * (x + phase_x) / period)
    elif pattern == "checks":
        wave = np.sin(2 * np.pi * (x + phase_x) / period) * np.sin(2 * np.pi * (y + phase_y) / period)
    elif pattern == "dots":
        cell_x = np.mod(x + phase_x, period) - period / 2
        cell_y = np.mod(y + phase_y, period) - period / 2
        wave = period * 0.3 - np.hypot(cell_x, cell_y)
    elif pattern == "rings":
        cx, cy = rng.uniform(0, size, size=2)
        wave = np.sin(2 * np.pi * np.hypot(x - cx, y - cy) / period)
    else:  # pragma: no cover - PATTERNS is closed
        raise ValueError(pattern)
    return (wave > 0).astype(np.float64)


def render_image(class_index: int, seed: int) -> Image.Image:
    """One image of class ``class_index``; the same (class, seed) always gives the same pixels."""
    pattern, palette = CLASS_NAMES[class_index].split("-")
    rng = np.random.default_rng([GENERATOR_VERSION, class_index, seed])
    foreground = _palette_colour(palette, rng)
    background = rng.uniform(0.0, 0.35, size=3)
    mask = _pattern_mask(pattern, rng, IMAGE_SIZE)[..., None]
    pixels = mask * foreground + (1 - mask) * background
    pixels = pixels * rng.uniform(0.8, 1.1) + rng.normal(0, 0.06, size=pixels.shape)
    return Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8), mode="RGB")


def _fingerprint() -> str:
    spec = {"version": GENERATOR_VERSION, "size": IMAGE_SIZE, "classes": CLASS_NAMES, "splits": SPLIT_SIZES}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def _write_split(root: Path, split: str, per_class: int) -> None:
    for class_index, name in enumerate(CLASS_NAMES):
        folder = root / split / name
        folder.mkdir(parents=True, exist_ok=True)
        offset = 0 if split == "train" else 1_000_000  # val images never repeat train seeds
        for i in range(per_class):
            image = render_image(class_index, offset + i)
            image.save(folder / f"{name}_{i:05d}.JPEG", format="JPEG", quality=90)


def ensure_builtin_dataset(name: str, cache_root: Path | None = None) -> Path:
    """The folder of built-in data set ``name``, generating it first if needed.

    Generation writes into a temporary folder and renames it into place, so a run killed
    half-way never leaves a partial data set that later runs would trust. Several processes
    starting at once each generate and the first rename wins.
    """
    if name not in KNOWN_SETS:
        raise UserError(f"data.data_dir: unknown built-in data set 'builtin:{name}'; "
                        f"available: {', '.join('builtin:' + k for k in KNOWN_SETS)}")
    cache_root = Path(cache_root) if cache_root else default_cache_root()
    target = cache_root / f"{name}-{_fingerprint()}"
    if (target / "COMPLETE").exists():
        return target
    cache_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_root))
    try:
        for split, per_class in SPLIT_SIZES.items():
            _write_split(staging, split, per_class)
        (staging / "COMPLETE").write_text(_fingerprint() + "\n")
        try:
            staging.rename(target)
        except OSError:
            if not (target / "COMPLETE").exists():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
