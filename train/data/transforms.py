"""Training and validation preprocessing for PIL images (the HF loader's presets).

The presets run in the loader's worker processes and return uint8 pixels; ``normalize`` turns
whole batches into the model's float input on the training device.

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


class UndecodableImage(Exception):
    """PIL could not decode an image; the message says why (the caller names the file)."""


def decode_rgb(image: Image.Image, reduce_to: tuple[int, int] | None = None) -> tuple[Image.Image, float]:
    """``image``'s pixels in RGB, and how many of its pixels one decoded pixel spans along a side.

    ``reduce_to``: a JPEG not decoded yet is decoded at the smallest of its reduced sizes (1/2,
    1/4, 1/8 of each side, computed in the DCT, far cheaper than a full decode) that is still at
    least this size; other images, and images decoded already, come at their full size (1.0)."""
    try:
        full_width = image.width
        drafted = image.draft(None, reduce_to) if reduce_to else None
        scale = full_width / drafted[1][2] if drafted else 1.0  # drafted: (mode, (0, 0, W / s, H / s))
        return image.convert("RGB"), scale
    except Exception as exc:  # PIL raises many types for a bad file; all mean the same here
        raise UndecodableImage(f"{exc.__class__.__name__}: {exc}") from None


def to_uint8_hwc(image: Image.Image) -> torch.Tensor:
    """An RGB image's pixels as a height x width x 3 uint8 tensor. Workers hand over bytes, a
    quarter of float32's size; the loader normalises whole batches on the training device
    (``device.py``)."""
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(image.height, image.width, 3)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (N x 3 x H x W in any memory layout) as float32, normalised with ImageNet's
    mean and standard deviation; the layout is kept. The operations, and so the values to the
    last bit, are those the HF loader's workers applied per image before they handed over bytes."""
    mean, std = _mean_and_std(images.device)
    return images.float().div_(255).sub_(mean).div_(std)


_MEAN_AND_STD: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _mean_and_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Made once per device: copying them to a GPU at every batch would wait on the host."""
    if device not in _MEAN_AND_STD:
        # timm's constants, imported here, in the training process: the workers, which import
        # this module, do without timm's import (seconds, at every run's start).
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
        _MEAN_AND_STD[device] = (torch.tensor(IMAGENET_DEFAULT_MEAN, device=device).view(1, 3, 1, 1),
                                 torch.tensor(IMAGENET_DEFAULT_STD, device=device).view(1, 3, 1, 1))
    return _MEAN_AND_STD[device]


def reduction_for(box: tuple[int, int, int, int], side: int) -> int:
    """The largest JPEG reduction (8, 4, 2; else 1) that leaves ``box`` at least ``side`` pixels
    on both sides: the crop is then still shrunk to ``side``, never enlarged."""
    shorter = min(box[2] - box[0], box[3] - box[1])
    return next((factor for factor in (8, 4, 2) if shorter >= factor * side), 1)


class TrainPreset:
    """Random-area crop resized to ``crop_size`` (a side, or a ramp over the epochs), random
    horizontal flip; uint8 HWC out (normalised on the training device).

    ``image`` may be opened but not yet decoded: a JPEG is then decoded at a reduced size
    where the crop allows it (``reduction_for``). The crop box and the flip are drawn from the
    image's full size, so they are the same whichever size it is decoded at."""

    def __init__(self, crop_size: int | CropRamp, interpolation: str):
        self.crop_size = crop_size
        self.resample = PIL_FILTERS[interpolation]

    def __call__(self, image: Image.Image, rng: random.Random, epoch: int = 0) -> torch.Tensor:
        width, height = image.size
        box = random_crop_box(width, height, rng)
        flip = rng.random() < 0.5
        side = crop_size_at(self.crop_size, epoch)
        reduction = reduction_for(box, side)
        image, scale = decode_rgb(image, (width // reduction, height // reduction) if reduction > 1 else None)
        image = image.resize((side, side), self.resample, box=box if scale == 1 else tuple(x / scale for x in box))
        if flip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return to_uint8_hwc(image)


class EvalPreset:
    """Resize the shorter side to ``resize_size``, centre crop ``crop_size``; uint8 HWC out."""

    def __init__(self, resize_size: int, crop_size: int, interpolation: str):
        self.resize_size = resize_size
        self.crop_size = crop_size
        self.resample = PIL_FILTERS[interpolation]

    def __call__(self, image: Image.Image, rng: random.Random | None = None, epoch: int = 0) -> torch.Tensor:
        image, _ = decode_rgb(image)
        scale = self.resize_size / min(image.width, image.height)
        width = max(self.crop_size, round(image.width * scale))
        height = max(self.crop_size, round(image.height * scale))
        image = image.resize((width, height), self.resample)
        left = (width - self.crop_size) // 2
        top = (height - self.crop_size) // 2
        image = image.crop((left, top, left + self.crop_size, top + self.crop_size))
        return to_uint8_hwc(image)
