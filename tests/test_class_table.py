"""The class table (classes.tsv): reading and writing it, and its readable names travelling
from a data folder (or the shards converted from it) through training and checkpoints into
the exported model's ``label_descriptions``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import data_toml, make_image_folder, run_train, tiny_train_toml, write

from train import checkpoint as ckpt
from train.config import DataConfig, DataloaderConfig, PreprocessConfig, UserError
from train.data import build_loaders
from train.data.classes import CLASS_TABLE, class_descriptions, read_class_table, write_class_table
from train.data.shards import MANIFEST, open_shard_set
from train.dataset_tools import convert

WNIDS = ["n00000000", "n00000001", "n00000002"]
NAMES = ["tench, Tinca tinca", "goldfish, Carassius auratus", "crème brûlée"]  # non-ASCII on purpose
PREPROCESS = PreprocessConfig(train_crop_size=16, val_image_size=20, val_crop_size=16)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """DALI's verification results go to a cache of the test's own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def described_folder(tmp_path_factory) -> Path:
    """3 classes of 8 training and 2 validation images, with a class table."""
    root = make_image_folder(tmp_path_factory.mktemp("described") / "imagenet", train_per_class=8,
                             val_counts=(2, 2, 2), size=32)
    write_class_table(root, list(zip(WNIDS, NAMES)))
    return root


def loaders(root: Path, name: str):
    data = DataConfig(data_dir=str(root), num_classes=3, dataloader=DataloaderConfig(name=name, num_data_workers=1))
    return build_loaders(data, PREPROCESS, 4, 1, 0, seed=3)


# ------------------------------------------------------------------------- the table


def test_table_round_trip_in_class_order(tmp_path):
    path = write_class_table(tmp_path, list(zip(WNIDS, NAMES)))
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[:2] == ["index\twnid\tnames", "0\tn00000000\ttench, Tinca tinca"]
    assert read_class_table(tmp_path) == dict(zip(WNIDS, NAMES))
    # Descriptions follow the loader's class order, whatever order is asked for.
    assert class_descriptions(tmp_path, ("n00000002", "n00000000")) == (NAMES[2], NAMES[0])
    assert read_class_table(tmp_path / "elsewhere") is None and class_descriptions(tmp_path / "elsewhere", ("a",)) == ()
    with pytest.raises(ValueError, match="tabs and line breaks"):
        write_class_table(tmp_path, [("n1", "two\tfields")])


@pytest.mark.parametrize("text, message", [
    ("idx\twnid\tnames\n0\tn00000000\ttench\n", "classes.tsv: first line must be the header index<tab>wnid<tab>names"),
    ("index\twnid\tnames\n0\tn00000000\ttench\n2\tn00000001\tgoldfish\n", "classes.tsv, line 3: expected '1<tab>"),
    ("index\twnid\tnames\n0\tn00000000\n", "classes.tsv, line 2: expected '0<tab><wnid><tab><names>'"),
])
def test_a_malformed_table_is_a_one_line_error_naming_file_and_line(tmp_path, text, message):
    (tmp_path / CLASS_TABLE).write_text(text, encoding="utf-8")
    with pytest.raises(UserError) as error:
        read_class_table(tmp_path)
    assert message in str(error.value) and str(tmp_path / CLASS_TABLE) in str(error.value)
    assert "\n" not in str(error.value)


def test_a_table_missing_a_class_stops_the_loader_before_training(described_folder, tmp_path):
    write_class_table(tmp_path, list(zip(WNIDS[:2], NAMES[:2])))
    with pytest.raises(UserError, match=r"classes.tsv has no row for class folder\(s\) n00000002; re-run") as error:
        class_descriptions(tmp_path, tuple(WNIDS))
    assert "\n" not in str(error.value)
    folder = make_image_folder(tmp_path / "partial", train_per_class=4, val_counts=(1, 1, 1), size=16)
    write_class_table(folder, list(zip(WNIDS[:2], NAMES[:2])))
    with pytest.raises(UserError, match="has no row for class folder"):
        loaders(folder, "hf")


# ------------------------------------------------------------- training and export


@pytest.fixture(scope="module")
def described_run(described_folder, tmp_path_factory) -> Path:
    """One epoch (3 steps) of resnet18 at 32 px on the CPU, HF loader."""
    tmp = tmp_path_factory.mktemp("described_run")
    data = write(tmp / "data.toml", data_toml(described_folder))
    train = write(tmp / "train.toml", tiny_train_toml())
    result = run_train(["--data-cfg", str(data), "--train-cfg", str(train), "--output-dir", str(tmp / "run")])
    assert result.returncode == 0, result.stderr
    return tmp / "run"


def test_trained_model_carries_the_readable_names_through_timm(described_run):
    import timm
    model = timm.create_model(f"local-dir:{described_run / 'model'}", pretrained=True)
    assert list(model.pretrained_cfg["label_names"]) == WNIDS
    assert model.pretrained_cfg["label_descriptions"] == dict(zip(WNIDS, NAMES))
    assert "classes.tsv" in (described_run / "model" / "README.md").read_text()
    last = ckpt.list_checkpoints(described_run)[-1]
    assert ckpt.read_trainer_state(last).class_descriptions == NAMES


def test_export_command_writes_the_descriptions_from_the_checkpoint(described_run):
    from train.export import main as export_main
    last = ckpt.list_checkpoints(described_run)[-1]
    assert export_main([str(last)]) == 0
    config = json.loads((described_run / f"model-{last.name}" / "config.json").read_text())
    assert config["label_names"] == WNIDS and config["label_descriptions"] == dict(zip(WNIDS, NAMES))


def older_checkpoint(described_run: Path, tmp_path: Path) -> Path:
    """A copy of the run's last checkpoint as written before class tables: no class_descriptions."""
    import shutil
    old = tmp_path / "run" / ckpt.CHECKPOINTS / ckpt.list_checkpoints(described_run)[-1].name
    shutil.copytree(ckpt.list_checkpoints(described_run)[-1], old)
    state = json.loads((old / ckpt.TRAINER_STATE).read_text())
    del state["class_descriptions"]
    (old / ckpt.TRAINER_STATE).write_text(json.dumps(state))
    ckpt.write_manifest(old)  # an intact older checkpoint, not a damaged one
    return old


def test_checkpoints_written_before_descriptions_still_load_and_export_without_them(described_run, tmp_path):
    import timm

    from train.export import main as export_main
    old = older_checkpoint(described_run, tmp_path)
    state = ckpt.read_trainer_state(old)
    assert state.class_names == WNIDS and state.class_descriptions == []
    assert export_main([str(old), "--output", str(tmp_path / "model")]) == 0
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["label_names"] == WNIDS and "label_descriptions" not in config
    model = timm.create_model(f"local-dir:{tmp_path / 'model'}", pretrained=True)
    assert list(model.pretrained_cfg["label_names"]) == WNIDS and "label_descriptions" not in model.pretrained_cfg


def test_resuming_an_older_checkpoint_exports_the_current_table(described_run, described_folder, tmp_path):
    """A checkpoint from before class tables (no class_descriptions) resumed on a folder that
    has one: the final export takes the folder's names."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(described_run, run, ignore=shutil.ignore_patterns("model", ckpt.CHECKPOINTS))
    last = older_checkpoint(described_run, tmp_path)
    data = write(tmp_path / "data.toml", data_toml(described_folder))
    train = write(tmp_path / "train.toml", tiny_train_toml())
    result = run_train(["--data-cfg", str(data), "--train-cfg", str(train), "--output-dir", str(run),
                        "--set", "train.max_epochs=2"])
    assert result.returncode == 0, result.stderr
    assert f"resumed from {last}" in result.stderr + result.stdout
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["label_descriptions"] == dict(zip(WNIDS, NAMES))


def test_a_data_set_without_a_table_exports_no_descriptions(described_run, tmp_path):
    from train.config import load_config_text
    from train.export import timm_config
    from train.models import build_model
    plain = make_image_folder(tmp_path / "plain", train_per_class=4, val_counts=(1, 1, 1), size=16)
    assert loaders(plain, "hf").class_descriptions == ()
    config = load_config_text((described_run / "config.toml").read_text(encoding="utf-8"), "config.toml")
    model = build_model("resnet18", 3, 32, 32)
    assert "label_descriptions" not in timm_config(config, model, tuple(WNIDS), ())
    assert timm_config(config, model, tuple(WNIDS), tuple(NAMES))["label_descriptions"] == dict(zip(WNIDS, NAMES))


# ------------------------------------------------------------------ shards and DALI


def test_shards_keep_the_descriptions_and_the_dali_loader_returns_them(described_folder, tmp_path):
    dst = tmp_path / "shards"
    convert.convert(described_folder, dst, 2, 1, workers=1, seed=0, progress=False)
    manifest = json.loads((dst / MANIFEST).read_text(encoding="utf-8"))
    assert manifest["class_names"] == WNIDS and manifest["class_descriptions"] == NAMES
    assert loaders(dst, "dali").class_descriptions == tuple(NAMES)
    assert loaders(described_folder, "dali").class_descriptions == tuple(NAMES)


def test_a_manifest_without_descriptions_still_opens_and_a_later_table_is_taken_over(tmp_path):
    plain = make_image_folder(tmp_path / "imagenet", train_per_class=4, val_counts=(1, 1, 1), size=16)
    dst = tmp_path / "shards"
    convert.convert(plain, dst, 2, 1, workers=1, seed=0, progress=False)
    assert "class_descriptions" not in json.loads((dst / MANIFEST).read_text())  # as manifests written before
    assert open_shard_set(dst, 3).class_descriptions == ()
    packed = {p.name: p.stat().st_mtime_ns for p in dst.glob("*.tar")}
    write_class_table(plain, list(zip(WNIDS, NAMES)))  # prepared after the conversion
    convert.convert(plain, dst, 2, 1, workers=1, seed=0, progress=False)
    assert open_shard_set(dst, 3).class_descriptions == tuple(NAMES)
    assert {p.name: p.stat().st_mtime_ns for p in dst.glob("*.tar")} == packed  # nothing packed again


def test_convert_refuses_a_bad_table_before_writing_shards(tmp_path, capsys):
    plain = make_image_folder(tmp_path / "imagenet", train_per_class=4, val_counts=(1, 1, 1), size=16)
    (plain / CLASS_TABLE).write_text("index\twnid\tnames\n0\tn00000000\n", encoding="utf-8")
    assert convert.main([str(plain), str(tmp_path / "shards"), "--shards", "2", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "classes.tsv, line 2" in err and err.count("\n") == 1
    assert not list((tmp_path / "shards").glob("*.tar"))
