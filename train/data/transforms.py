"""Training and validation preprocessing for PIL images (the HF loader's presets).

The random choices of a sample come from a generator seeded by (run seed, epoch, index), not
from a worker's global RNG, so a sample is augmented identically whatever the number of
workers, and a resumed run sees exactly the crops the uninterrupted run would have seen. This
is why these presets are our own rather than torchvision's ``RandomResizedCrop`` and
``RandomHorizontalFlip``, which draw from the global RNG.
"""

from __future__ import annotations

import math
import random

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..config import CropRamp, crop_size_at

# The seed's DALI pipeline: random area 10%-100% of the image, aspect ratio 3/4..4/3 narrowed
# to 0.8..1.25, up to 100 draws before falling back to the whole image.
CROP_AREA = (0.1, 1.0)
CROP_ASPECT = (0.8, 1.25)
CROP_ATTEMPTS = 100

# PIL's bilinear filter widens its support when shrinking, which makes it the antialiased
# triangle filter DALI calls "triangular".
PIL_FILTERS = {"bilinear": Image.BILINEAR, "triangular": Image.BILINEAR, "bicubic": Image.BICUBIC}


def random_crop_box(width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
    """A (left, top, right, bottom) box of random area and aspect ratio, as RandomResizedCrop."""
    area = width * height
    log_low, log_high = math.log(CROP_ASPECT[0]), math.log(CROP_ASPECT[1])
    for _ in range(CROP_ATTEMPTS):
        target_area = area * rng.uniform(*CROP_AREA)
        aspect = math.exp(rng.uniform(log_low, log_high))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = rng.randint(0, width - w)
            top = rng.randint(0, height - h)
            return left, top, left + w, top + h
    # Fallback, as torchvision: the whole image, clamped to the allowed aspect range.
    aspect = width / height
    if aspect < CROP_ASPECT[0]:
        w, h = width, round(width / CROP_ASPECT[0])
    elif aspect > CROP_ASPECT[1]:
        w, h = round(height * CROP_ASPECT[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def _to_normalized_tensor(image: Image.Image) -> torch.Tensor:
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    pixels = pixels.view(image.height, image.width, 3).permute(2, 0, 1).float().div_(255)
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    return pixels.sub_(mean).div_(std)


class TrainPreset:
    """Random-area crop resized to ``crop_size`` (a side, or a ramp over the epochs), random
    horizontal flip, normalize."""

    def __init__(self, crop_size: int | CropRamp, interpolation: str):
        self.crop_size = crop_size
        self.resample = PIL_FILTERS[interpolation]

    def __call__(self, image: Image.Image, rng: random.Random, epoch: int = 0) -> torch.Tensor:
        box = random_crop_box(image.width, image.height, rng)
        side = crop_size_at(self.crop_size, epoch)
        image = image.resize((side, side), self.resample, box=box)
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return _to_normalized_tensor(image)


class EvalPreset:
    """Resize the shorter side to ``resize_size``, centre crop ``crop_size``, normalize."""

    def __init__(self, resize_size: int, crop_size: int, interpolation: str):
        self.resize_size = resize_size
        self.crop_size = crop_size
        self.resample = PIL_FILTERS[interpolation]

    def __call__(self, image: Image.Image, rng: random.Random | None = None, epoch: int = 0) -> torch.Tensor:
        scale = self.resize_size / min(image.width, image.height)
        width = max(self.crop_size, round(image.width * scale))
        height = max(self.crop_size, round(image.height * scale))
        image = image.resize((width, height), self.resample)
        left = (width - self.crop_size) // 2
        top = (height - self.crop_size) // 2
        image = image.crop((left, top, left + self.crop_size, top + self.crop_size))
        return _to_normalized_tensor(image)
