"""Folder layout checks, samplers, presets and the HF loader."""

from __future__ import annotations

import random
import shutil
from collections import Counter

import pytest
import torch
from helpers import make_image_folder
from PIL import Image, JpegImagePlugin
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD

from train.config import DataConfig, DataloaderConfig, PreprocessConfig
from train.data import build_loaders, check_supported
from train.data.device import BatchFormat, DeviceBatches, to_device
from train.data.folder import DataError, scan_image_folder
from train.data.hf import hub_tables
from train.data.sampling import EvalBatchSampler, ShardedBatchSampler
from train.data.transforms import CROP_ASPECT, EvalPreset, TrainPreset, random_crop_box, reduction_for

PREPROCESS = PreprocessConfig(train_crop_size=32, val_image_size=36, val_crop_size=32)


# ------------------------------------------------------------------ folder layout


def test_class_index_is_sorted_folder_order(tmp_path):
    root = make_image_folder(tmp_path / "d", classes=3, train_per_class=2, val_counts=(1, 1, 1))
    (root / "train" / "n00000002").rename(root / "train" / "a_first")
    (root / "val" / "n00000002").rename(root / "val" / "a_first")
    train, val = scan_image_folder(root, 3)
    assert train.class_names == ("a_first", "n00000000", "n00000001")
    assert all(p.split("/")[-2] == train.class_names[label] for p, label in zip(train.paths, train.labels))
    assert val.class_names == train.class_names


@pytest.fixture
def folder(tmp_path):
    return make_image_folder(tmp_path / "d", classes=2, train_per_class=2, val_counts=(1, 1))


def test_missing_data_dir(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        scan_image_folder(tmp_path / "nope", 2)


@pytest.mark.parametrize("split", ["train", "val"])
def test_missing_split_folder(folder, split):
    shutil.rmtree(folder / split)
    with pytest.raises(DataError, match=f"no '{split}/' folder"):
        scan_image_folder(folder, 2)


def test_empty_class_folder(folder):
    for f in (folder / "val" / "n00000001").iterdir():
        f.unlink()
    with pytest.raises(DataError, match="n00000001 holds no images"):
        scan_image_folder(folder, 2)


def test_train_and_val_with_different_classes(folder):
    (folder / "val" / "n00000001").rename(folder / "val" / "n99999999")
    with pytest.raises(DataError, match="only in train/: n00000001; only in val/: n99999999"):
        scan_image_folder(folder, 2)


def test_num_classes_mismatch(folder):
    with pytest.raises(DataError, match="data.num_classes = 1000 but .* has 2 class folders"):
        scan_image_folder(folder, 1000)


def test_hub_data_set_needs_hf_loader():
    with pytest.raises(Exception, match="only\\s+data.dataloader.name = \"hf\""):
        check_supported(DataConfig(data_dir="hf-hub:org/x", dataloader=DataloaderConfig(name="dali")), "d.toml")


# ----------------------------------------------------------------------- samplers


def keys(batches):
    return [[index for _, index in batch] for batch in batches]


def test_training_batches_do_not_depend_on_process_count():
    single = keys(ShardedBatchSampler(103, 8, 1, 0, seed=5))
    halves = [keys(ShardedBatchSampler(103, 4, 2, rank, seed=5)) for rank in (0, 1)]
    assert len(single) == len(halves[0]) == len(halves[1]) == 103 // 8
    for step, batch in enumerate(single):
        assert halves[0][step] + halves[1][step] == batch
    flat = [i for batch in single for i in batch]
    assert len(set(flat)) == len(flat)  # no sample twice in an epoch


def test_epochs_are_reshuffled_and_reproducible():
    sampler = ShardedBatchSampler(50, 5, 1, 0, seed=1)
    first = keys(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert keys([second[0]]) != first[:1] and all(epoch == 1 for epoch, _ in second[0])
    sampler.set_epoch(0)
    assert keys(sampler) == first


def test_training_can_start_mid_epoch():
    sampler = ShardedBatchSampler(50, 5, 1, 0, seed=1)
    full = list(sampler)
    sampler.set_epoch(0, start_batch=3)
    assert list(sampler) == full[3:] and len(sampler) == len(full) - 3


@pytest.mark.parametrize("n, processes", [(15, 2), (16, 2), (7, 3), (5, 1)])
def test_evaluation_reads_every_sample_exactly_once(n, processes):
    seen = Counter(index for rank in range(processes)
                   for batch in EvalBatchSampler(n, 4, processes, rank) for _, index in batch)
    assert seen == Counter(range(n))


# ------------------------------------------------------------------------ presets


def test_random_crop_box_respects_area_and_aspect():
    rng = random.Random(0)
    for _ in range(500):
        left, top, right, bottom = random_crop_box(500, 375, rng)
        w, h = right - left, bottom - top
        assert 0 <= left < right <= 500 and 0 <= top < bottom <= 375
        assert 0.09 <= w * h / (500 * 375) <= 1.0
        assert CROP_ASPECT[0] - 0.02 <= w / h <= CROP_ASPECT[1] + 0.02


def test_presets_hand_over_uint8_pixels_which_the_loader_normalises():
    image = Image.new("RGB", (50, 40), (255, 128, 0))
    train = TrainPreset(24, "bicubic")(image, random.Random(1))
    val = EvalPreset(28, 24, "triangular")(image)
    assert train.shape == val.shape == (24, 24, 3) and train.dtype == val.dtype == torch.uint8
    images, _ = to_device(torch.stack([val]), torch.zeros(1, dtype=torch.int64), torch.device("cpu"), False)
    assert images.shape == (1, 3, 24, 24) and images.dtype == torch.float32
    # Red channel at full intensity normalizes to (1 - 0.485) / 0.229.
    assert images[0, 0, 12, 12].item() == pytest.approx((1 - 0.485) / 0.229, abs=1e-5)


def test_normalising_a_batch_gives_exactly_what_the_workers_gave_per_image():
    """The workers used to normalise each image themselves; the batch normalised on the device
    holds the same floats, bit for bit, in either memory layout (the demo's metrics stay the same)."""
    pixels = torch.randint(0, 256, (4, 10, 12, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    per_image = torch.stack([p.permute(2, 0, 1).float().div_(255).sub_(mean).div_(std) for p in pixels])
    labels = torch.arange(4)
    for channels_last in (False, True):
        images, out_labels = to_device(pixels, labels, torch.device("cpu"), channels_last)
        assert torch.equal(images, per_image) and torch.equal(out_labels, labels)
        assert images.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def photo_jpeg(path, width: int = 512, height: int = 384):
    """A smooth colour photo-like JPEG, large enough for reduced decoding."""
    coarse = torch.randint(0, 256, (6, 8, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    Image.fromarray(coarse.numpy()).resize((width, height), Image.BICUBIC).save(path, quality=95)
    return path


@pytest.mark.parametrize("box, side, reduction", [((0, 0, 300, 200), 64, 2), ((10, 10, 310, 210), 24, 8),
                                                  ((0, 0, 100, 500), 64, 1), ((0, 0, 256, 256), 64, 4)])
def test_the_jpeg_reduction_keeps_the_crop_at_least_as_large_as_its_output(box, side, reduction):
    assert reduction_for(box, side) == reduction


def test_a_large_crop_of_a_jpeg_is_decoded_at_a_reduced_size_with_the_same_crop_and_flip(tmp_path, monkeypatch):
    """Opened lazily, a JPEG whose crop is at least twice the output side is decoded by PIL's
    draft mode at 1/2, 1/4 or 1/8 size. The crop box and the flip are drawn as from the full
    image, so the output shows the same region, and the random draws after it are the same."""
    path = photo_jpeg(tmp_path / "photo.JPEG")
    scales = []
    draft = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft",
                        lambda self, mode, size: scales.append(self.width // size[0]) or draft(self, mode, size))
    preset = TrainPreset(32, "bilinear")
    for seed in range(12):
        with Image.open(path) as full:
            full.load()  # decoded already: no reduction possible
            full_rng, lazy_rng = random.Random(seed), random.Random(seed)
            expected = preset(full, full_rng).float()
        with Image.open(path) as lazy:
            reduced = preset(lazy, lazy_rng).float()
        assert full_rng.random() == lazy_rng.random()  # the same draws were taken
        assert (reduced - expected).abs().mean() < 4  # of 255: the same region, resampled differently
    assert len(scales) >= 4 and set(scales) <= {2, 4, 8}  # most of these crops allow it, at 32 px


def test_the_hf_workers_hand_over_uint8_batches_pinned_for_a_gpu(tiny_folder):
    """What crosses from the workers is bytes (height x width x 3), page-locked when the run
    trains on a GPU, from persistent workers with batches queued ahead; the loader's batches are
    normalised float32 in the model's layout."""
    data = DataConfig(data_dir=str(tiny_folder), num_classes=3,
                      dataloader=DataloaderConfig(name="hf", num_data_workers=1))
    loaders = build_loaders(data, PREPROCESS, 4, 1, 0, seed=0)
    workers_batch, _ = next(iter(loaders.train.batches))
    assert workers_batch.shape == (4, 32, 32, 3) and workers_batch.dtype == torch.uint8
    on_gpu = build_loaders(data, PREPROCESS, 4, 1, 0, seed=0,
                           batch_format=BatchFormat(torch.device("cuda", 0), channels_last=True))
    for stream in (on_gpu.train, on_gpu.val, on_gpu.train_stats()):  # nothing of CUDA is touched until read
        assert stream.batches.pin_memory and stream.batches.persistent_workers and stream.batches.prefetch_factor == 4
        assert stream.format.channels_last


def test_batches_go_to_the_device_one_ahead_so_a_gpus_copy_overlaps_the_step():
    """When the loop gets a batch, the next one has already been read and sent on its way (on a
    GPU, on a side stream); the loop still gets every batch, in order."""
    read = []

    def source():
        for i in range(4):
            read.append(i)
            yield torch.full((1, 2, 2, 3), i, dtype=torch.uint8), torch.tensor([i])
    seen = []
    for images, labels in DeviceBatches(source(), BatchFormat()):
        seen.append((labels.item(), len(read)))
        assert images.dtype == torch.float32 and images.shape == (1, 3, 2, 2)
    assert seen == [(0, 2), (1, 3), (2, 4), (3, 4)]


def test_eval_preset_centre_crops_after_resizing_shorter_side():
    image = Image.new("RGB", (80, 40))
    image.paste((255, 255, 255), (0, 0, 20, 40))  # white left quarter, cropped away
    out = EvalPreset(20, 20, "bilinear")(image)
    assert out.shape == (20, 20, 3) and out.max().item() < 100  # all dark after the centre crop (white: 255)


def test_train_preset_is_reproducible_per_key():
    image = make_image_like()
    preset = TrainPreset(16, "bilinear")
    a = preset(image, random.Random("7/0/3"))
    assert torch.equal(a, preset(image, random.Random("7/0/3")))
    assert not torch.equal(a, preset(image, random.Random("7/1/3")))


def make_image_like():
    pixels = torch.arange(40 * 30 * 3, dtype=torch.int64).remainder(251).to(torch.uint8).view(30, 40, 3).numpy()
    return Image.fromarray(pixels)


# --------------------------------------------------------------------- HF loader


def test_hf_loader_batches(tiny_folder):
    data = DataConfig(data_dir=str(tiny_folder), num_classes=3,
                      dataloader=DataloaderConfig(name="hf", num_data_workers=1))
    loaders = build_loaders(data, PREPROCESS, per_process_batch=4, num_processes=1, rank=0, seed=0)
    assert (loaders.num_train, loaders.num_val, loaders.steps_per_epoch) == (24, 15, 6)
    images, labels = next(iter(loaders.train))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and set(labels.tolist()) <= {0, 1, 2}
    val_labels = torch.cat([labels for _, labels in loaders.val])
    assert val_labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5


def test_hf_loader_names_an_undecodable_file(tmp_path):
    root = make_image_folder(tmp_path / "d", classes=2, train_per_class=4, val_counts=(1, 1))
    bad = root / "train" / "n00000001" / "img_0000.JPEG"
    bad.write_bytes(bad.read_bytes()[:100])  # truncated
    data = DataConfig(data_dir=str(root), num_classes=2, dataloader=DataloaderConfig(name="hf", num_data_workers=1))
    loaders = build_loaders(data, PREPROCESS, 8, 1, 0, seed=0)
    with pytest.raises(DataError, match=f"cannot decode image {bad}"):
        for _ in loaders.train:
            pass


def test_fewer_images_than_one_batch(tiny_folder):
    data = DataConfig(data_dir=str(tiny_folder), num_classes=3,
                      dataloader=DataloaderConfig(name="hf", num_data_workers=0))
    with pytest.raises(DataError, match="fewer than one global batch"):
        build_loaders(data, PREPROCESS, 32, 1, 0, seed=0)


def test_hub_style_data_set_from_a_local_folder(tmp_path):
    """The Hub code path (datasets.load_dataset) on a local data set repo with custom split names."""
    import datasets
    features = datasets.Features({"img": datasets.Image(), "cls": datasets.ClassLabel(names=["cat", "dog"])})
    images = [Image.new("RGB", (40, 30), (i * 40, 0, 0)) for i in range(4)]
    table = datasets.Dataset.from_dict({"img": images, "cls": [0, 1, 0, 1]}, features=features)
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    table.to_parquet(str(repo / "data" / "fit-00000-of-00001.parquet"))
    table.select(range(2)).to_parquet(str(repo / "data" / "check-00000-of-00001.parquet"))
    cfg = DataConfig(data_dir=f"hf-hub:{repo}", num_classes=2,
                     dataloader=DataloaderConfig(name="hf", train_split="fit", val_split="check",
                                                 image_column="img", label_column="cls", num_data_workers=0))
    train, val, names = hub_tables(str(repo), cfg)
    assert (len(train), len(val), names) == (4, 2, ("cat", "dog"))
    loaders = build_loaders(cfg, PREPROCESS, 2, 1, 0, seed=0)
    images, labels = next(iter(loaders.train))
    assert images.shape == (2, 3, 32, 32) and labels.dtype == torch.int64
    with pytest.raises(DataError, match="has 2 classes"):
        hub_tables(str(repo), DataConfig(data_dir="x", num_classes=5, dataloader=cfg.dataloader))
    with pytest.raises(DataError, match="no column 'image'"):
        hub_tables(str(repo), DataConfig(data_dir="x", num_classes=2,
                                         dataloader=DataloaderConfig(train_split="fit", val_split="check",
                                                                     label_column="cls")))
