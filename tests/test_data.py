"""Folder layout checks, samplers, presets and the HF loader."""

from __future__ import annotations

import random
import shutil
from collections import Counter

import pytest
import torch
from helpers import make_image_folder
from PIL import Image

from train.config import DataConfig, DataloaderConfig, PreprocessConfig
from train.data import build_loaders, check_supported
from train.data.folder import DataError, scan_image_folder
from train.data.hf import hub_tables
from train.data.sampling import EvalBatchSampler, ShardedBatchSampler
from train.data.transforms import CROP_ASPECT, EvalPreset, TrainPreset, random_crop_box

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


def test_presets_output_normalized_chw_float():
    image = Image.new("RGB", (50, 40), (255, 128, 0))
    train = TrainPreset(24, "bicubic")(image, random.Random(1))
    val = EvalPreset(28, 24, "triangular")(image)
    assert train.shape == val.shape == (3, 24, 24) and train.dtype == torch.float32
    # Red channel at full intensity normalizes to (1 - 0.485) / 0.229.
    assert val[0, 12, 12].item() == pytest.approx((1 - 0.485) / 0.229, abs=1e-5)


def test_eval_preset_centre_crops_after_resizing_shorter_side():
    image = Image.new("RGB", (80, 40))
    image.paste((255, 255, 255), (0, 0, 20, 40))  # white left quarter, cropped away
    out = EvalPreset(20, 20, "bilinear")(image)
    assert out.shape == (3, 20, 20) and out.max().item() < 0  # all black after the centre crop


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
    loaders = build_loaders(data, PREPROCESS, per_process_batch=4, num_processes=1, rank=0, seed=0, pin_memory=False)
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
    loaders = build_loaders(data, PREPROCESS, 8, 1, 0, seed=0, pin_memory=False)
    with pytest.raises(DataError, match=f"cannot decode image {bad}"):
        for _ in loaders.train:
            pass


def test_fewer_images_than_one_batch(tiny_folder):
    data = DataConfig(data_dir=str(tiny_folder), num_classes=3,
                      dataloader=DataloaderConfig(name="hf", num_data_workers=0))
    with pytest.raises(DataError, match="fewer than one global batch"):
        build_loaders(data, PREPROCESS, 32, 1, 0, seed=0, pin_memory=False)


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
    loaders = build_loaders(cfg, PREPROCESS, 2, 1, 0, seed=0, pin_memory=False)
    images, labels = next(iter(loaders.train))
    assert images.shape == (2, 3, 32, 32) and labels.dtype == torch.int64
    with pytest.raises(DataError, match="has 2 classes"):
        hub_tables(str(repo), DataConfig(data_dir="x", num_classes=5, dataloader=cfg.dataloader))
    with pytest.raises(DataError, match="no column 'image'"):
        hub_tables(str(repo), DataConfig(data_dir="x", num_classes=2,
                                         dataloader=DataloaderConfig(train_split="fit", val_split="check",
                                                                     label_column="cls")))
