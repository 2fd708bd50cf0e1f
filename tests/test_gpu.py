"""The GPU acceptance suite: what only a CUDA GPU runs, on generated JPEG data.

    pytest -m gpu        # on a machine with a CUDA GPU; about 5-8 minutes on one GPU

Without CUDA every test here is skipped; without NVIDIA DALI the DALI tests are skipped with
the reason, and the rest runs. It covers DALI's GPU ("mixed") decoder for training and
validation on a folder and on shards, and a mid-epoch DALI checkpoint restored exactly;
bf16 and fp16 steps of ResNet-50, VGG-16-BN and ViT-B/16; SAM v1 and v2 under fp16 with an
overflow forced; Schedule-Free with BatchNorm recalibration under bf16; ``compile = true`` and
``sync_bn = true`` on one process; fused SGD/AdamW under fp16 with an overflow forced; DALI's
default ``dali_cpu = "auto"`` decoding on the GPU; a run killed after a checkpoint, resumed, and its exported
model loaded through timm. Throughput is measured apart: ``bash benchmarks/gpu_suite.sh``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    REPO,
    batches_around_a_restore,
    clean_env,
    data_toml,
    make_image_folder,
    run_train,
    tiny_train_toml,
    write,
)
from test_checkpoint import wait_for

from train.checkpoint import MANIFEST, latest_valid_checkpoint
from train.config import DataConfig, DataloaderConfig, PreprocessConfig
from train.data import _dali_installed, build_loaders
from train.data.device import BatchFormat, to_device
from train.rundir import read_metrics

pytestmark = [pytest.mark.gpu, pytest.mark.xdist_group("gpu"),  # one GPU: one test at a time
              pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU suite needs a CUDA GPU")]

WORKER = Path(__file__).resolve().parent / "gpu_worker.py"
ON_GPU = BatchFormat(torch.device("cuda", 0))  # float32, NCHW
CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 4, 64, 16  # 320 images
GPU_DECODING = PreprocessConfig(train_crop_size=64, val_image_size=72, val_crop_size=64, dali_cpu=False)


def ampere_or_newer() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


def need_dali() -> None:
    if not _dali_installed():
        pytest.skip("NVIDIA DALI is not installed (pip install nvidia-dali-cuda120): its GPU decoder is not tested")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("gpu-data") / "imagenet", classes=CLASSES,
                             train_per_class=TRAIN_PER_CLASS, val_counts=(VAL_PER_CLASS,) * CLASSES, size=96)


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory) -> Path:
    need_dali()
    from train.dataset_tools.convert import convert
    out = tmp_path_factory.mktemp("gpu-shards") / "shards"
    convert(folder, out, train_shards=4, val_shards=2, workers=2, seed=0, progress=False)
    return out


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def gpu_loaders(data_dir: Path, batch: int = 16):
    data = DataConfig(data_dir=str(data_dir), num_classes=CLASSES,
                      dataloader=DataloaderConfig(name="dali", num_data_workers=2))
    return build_loaders(data, GPU_DECODING, batch, 1, 0, seed=5, batch_format=ON_GPU)


# ------------------------------------------------------------------------------ DALI


@pytest.mark.parametrize("layout", ["folder", "shards"])
def test_dali_gpu_decoder_for_training_and_validation(layout, request):
    need_dali()
    loaders = gpu_loaders(request.getfixturevalue(layout))
    assert loaders.train.runner.spec.decoder_device == "mixed"
    assert "GiB of device memory reserved" in loaders.build_before_training(False)
    loaders.set_epoch(0, 0)
    batches = list(loaders.train)
    assert len(batches) == CLASSES * TRAIN_PER_CLASS // 16
    for images, labels in batches:
        assert images.is_cuda and images.dtype == torch.float32 and images.shape == (16, 3, 64, 64)
        assert torch.isfinite(images).all() and 0 <= labels.min() and labels.max() < CLASSES
    seen = sum(len(labels) for images, labels in loaders.val if images.is_cuda)
    assert seen == CLASSES * VAL_PER_CLASS


@pytest.mark.parametrize("dali_cpu", [True, "auto"])
def test_dali_hands_over_channels_last_float16_batches_and_labels_on_the_gpu(folder, dali_cpu):
    """Issue 24, item 2: a channels_last model under autocast gets its batches from DALI as they
    go in (NHWC float16 on the GPU, labels there too), with CPU decoding (moved to the GPU inside
    DALI) as with GPU decoding; to_device then copies nothing."""
    need_dali()
    data = DataConfig(data_dir=str(folder), num_classes=CLASSES,
                      dataloader=DataloaderConfig(name="dali", num_data_workers=2))
    preprocess = dataclasses.replace(GPU_DECODING, dali_cpu=dali_cpu)
    fmt = BatchFormat(torch.device("cuda", 0), channels_last=True, dtype=torch.float16)
    loaders = build_loaders(data, preprocess, 16, 1, 0, seed=5, batch_format=fmt)
    assert loaders.train.runner.spec.decoder_device == ("cpu" if dali_cpu is True else "mixed")
    loaders.set_epoch(0, 0)
    for stream in (loaders.train, loaders.val):
        images, labels = next(iter(stream))
        assert images.is_cuda and labels.is_cuda and images.dtype == torch.float16 and labels.dtype == torch.int64
        assert images.is_contiguous(memory_format=torch.channels_last) and images.shape[1] == 3
        assert torch.isfinite(images).all() and images.abs().max() < 3
        handed, _ = to_device(images, labels, fmt.device, channels_last=True)
        assert handed is images


def test_the_hf_loader_copies_bytes_on_a_side_stream_and_normalises_on_the_gpu(folder):
    """Issue 24, item 3: the HF loader's uint8 batches, pinned, copied one ahead on a side stream
    and normalised on the GPU, equal the CPU's normalisation of the same batches."""
    data = DataConfig(data_dir=str(folder), num_classes=CLASSES, dataloader=DataloaderConfig(name="hf",
                                                                                              num_data_workers=2))
    preprocess = PreprocessConfig(train_crop_size=64, val_image_size=72, val_crop_size=64)
    fmt = BatchFormat(torch.device("cuda", 0), channels_last=True)
    on_gpu = build_loaders(data, preprocess, 16, 1, 0, seed=5, batch_format=fmt)
    on_cpu = build_loaders(data, preprocess, 16, 1, 0, seed=5)
    for loaders in (on_gpu, on_cpu):
        loaders.set_epoch(0, 0)
    for (images, labels), (cpu_images, cpu_labels) in zip(on_gpu.train, on_cpu.train):
        assert images.is_cuda and images.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(images.cpu(), cpu_images, rtol=0, atol=1e-6)
        assert torch.equal(labels.cpu(), cpu_labels)


def test_dali_mid_epoch_checkpoint_restores_exactly_on_the_gpu(folder):
    need_dali()
    expected, restored = batches_around_a_restore(lambda: gpu_loaders(folder), stop_after=5, epochs=2)
    assert len(restored) == len(expected) > 5
    for (a, la), (b, lb) in zip(expected, restored):
        assert a.is_cuda and torch.equal(a, b) and torch.equal(la, lb)


# ------------------------------------------------------------------ mixed-precision steps


@pytest.fixture(scope="module", params=["bf16", "fp16"])
def precision_run(request, tmp_path_factory) -> dict:
    if request.param == "bf16" and not ampere_or_newer():
        pytest.skip("bf16 needs compute capability 8.0 (Ampere) or newer")
    out = tmp_path_factory.mktemp("gpu-worker") / f"{request.param}.json"
    result = subprocess.run([sys.executable, str(WORKER), request.param, str(out)], cwd=REPO, env=clean_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("arch", ["resnet50", "vgg16_bn", "vit_base_patch16_224"])
def test_mixed_precision_steps_give_finite_losses_and_move_the_weights(precision_run, arch):
    run = precision_run["models"][arch]
    assert all(math.isfinite(loss) for loss in run["losses"]), run
    assert any(run["updated"]), run  # fp16 may skip a first step while the loss scale settles
    assert run["moved"] > 0, run


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_sam_under_fp16_skips_a_forced_overflow_and_goes_on(precision_run, version):
    if precision_run["precision"] != "fp16":
        pytest.skip("the overflow case is fp16's")
    sam = precision_run["sam"][version]
    assert sam["first"] and sam["last"] and math.isfinite(sam["last_loss"]), sam
    assert not sam["forced"] and sam["moved_by_forced"] == 0, sam
    assert sam["scale_after"] < 3e38, sam  # backed off


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_fused_fp16_step_counts_a_forced_overflow_on_the_device(precision_run, name):
    """Fused SGD/AdamW on CUDA (issue 24): an overflowed step leaves the weights as they were,
    reports itself taken, and is counted once on the device for the lr schedule to take back."""
    if precision_run["precision"] != "fp16":
        pytest.skip("the overflow case is fp16's")
    fused = precision_run["fused"][name]
    assert fused["fused"] and fused["forced"] and fused["moved_by_forced"] == 0, fused
    assert fused["skipped"] == 1 and math.isfinite(fused["last_loss"]) and fused["moved_by_last"] > 0, fused


def test_dali_cpu_auto_decodes_on_the_gpu(folder):
    """A config without dali_cpu (default "auto") decodes with DALI's mixed decoder on a GPU node."""
    need_dali()
    data = DataConfig(data_dir=str(folder), num_classes=CLASSES, dataloader=DataloaderConfig(name="dali"))
    preprocess = PreprocessConfig(train_crop_size=64, val_image_size=72, val_crop_size=64)
    loaders = build_loaders(data, preprocess, 16, 1, 0, seed=5, batch_format=ON_GPU)
    assert loaders.train.runner.spec.decoder_device == "mixed"
    loaders.set_epoch(0, 0)
    images, _ = next(iter(loaders.train))
    assert images.is_cuda


# -------------------------------------------------------------------- whole runs


def run_configs(tmp_path: Path, folder: Path, loader: str = "hf", **train) -> list[str]:
    values = {"batch_size": 32, "max_epochs": 2, "lr": 0.05, "use_amp": "true"}
    values.update(train)
    data = write(tmp_path / "data.toml", data_toml(folder, num_classes=CLASSES, workers=2).replace(
        '"hf"', f'"{loader}"'))
    body = tiny_train_toml(**values).replace("train_crop_size = 32", "train_crop_size = 64").replace(
        "val_image_size = 36", "val_image_size = 72").replace("val_crop_size = 32", "val_crop_size = 64")
    return ["--data-cfg", str(data), "--train-cfg", str(write(tmp_path / "train.toml", body)),
            "--output-dir", str(tmp_path / "run")]


def finished(result: subprocess.CompletedProcess, run_dir: Path) -> list[dict]:
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(run_dir / "metrics.jsonl")
    assert records and all(math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"]) for r in records)
    return records


def test_schedule_free_recalibrates_batchnorm_under_bf16(folder, tmp_path):
    if not ampere_or_newer():
        pytest.skip("bf16 needs compute capability 8.0 (Ampere) or newer")
    args = run_configs(tmp_path, folder, num_samples_for_stats=64)
    train_toml = Path(args[3])
    train_toml.write_text(train_toml.read_text().replace(
        '[optim]\nname = "sgd"\nmomentum = 0.9\nweight_decay = 1e-4',
        '[optim]\nname = "sgd-schedule-free"\nmomentum = 0.9\nweight_decay = 1e-4\nwarmup_epochs = 1').replace(
        'name = "cosine"\nwarmup_epochs = 0.5', 'name = "constant"'))
    result = run_train(args, ACCELERATE_MIXED_PRECISION="bf16")
    finished(result, tmp_path / "run")
    assert "mixed precision bf16" in result.stdout
    assert "BatchNorm statistics recomputed for the averaged weights over 64 training samples" in result.stdout


def exported_model_loads(run_dir: Path) -> None:
    import timm
    from safetensors.torch import load_file
    names = list(load_file(str(run_dir / "model" / "model.safetensors")))
    assert not [n for n in names if n.startswith(("_orig_mod.", "module."))], names[:3]
    model = timm.create_model(f"local-dir:{run_dir / 'model'}", pretrained=True).cuda().eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64, device="cuda")).shape == (2, CLASSES)


def test_compile_on_one_process(folder, tmp_path):
    result = run_train(run_configs(tmp_path, folder, compile="true", max_epochs=1))
    finished(result, tmp_path / "run")
    exported_model_loads(tmp_path / "run")


def test_sync_bn_on_one_process(folder, tmp_path):
    result = run_train(run_configs(tmp_path, folder, sync_bn="true", max_epochs=1))
    finished(result, tmp_path / "run")


def test_a_killed_run_resumes_and_exports_a_model_timm_loads(folder, tmp_path):
    loader = "dali" if _dali_installed() else "hf"
    args = run_configs(tmp_path, folder, loader, max_epochs=3) + ["--set", "train.log.checkpoint_every_steps=4"]
    run_dir = tmp_path / "run"
    env = clean_env(XDG_CACHE_HOME=str(tmp_path / "cache"))
    process = subprocess.Popen([sys.executable, "-m", "train", *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (run_dir / "checkpoints" / "00000004" / MANIFEST).exists(), process, timeout=300)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert not (run_dir / "model").exists()
    resumed_from = latest_valid_checkpoint(run_dir)
    result = run_train(args, XDG_CACHE_HOME=str(tmp_path / "cache"))
    records = finished(result, run_dir)
    assert f"resumed from {resumed_from}" in result.stdout
    assert [r["epoch"] for r in records] == [1, 2, 3]
    exported_model_loads(run_dir)

