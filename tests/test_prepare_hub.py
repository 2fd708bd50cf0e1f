"""`python -m train.data.prepare hub`: preparing a Hub data set (or a local data set folder) for the hf loader.

The Hub cannot be reached from the test machine, so the data sets are local folders laid out like a
Hub repo (data/<split>-00000-of-00001.parquet), read through the same datasets.load_dataset code path.
Every test runs with the Hugging Face caches in tmp_path and offline mode on, except the one that
points the libraries at a stand-in Hub on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import datasets
import huggingface_hub
import pytest
import torch
from helpers import REPO, write
from PIL import Image

from train.config import DataloaderConfig, PreprocessConfig, load_data_config
from train.data import build_loaders
from train.data.hf import hub_tables
from train.dataset_tools.hub_source import HubSourceError, add_hub_arguments, check_free_space, run_hub

PREPROCESS = PreprocessConfig(train_crop_size=32, val_image_size=36, val_crop_size=32)
CLASSES = ("cat", "dog", "fox")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_hub_arguments(parser)
    return parser.parse_args(argv)


def write_data_set(folder: Path, split_sizes: dict[str, int], image_column: str = "image", label_column: str = "label",
                   label_feature=None, labels: dict[str, list[int]] | None = None) -> Path:
    """A data set folder as on the Hub: one parquet file per split, images with class labels."""
    features = datasets.Features({image_column: datasets.Image(),
                                  label_column: label_feature or datasets.ClassLabel(names=list(CLASSES))})
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for split, size in split_sizes.items():
        images = [Image.new("RGB", (24, 20), ((37 * i) % 256, 90, 160)) for i in range(size)]
        split_labels = (labels or {}).get(split, [i % len(CLASSES) for i in range(size)])
        table = datasets.Dataset.from_dict({image_column: images, label_column: split_labels}, features=features)
        table.to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))
    return folder


@pytest.fixture
def hf_caches(tmp_path, monkeypatch) -> Path:
    """Both Hugging Face caches under tmp_path, offline mode on; returns the datasets (Arrow) cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # datasets and huggingface_hub read the variables when first imported: set the values they use too.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    return tmp_path / "datasets-cache"


def test_arguments_default_to_the_trainers_dataloader_keys():
    """Without options the command prepares the splits and columns that the trainer reads by default."""
    args = parse(["ILSVRC/imagenet-1k"])
    defaults = DataloaderConfig()
    assert (args.train_split, args.val_split, args.image_column, args.label_column) == \
        (defaults.train_split, defaults.val_split, defaults.image_column, defaults.label_column)
    assert args.token is None and args.write_config is None
    with pytest.raises(SystemExit) as exit_info:
        parse(["ILSVRC/imagenet-1k", "--num-proc", "0"])
    assert exit_info.value.code == 2


def test_prepares_a_data_set_and_writes_a_config_the_trainer_loads(hf_caches, tmp_path, capsys):
    folder = write_data_set(tmp_path / "tiny-set", {"train": 12, "validation": 6, "test": 4},
                            labels={"test": [-1] * 4})
    config = tmp_path / "configs" / "tiny-hub.toml"
    assert run_hub(parse([f"hf-hub:{folder}", "--num-proc", "1", "--write-config", str(config)])) == 0
    out = capsys.readouterr().out
    assert "classes     3 (cat; dog; fox)" in out
    assert "train       12 images in split 'train', 4-4 per class" in out
    assert "validation  6 images in split 'validation', 2-2 per class" in out
    assert "split(s) test: prepared by datasets as well, not used by the trainer" in out
    arrow_dirs = [path.parent for path in hf_caches.rglob("tiny-set-train.arrow")]
    assert len(arrow_dirs) == 1 and f"Arrow copy  {arrow_dirs[0]} (" in out
    assert f"wrote {config}" in out

    data = load_data_config(config)
    assert (data.data_dir, data.num_classes) == (f"hf-hub:{folder}", 3)
    loader = data.dataloader
    assert (loader.name, loader.train_split, loader.val_split, loader.image_column, loader.label_column) == \
        ("hf", "train", "validation", "image", "label")
    # The trainer's load_dataset(id, split=...) finds the copy prepared above instead of making another.
    train, val, names = hub_tables(data.data_dir[len("hf-hub:"):], data)
    assert Path(train.cache_files[0]["filename"]).parent == arrow_dirs[0]
    assert (len(train), len(val), names) == (12, 6, CLASSES)
    assert [path.parent for path in hf_caches.rglob("tiny-set-train.arrow")] == arrow_dirs
    data.dataloader.num_data_workers = 0  # the config's 8 workers are for ImageNet, not for a test
    loaders = build_loaders(data, PREPROCESS, 4, 1, 0, seed=0)
    images, labels = next(iter(loaders.train))
    assert images.shape == (4, 3, 32, 32) and labels.dtype == torch.int64
    assert (loaders.num_train, loaders.num_val) == (12, 6)


def test_other_split_and_column_names_go_into_the_config(hf_caches, tmp_path, capsys, monkeypatch):
    folder = write_data_set(tmp_path / "renamed", {"fit": 6, "check": 3}, image_column="img", label_column="cls")
    monkeypatch.chdir(tmp_path)  # a relative folder is written as an absolute one: training may start elsewhere
    assert run_hub(parse(["renamed", "--num-proc", "1", "--train-split", "fit", "--val-split", "check",
                          "--image-column", "img", "--label-column", "cls"])) == 0
    out = capsys.readouterr().out
    snippet = out[out.index("data_dir = "):]
    config = write(tmp_path / "printed.toml", snippet)
    assert load_data_config(config).data_dir == f"hf-hub:{folder}"
    loader = load_data_config(config).dataloader
    assert (loader.train_split, loader.val_split, loader.image_column, loader.label_column) == \
        ("fit", "check", "img", "cls")
    train, val, names = hub_tables(str(folder), load_data_config(config))
    assert (len(train), len(val)) == (6, 3)


@pytest.mark.parametrize("option, expected", [
    (["--val-split", "valid"],
     "has no split 'valid' (its splits: train, validation); pass --val-split with one of them"),
    (["--train-split", "training"],
     "has no split 'training' (its splits: train, validation); pass --train-split with one of them"),
    (["--image-column", "img"],
     "split 'train' of {folder} has no column 'img' (columns: image, label); pass --image-column with one of them"),
    (["--label-column", "class"],
     "split 'train' of {folder} has no column 'class' (columns: image, label); pass --label-column with one of them"),
])
def test_a_missing_split_or_column_is_named_in_one_line(hf_caches, tmp_path, option, expected):
    folder = write_data_set(tmp_path / "tiny-set", {"train": 6, "validation": 3})
    with pytest.raises(HubSourceError) as error:
        run_hub(parse([str(folder), "--num-proc", "1", *option]))
    message = str(error.value)
    assert "\n" not in message and str(folder) in message and expected.format(folder=folder) in message
    if "split" in option[0]:  # known from the data files: refused before anything is downloaded or written
        assert not list(hf_caches.rglob("*.arrow"))


def test_labels_must_be_class_labels_on_every_image(hf_caches, tmp_path):
    plain = write_data_set(tmp_path / "plain-ints", {"train": 6, "validation": 3},
                           label_feature=datasets.Value("int64"))
    with pytest.raises(HubSourceError, match="column 'label' of .*plain-ints holds Value\\(.*int64.*not a ClassLabel"):
        run_hub(parse([str(plain), "--num-proc", "1"]))
    unlabelled = write_data_set(tmp_path / "with-test", {"train": 6, "test": 3}, labels={"test": [-1, -1, 0]})
    with pytest.raises(HubSourceError, match="split 'test' of .*with-test has 2 images without a class label in "
                                             "'label' \\(-1: 2\\)"):
        run_hub(parse([str(unlabelled), "--num-proc", "1", "--val-split", "test"]))


def test_unknown_hub_id_while_offline_is_one_line(hf_caches):
    with pytest.raises(HubSourceError) as error:
        run_hub(parse(["no-such-org/no-such-set"]))
    assert str(error.value) == ("no-such-org/no-such-set is not in the local Hugging Face cache and HF_HUB_OFFLINE is "
                                "set: unset HF_HUB_OFFLINE to download it (set it only once the cache holds the data "
                                "set)")


def test_an_existing_config_file_is_refused_before_any_download(hf_caches, tmp_path):
    folder = write_data_set(tmp_path / "tiny-set", {"train": 6, "validation": 3})
    config = write(tmp_path / "mine.toml", "# my own notes\n")
    with pytest.raises(HubSourceError, match=f"--write-config {config}: already exists"):
        run_hub(parse([str(folder), "--write-config", str(config)]))
    assert config.read_text() == "# my own notes\n"
    assert not hf_caches.exists()


def test_official_imagenet_id_is_compared_with_the_ilsvrc2012_counts(hf_caches, tmp_path, capsys):
    """A copy of the cache stands in for one prepared from the Hub: datasets keeps Hub id ORG/NAME's Arrow
    copy under ORG___NAME and, offline, loads it from there (the path a training run takes)."""
    folder = write_data_set(tmp_path / "imagenet-1k", {"train": 12, "validation": 6})
    assert run_hub(parse([str(folder), "--num-proc", "1"])) == 0
    shutil.copytree(hf_caches / "imagenet-1k", hf_caches / "ILSVRC___imagenet-1k")
    shutil.copytree(hf_caches / "imagenet-1k", hf_caches / "someorg___imagenet-1k")
    capsys.readouterr()

    config = tmp_path / "imagenet-hub.toml"
    assert run_hub(parse(["ILSVRC/imagenet-1k", "--write-config", str(config)])) == 1
    out, err = capsys.readouterr()
    assert "train       12 images in split 'train'" in out and "downloads   none in the Hub cache" in out
    assert err.splitlines() == [
        "mismatch: classes: 3, but ILSVRC2012 has 1,000",
        "mismatch: images in split 'train': 12, but ILSVRC2012 has 1,281,167",
        "mismatch: images in split 'validation': 6, but ILSVRC2012 has 50,000",
        f"ILSVRC/imagenet-1k does NOT match the official ILSVRC2012 counts (see above); {config} not written"]
    assert not config.exists()

    assert run_hub(parse(["someorg/imagenet-1k", "--write-config", str(config)])) == 0
    assert "mismatch" not in capsys.readouterr().err
    data = load_data_config(config)
    assert data.data_dir == "hf-hub:someorg/imagenet-1k"
    train, val, names = hub_tables("someorg/imagenet-1k", data)
    assert (len(train), len(val), names) == (12, 6, CLASSES)


def test_free_space_is_checked_per_disk_before_downloading(tmp_path):
    check_free_space("ILSVRC/imagenet-1k", [(tmp_path / "hub" / "not-yet-made", 1000)])
    with pytest.raises(HubSourceError, match=f"ILSVRC/imagenet-1k needs about 1,000,000,000.0 GB more in {tmp_path}, "
                                             "which has .* free: free space, or point HF_HOME"):
        check_free_space("ILSVRC/imagenet-1k", [(tmp_path / "hub" / "not-yet-made", 10 ** 18)])
    # Two caches on one disk need the sum of their sizes, though each alone would fit.
    half = shutil.disk_usage(tmp_path).free // 2 + 10 ** 9
    check_free_space("ILSVRC/imagenet-1k", [(tmp_path / "datasets", half)])
    with pytest.raises(HubSourceError, match="needs about"):
        check_free_space("ILSVRC/imagenet-1k", [(tmp_path / "datasets", half), (tmp_path / "hub", half)])


class StandInHub(http.server.BaseHTTPRequestHandler):
    """Refuses like the Hub: 401 for a gated repo without a token, 403 for an account without access, else 404."""

    def refuse(self):
        if "/gated-org/needs-login/" in self.path:
            status, code = (403, "GatedRepo") if self.headers.get("authorization") else (401, "GatedRepo")
        elif "/gated-org/not-accepted/" in self.path:
            status, code = 403, "GatedRepo"
        else:
            status, code = 404, "RepoNotFound"
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", "refused by the stand-in Hub")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = refuse

    def log_message(self, *args):
        pass


def test_hub_refusals_are_one_line_each_and_never_show_the_token(tmp_path):
    """A real process, as the CLI runs it, against a stand-in Hub (HF_ENDPOINT is read at import time)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StandInHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{server.server_address[1]}", HF_HOME=str(tmp_path / "hf-home"),
               HF_HUB_DISABLE_TELEMETRY="1")
    script = ("import argparse, json, sys\n"
              "from train.config import UserError\n"
              "from train.dataset_tools.hub_source import add_hub_arguments, run_hub\n"
              "parser = argparse.ArgumentParser()\n"
              "add_hub_arguments(parser)\n"
              "for argv in json.loads(sys.argv[1]):\n"
              "    try:\n"
              "        print('status', run_hub(parser.parse_args(argv)))\n"
              "    except UserError as exc:\n"
              "        print(f'error: {exc}')\n")
    cases = [["gated-org/needs-login"], ["gated-org/not-accepted", "--token", "hf_standin_secret"],
             ["no-such-org/no-such-set"]]
    try:
        result = subprocess.run([sys.executable, "-c", script, json.dumps(cases)], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=120)
    finally:
        server.shutdown()
    page = f"{env['HF_ENDPOINT']}/datasets"
    assert result.stdout.splitlines() == [
        f"error: gated-org/needs-login is gated and no accepted token was sent: accept its terms on "
        f"{page}/gated-org/needs-login, then log in with `hf auth login` or pass --token (or set HF_TOKEN)",
        f"error: gated-org/not-accepted is gated and this token's account has not been granted access: accept its "
        f"terms on {page}/gated-org/not-accepted while logged in as that account, or use a token of an account that "
        "has",
        "error: no-such-org/no-such-set: no such data set on the Hub, or a private one this token cannot see: check "
        "the id (e.g. ILSVRC/imagenet-1k) or pass --token"], result.stderr[-2000:]
    assert "hf_standin_secret" not in result.stdout + result.stderr
