"""The DALI loader on the CPU, both readers: what each batch holds, which samples each
process reads, mid-epoch save/restore, and every kind of bad input.

Most tests use solid-colour images whose colour encodes the image's number: random crops,
resizing and flips leave a solid colour as it is, so every training sample can be told
apart after augmentation, and which images an epoch read can be checked exactly.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import batches_around_a_restore, make_image_folder
from nvidia.dali.pipeline import Pipeline
from PIL import Image
from seed_format import write_seed_shards
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD

import train.data
from train.config import DataConfig, DataloaderConfig, PreprocessConfig, UserError
from train.data import build_loaders, check_supported, dali
from train.data.dali import DaliTrainLoader, FolderSource, PipelineSpec, define_pipeline
from train.data.device import BatchFormat, to_device
from train.data.folder import DataError
from train.data.shards import index_path
from train.dataset_tools.convert import convert

PREPROCESS = PreprocessConfig(train_crop_size=16, val_image_size=20, val_crop_size=16)
STEP = 16  # colour levels between image numbers; JPEG moves a flat colour by 1 or 2 levels


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Verification results go to a cache of the test's own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def colour_of(number: int) -> tuple[int, int, int]:
    return (8 + STEP * (number % 15), 8 + STEP * (number // 15 % 15), 128)


def make_colour_folder(root: Path, train_counts=(9, 8, 8), val_counts=(5, 5, 5), classes=None) -> Path:
    """Solid 24x20 JPEGs; image n (numbered over both splits) has colour_of(n)."""
    classes = classes or [f"n{c:08d}" for c in range(len(train_counts))]
    number = 0
    for split, counts in (("train", train_counts), ("val", val_counts)):
        for name, count in zip(classes, counts):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.new("RGB", (24, 20), colour_of(number)).save(folder / f"img_{i:03d}.JPEG", quality=95)
                number += 1
    return root


def numbers_of(images: torch.Tensor) -> list[int]:
    """Image numbers back from normalized batches of solid-colour images."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    rgb = (images * std + mean).mul(255).mean(dim=(2, 3))
    red, green = ((rgb[:, :2] - 8) / STEP).round().long().unbind(1)
    return (red + 15 * green).tolist()


def loaders(root, batch=4, processes=1, rank=0, name="dali", workers=1, num_classes=3, preprocess=PREPROCESS):
    data = DataConfig(data_dir=str(root), num_classes=num_classes,
                      dataloader=DataloaderConfig(name=name, num_data_workers=workers))
    return build_loaders(data, preprocess, batch, processes, rank, seed=3)


@pytest.fixture(scope="module")
def colour_folder(tmp_path_factory):
    return make_colour_folder(tmp_path_factory.mktemp("colours") / "imagenet")


@pytest.fixture(scope="module")
def colour_shards(colour_folder, tmp_path_factory):
    dst = tmp_path_factory.mktemp("colour_shards") / "shards"
    convert(colour_folder, dst, train_shards=3, val_shards=2, workers=1, seed=0, progress=False)
    return dst


@pytest.fixture(scope="module")
def colour_seed_shards(colour_folder, tmp_path_factory):
    """The same images in the seed project's own shard format (binary labels, .tar.idx)."""
    return write_seed_shards(colour_folder, tmp_path_factory.mktemp("colour_seed_shards") / "imagenet-1k-wds")


@pytest.fixture(params=["folder", "shards", "seed shards"])
def dataset(request, colour_folder, colour_shards, colour_seed_shards):
    return {"folder": colour_folder, "shards": colour_shards, "seed shards": colour_seed_shards}[request.param]


TRAIN_LABELS = [0] * 9 + [1] * 8 + [2] * 8  # image n of the train split has this class
VAL_FIRST = 25  # val images are numbered from here


# ------------------------------------------------------------------ what a batch holds


def test_dali_is_supported_and_a_missing_install_is_explained(monkeypatch):
    config = DataConfig(data_dir="data", dataloader=DataloaderConfig(name="dali"))
    check_supported(config, "d.toml")
    monkeypatch.setattr(train.data, "_dali_installed", lambda: False)
    with pytest.raises(UserError, match="d.toml: .* needs NVIDIA DALI, which is not installed"):
        check_supported(config, "d.toml")




def test_batches_have_the_shapes_types_and_labels_the_loop_expects(dataset):
    built = loaders(dataset)
    # The seed's shards name no classes: they are numbered.
    named = dataset.name != "imagenet-1k-wds"
    assert built.class_names == (("n00000000", "n00000001", "n00000002") if named else ("0", "1", "2"))
    assert (built.num_train, built.num_val, built.steps_per_epoch) == (25, 15, 25 // 4)
    batches = list(built.train)
    assert len(batches) == built.steps_per_epoch
    for images, labels in batches:
        assert images.shape == (4, 3, 16, 16) and images.dtype == torch.float32
        assert labels.shape == (4,) and labels.dtype == torch.int64
        # the label is the class of that very image
        assert labels.tolist() == [TRAIN_LABELS[n] for n in numbers_of(images)]
    val = list(built.val)
    assert [len(labels) for _, labels in val] == [4, 4, 4, 3]
    assert all(images.shape[1:] == (3, 16, 16) for images, _ in val)


def test_training_epochs_read_disjoint_samples_and_reshuffle(dataset):
    built = loaders(dataset)
    epochs = []
    for epoch in range(3):
        built.set_epoch(epoch, 0)
        epochs.append([n for images, _ in built.train for n in numbers_of(images)])
    for numbers in epochs:
        assert len(numbers) == 24 and len(set(numbers)) == 24  # no image twice in an epoch
        assert set(numbers) <= set(range(25))
    assert epochs[0] != epochs[1] != epochs[2]


@pytest.mark.parametrize("processes", [2, 3])
def test_processes_run_equal_steps_on_disjoint_shards(dataset, processes):
    # 25 images, per-process batch 3: shards of 12/13 (or 8/8/9) images, 25 // (3 * processes) steps each.
    per_rank = [loaders(dataset, batch=3, processes=processes, rank=r) for r in range(processes)]
    steps = 25 // (3 * processes)
    for epoch in range(3):  # the dropped ragged end must not shift later epochs
        seen = []
        for built in per_rank:
            built.set_epoch(epoch, 0)
            batches = list(built.train)
            assert len(batches) == built.steps_per_epoch == steps
            seen += [n for images, _ in batches for n in numbers_of(images)]
        assert len(seen) == len(set(seen)) == steps * 3 * processes


@pytest.mark.parametrize("processes", [1, 2, 3])
def test_validation_reads_every_image_exactly_once(dataset, processes):
    seen = Counter()
    for rank in range(processes):
        built = loaders(dataset, processes=processes, rank=rank)
        for _ in range(2):  # and again at the next evaluation
            for images, labels in built.val:
                numbers = numbers_of(images)
                assert labels.tolist() == [(n - VAL_FIRST) // 5 for n in numbers]
                seen.update(numbers)
    assert seen == Counter({n: 2 for n in range(VAL_FIRST, VAL_FIRST + 15)})


def test_class_order_and_validation_images_agree_with_the_hf_loader(tmp_path):
    # Names whose sorted order is not the order they were made in.
    root = make_colour_folder(tmp_path / "d", classes=["b_cls", "a_cls", "C_cls"])
    dali, hf = loaders(root), loaders(root, name="hf", workers=0)
    assert dali.class_names == hf.class_names == ("C_cls", "a_cls", "b_cls")
    dali_val = [(numbers_of(images), labels.tolist()) for images, labels in dali.val]
    hf_val = [(numbers_of(images), labels.tolist()) for images, labels in hf.val]
    assert dali_val == hf_val  # same images, same order, same labels
    dali_images = torch.cat([i for i, _ in dali.val])
    hf_images = torch.cat([i for i, _ in hf.val])
    assert (dali_images - hf_images).abs().max() < 0.1


def test_training_augmentation_crops_resizes_and_flips(tmp_path):
    # Left half red, right half blue: flips swap the sides, crops move the border.
    root = tmp_path / "d"
    for split in ("train", "val"):
        (root / split / "c").mkdir(parents=True)
        image = Image.new("RGB", (64, 48), (255, 0, 0))
        image.paste((0, 0, 255), (32, 0, 64, 48))
        for i in range(16):
            image.save(root / split / "c" / f"{i}.JPEG", quality=95)
    built = loaders(root, batch=16, num_classes=1)
    images, _ = next(iter(built.train))
    red_left = images[:, 0, :, :4].mean(dim=(1, 2)) > images[:, 2, :, :4].mean(dim=(1, 2))
    assert 0 < red_left.sum() < 16  # some flipped, some not
    border = (images[:, 0] > 0).float().mean(dim=(1, 2))  # share of red pixels: where the crop fell
    assert len(set(border.mul(16).round().tolist())) > 3


# ---------------------------------------------------------------------- CPU and GPU decoding


GPU_DECODING = PreprocessConfig(train_crop_size=16, val_image_size=20, val_crop_size=16, dali_cpu=False,
                                dali_hw_decoder_load=0.5, dali_preallocate_width_hint=640,
                                dali_preallocate_height_hint=480)


def test_without_cuda_gpu_decoding_falls_back_to_the_cpu_and_says_so(colour_folder, monkeypatch, caplog):
    monkeypatch.setattr(dali, "_announced", False)
    with caplog.at_level("INFO", logger="train"):
        built = loaders(colour_folder, preprocess=GPU_DECODING)  # training on the CPU (the default format)
        loaders(colour_folder, preprocess=GPU_DECODING)
    images, _ = next(iter(built.train))
    assert images.device.type == "cpu"
    said = [r.getMessage() for r in caplog.records if "no CUDA device" in r.getMessage()]
    assert said == ["DALI: no CUDA device, so every operator runs on the CPU "
                    "(train.preprocess.dali_cpu = false does not apply)"]


@pytest.mark.parametrize("dali_cpu, cuda, on_cpu", [("auto", True, False), ("auto", False, True),
                                                     (True, True, True), (False, True, False),
                                                     (True, False, True), (False, False, True)])
def test_dali_cpu_auto_decodes_on_the_gpu_whenever_cuda_is_there(dali_cpu, cuda, on_cpu):
    """The decision behind `preprocess.dali_cpu`: "auto" (the default) is GPU decoding on a GPU
    node, CPU decoding elsewhere; true/false force it where CUDA exists."""
    assert dali.decodes_on_cpu(dali_cpu, cuda) is on_cpu


def test_auto_chooses_the_gpu_decoder_on_a_cuda_node_and_says_so(monkeypatch, caplog):
    """Training on a GPU (device 3, named without touching CUDA), the default "auto" gives the
    GPU decoder this process's device and the start-up log names the choice; true decodes on
    the CPU and still hands the batches over on the GPU."""
    monkeypatch.setattr(dali, "_announced", False)
    on_gpu = BatchFormat(torch.device("cuda", 3))
    with caplog.at_level("INFO", logger="train"):
        assert dali.choose_device(PreprocessConfig().dali_cpu, on_gpu) == (3, False)
        assert dali.choose_device(True, on_gpu) == (3, True)
    assert dali.choose_device("auto", BatchFormat()) == (None, True)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("DALI:")]
    assert said == ['DALI: JPEG decoding on the GPU (DALI\'s mixed decoder), as train.preprocess.dali_cpu = "auto"']
    assert dali.describe_decoding(True, True) == ("DALI: JPEG decoding on the CPU, flip and normalisation on the "
                                                  "GPU, as train.preprocess.dali_cpu = true")
    assert dali.describe_decoding("auto", False) == ('DALI: no CUDA device, so every operator runs on the CPU '
                                                     '(train.preprocess.dali_cpu = "auto")')


def test_batches_leave_dali_in_the_models_layout_and_dtype_and_to_device_copies_nothing(colour_folder):
    """A channels_last model under autocast gets NHWC float16 batches straight from DALI (CPU
    here; on a GPU the same pipeline ends there): the same images as the float32 NCHW pipeline's,
    and the loop's to_device hands them on as they are, without a second copy."""
    data = DataConfig(data_dir=str(colour_folder), num_classes=3, dataloader=DataloaderConfig(name="dali"))

    def first_batches(fmt: BatchFormat):
        built = build_loaders(data, PREPROCESS, 4, 1, 0, seed=3, batch_format=fmt)
        return next(iter(built.train)), next(iter(built.val))
    (plain, _), (plain_val, _) = first_batches(BatchFormat())
    (images, labels), (val, _) = first_batches(BatchFormat(torch.device("cpu"), channels_last=True,
                                                           dtype=torch.float16))
    for got, reference in ((images, plain), (val, plain_val)):
        assert got.dtype == torch.float16 and got.shape == reference.shape
        assert got.is_contiguous(memory_format=torch.channels_last) and not got.is_contiguous()
        torch.testing.assert_close(got.float(), reference, rtol=2e-3, atol=2e-3)
    handed, handed_labels = to_device(images, labels, torch.device("cpu"), channels_last=True)
    assert handed is images and handed_labels is labels


def nodes_by_operator(node, found=None) -> dict[str, list]:
    """The DALI graph behind ``node``: operator name (CropMirrorNormalize, ...) -> the output
    nodes of that operator that feed the pipeline, with their device ("cpu", "gpu")."""
    found = {} if found is None else found
    found.setdefault(node.name.strip("_").rsplit("_", 1)[0].split("[")[0], []).append(node)
    for upstream in node.source._inputs:
        nodes_by_operator(upstream, found)
    return found


@pytest.mark.parametrize("decode_on_cpu", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_on_a_gpu_dali_flips_and_normalises_there_and_hands_labels_over_there(colour_folder, decode_on_cpu, training):
    """Training on a GPU, both outputs end on it: with dali_cpu = true the images are decoded and
    resized on the CPU, then moved inside DALI (as NVIDIA's examples do) before the flip and the
    normalisation, rather than copied over by the loop as float32; the labels follow as int64.
    (Defined, not built: building needs the GPU.)"""
    source = FolderSource(colour_folder, (str(colour_folder / "val" / "n00000000" / "img_000.JPEG"),), (0,))
    spec = PipelineSpec(source=source, training=training, preprocess=PREPROCESS, batch_size=1, num_threads=1,
                        prefetch=1, shard_id=0, num_shards=1, seed=0, device_id=0, decode_on_cpu=decode_on_cpu)
    with Pipeline(batch_size=1, num_threads=1, device_id=0):
        images, labels = dali.pipeline_outputs(spec)
    assert (images.device, labels.device) == ("gpu", "gpu")
    graph = nodes_by_operator(images)
    (decoded,) = graph["ImageRandomCrop" if training else "Image"]
    assert decoded.device == ("cpu" if decode_on_cpu else "gpu")
    (normalise_input,) = images.source._inputs[:1]
    assert normalise_input.device == "gpu"
    assert nodes_by_operator(labels)["Cast"][0].device == "gpu"


def test_a_gpu_pipeline_runs_on_the_compute_stream_without_a_host_wait(colour_folder, monkeypatch):
    """On a GPU, ``pipe.run`` is given the compute stream (DALI binds its outputs to it, and the
    stream, not the host, waits for them), where the installed DALI's executor allows it."""
    compute = object()
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)
    source = FolderSource(colour_folder, (), ())
    spec = PipelineSpec(source=source, training=True, preprocess=PREPROCESS, batch_size=1, num_threads=1,
                        prefetch=1, shard_id=0, num_shards=1, seed=0, device_id=0)
    runner = dali._Runner(spec)

    class Built:  # what a built pipeline says of itself
        exec_dynamic = True
    runner.pipe = Built()
    assert runner.output_stream() == (compute,)
    Built.exec_dynamic = False  # an executor that cannot bind outputs to a stream
    assert runner.output_stream() == ()
    runner.spec = dataclasses.replace(spec, device_id=None)  # training on the CPU
    assert runner.output_stream() == ()


@pytest.mark.parametrize("training", [True, False])
def test_gpu_decoding_pipeline_is_well_formed(colour_folder, training):
    # Defining a pipeline checks every operator argument, so this guards the mixed
    # decoder's options on machines without a GPU, where it cannot be built.
    source = FolderSource(colour_folder, (str(colour_folder / "val" / "n00000000" / "img_000.JPEG"),), (0,))
    spec = PipelineSpec(source=source, training=training, preprocess=GPU_DECODING, batch_size=1, num_threads=1,
                        prefetch=1, shard_id=0, num_shards=1, seed=0, device_id=0)
    assert spec.decoder_device == "mixed"
    assert define_pipeline(spec) is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_decoding_gives_cuda_batches(colour_folder):
    built = loaders(colour_folder, preprocess=GPU_DECODING)
    images, labels = next(iter(built.train))
    assert images.device.type == "cuda" and images.shape == (4, 3, 16, 16)
    assert labels.tolist() == [TRAIN_LABELS[n] for n in numbers_of(images.cpu())]
    assert sum(len(labels) for _, labels in built.val) == 15


# ----------------------------------------------------------------- mid-epoch save/restore


def test_batches_after_a_mid_epoch_restore_are_identical(dataset):
    expected, restored = batches_around_a_restore(lambda: loaders(dataset), stop_after=3, epochs=2)
    assert len(restored) == len(expected) > 3
    for (a, la), (b, lb) in zip(expected, restored):
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_restoring_another_process_layout_is_refused(colour_folder):
    state = loaders(colour_folder).state_dict()
    other = loaders(colour_folder, processes=2, rank=1)
    with pytest.raises(DataError, match="same number of processes"):
        other.load_state_dict(state)


def test_train_stats_stream_leaves_the_training_position_alone(colour_folder):
    built = loaders(colour_folder)
    first = [numbers_of(i) for i, _ in built.train]
    built.set_epoch(1, 0)
    it = iter(built.train)
    second_head = numbers_of(next(it)[0])
    stats = [numbers_of(i) for i, _ in built.train_stats()]
    assert stats == first  # a fresh pass from the start
    second_rest = [numbers_of(i) for i, _ in it]
    control = loaders(colour_folder)
    list(control.train)
    control.set_epoch(1, 0)
    assert [second_head] + second_rest == [numbers_of(i) for i, _ in control.train]


# -------------------------------------------------------------------------- bad input


def damage(path: Path, how: str) -> None:
    if how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "zero-byte":
        path.write_bytes(b"")
    elif how == "not an image":
        path.write_text("<html><body>404 Not Found</body></html>\n")


@pytest.mark.parametrize("how, reason", [("truncated", "truncated"), ("zero-byte", "empty file"),
                                         ("not an image", "not an image")])
def test_bad_files_are_found_before_dali_reads_them(tmp_path, how, reason):
    root = make_image_folder(tmp_path / "d", classes=3, train_per_class=4, val_counts=(2, 2, 2), size=48)
    bad = root / "train" / "n00000001" / "img_0002.JPEG"
    damage(bad, how)
    with pytest.raises(DataError) as error:
        loaders(root)
    message = str(error.value)
    assert len(message.splitlines()) == 1
    assert str(bad) in message and reason in message and f"python -m train.data.check {root}" in message


def test_verification_is_cached_by_size_and_modification_time(tmp_path):
    from train.data.verify import default_cache_file, verify_files
    root = make_image_folder(tmp_path / "d", classes=2, train_per_class=3, val_counts=(1, 1))
    paths = sorted(str(p) for p in root.rglob("*.JPEG"))
    decoded = []
    assert verify_files(paths, root, default_cache_file(root), 2, on_start=decoded.append) == []
    assert verify_files(paths, root, default_cache_file(root), 2, on_start=decoded.append) == []
    assert decoded == [len(paths)]  # the second pass decoded nothing
    damage(Path(paths[0]), "truncated")
    problems = verify_files(paths, root, default_cache_file(root), 2, on_start=decoded.append)
    assert decoded == [len(paths), 1] and [p.path for p in problems] == [paths[0]]


def test_a_file_dali_cannot_read_is_named_even_past_verification(tmp_path):
    # Bypasses the verification pass to show the second line of defence: DALI's own error,
    # turned into a one-line message naming the file.
    root = make_image_folder(tmp_path / "d", classes=1, train_per_class=4, val_counts=(1,))
    files = sorted(str(p) for p in (root / "train").rglob("*.JPEG"))
    Path(files[1]).write_bytes(b"")
    spec = PipelineSpec(source=FolderSource(root, tuple(files), (0,) * 4), training=True, preprocess=PREPROCESS,
                        batch_size=4, num_threads=1, prefetch=1, shard_id=0, num_shards=1, seed=0, device_id=None)
    with pytest.raises(DataError) as error:
        next(iter(DaliTrainLoader(spec, 1)))
    assert files[1] in str(error.value) and "python -m train.data.check" in str(error.value)


def test_valid_oddities_decode_cmyk_greyscale_and_png_named_jpeg(tmp_path):
    root = tmp_path / "d"
    colour = (200, 40, 90)
    for split in ("train", "val"):
        folder = root / split / "c"
        folder.mkdir(parents=True)
        solid = Image.new("RGB", (32, 24), colour)
        solid.convert("CMYK").save(folder / "cmyk.JPEG", "JPEG", quality=95)
        solid.convert("L").save(folder / "grey.JPEG", "JPEG", quality=95)
        solid.save(folder / "png.JPEG", "PNG")
        solid.save(folder / "plain.JPEG", "JPEG", quality=95)
    built = loaders(root, num_classes=1)
    (images, labels), = list(built.val)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    rgb = (images * std + mean).mul(255).mean(dim=(2, 3))
    grey = round(0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2])
    expected = {"cmyk": colour, "grey": (grey,) * 3, "plain": colour, "png": colour}  # files in sorted order
    for row, name in zip(rgb.tolist(), sorted(expected)):
        assert row == pytest.approx(expected[name], abs=4), name


# ------------------------------------------------------------------------------ shards


@pytest.fixture
def shard_copy(colour_shards, tmp_path):
    import shutil
    return Path(shutil.copytree(colour_shards, tmp_path / "shards"))


def test_missing_shard_index_is_a_one_line_error(shard_copy):
    index = index_path(shard_copy / "train-00001.tar")
    index.unlink()
    with pytest.raises(DataError, match=f"{index} is missing.*python -m train.data.check"):
        loaders(shard_copy)


@pytest.mark.parametrize("how", ["archive replaced", "samples counted differently"])
def test_stale_shard_index_is_a_one_line_error(shard_copy, how):
    tar = shard_copy / "train-00001.tar"
    index = index_path(tar)
    if how == "archive replaced":
        # Another archive with fewer samples: the index's last entry now points at its end blocks.
        tar.write_bytes((shard_copy / "val-00000.tar").read_bytes())
    else:
        index.write_text(index.read_text().replace("v1.2 8", "v1.2 7", 1))
    with pytest.raises(DataError, match=f"{index} is stale.*python -m train.data.check"):
        loaders(shard_copy)


def test_shards_copied_without_their_dates_still_load(shard_copy, tmp_path):
    # cp -r without -p: each .idx is copied, and so dated, before its .tar.
    import shutil
    copy = tmp_path / "copied"
    copy.mkdir()
    for path in sorted(shard_copy.iterdir()):
        shutil.copyfile(path, copy / path.name)
    assert sum(len(labels) for _, labels in loaders(copy).val) == 15


def test_hf_loader_refuses_shards_with_a_clear_error(colour_shards):
    with pytest.raises(DataError, match="holds WebDataset shards, which only"):
        loaders(colour_shards, name="hf", workers=0)
