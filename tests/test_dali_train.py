"""Training with ``[dataloader] name = "dali"`` as a user runs it: real processes, both readers,
one and two processes, metrics read back."""

from __future__ import annotations

import pytest
from helpers import (
    LaunchedRun,
    accelerate_launch,
    data_toml,
    evaluate_per_image,
    free_port,
    launched_run,
    make_image_folder,
    run_train,
    tiny_train_toml,
    write,
)

from train.cli import main
from train.dataset_tools.convert import convert
from train.rundir import read_metrics

CPU_LINE = "DALI: no CUDA device, so every operator runs on the CPU"


def configs(tmp_path, data_dir, loader="dali", workers=1, **train_overrides):
    data = write(tmp_path / f"data-{loader}.toml", data_toml(data_dir, workers=workers).replace('"hf"', f'"{loader}"'))
    train = write(tmp_path / "train.toml", tiny_train_toml(**train_overrides))
    return ["--data-cfg", str(data), "--train-cfg", str(train)]


@pytest.fixture(scope="module")
def tiny_shards(tiny_folder, tmp_path_factory):
    dst = tmp_path_factory.mktemp("tiny_shards") / "shards"
    convert(tiny_folder, dst, train_shards=2, val_shards=2, workers=1, seed=0, progress=False)
    return dst


def test_dali_training_reaches_the_accuracy_band_of_the_hf_loader(tmp_path):
    root = make_image_folder(tmp_path / "d", classes=3, train_per_class=32, val_counts=(11, 11, 11))
    final = {}
    for loader in ("hf", "dali"):
        args = configs(tmp_path, root, loader, max_epochs=4, batch_size=16, lr=0.1)
        # The loader is chosen the way the README shows: --set on the command line.
        result = run_train(args + ["--set", f'data.dataloader.name="{loader}"', "--output-dir",
                                   str(tmp_path / loader)], XDG_CACHE_HOME=str(tmp_path / "cache"))
        assert result.returncode == 0, result.stderr[-3000:]
        records = read_metrics(tmp_path / loader / "metrics.jsonl")
        assert [r["val_samples"] for r in records] == [33] * 4 and records[-1]["step"] == 4 * (96 // 16)
        final[loader] = records[-1]["val_acc1"]
        if loader == "dali":
            assert result.stdout.count(CPU_LINE) == 1  # said once, not per pipeline
    # Chance is 33%; both loaders learn the set, and DALI is not worse by more than noise.
    assert final["hf"] >= 75 and final["dali"] >= 75 and final["dali"] >= final["hf"] - 15, final


@pytest.fixture(scope="module")
def two_process_shards_run(tiny_shards, tmp_path_factory) -> LaunchedRun:
    tmp = tmp_path_factory.mktemp("two_processes_shards")
    return launched_run(configs(tmp, tiny_shards, max_epochs=2), tmp / "out", accelerate_launch(2, port=free_port()),
                        XDG_CACHE_HOME=str(tmp / "cache"))


@pytest.mark.parametrize("reader", ["folder", "shards"])
def test_two_processes_evaluate_every_image_exactly_once(reader, request, tiny_folder, tiny_shards, monkeypatch,
                                                         tmp_path):
    """15 validation images: DALI's shards hold 7 and 8, padded to equal batches; the padding must
    not be counted. The record is the mean over those 15 of what one process computes for each."""
    run = request.getfixturevalue("two_process_dali_run" if reader == "folder" else "two_process_shards_run")
    assert "on 2 process(es)" in run.stdout
    records = read_metrics(run.dir / "metrics.jsonl")
    assert all(r["val_samples"] == 15 for r in records) and records[-1]["step"] == 3 * len(records)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    single = evaluate_per_image(run.dir / "model", tiny_folder if reader == "folder" else tiny_shards, "dali")
    assert len(single.loss) == 15 and len(set(single.loss.tolist())) == 15
    assert records[-1]["val_loss"] == pytest.approx(single.loss.mean().item(), rel=1e-5)
    assert records[-1]["val_acc1"] == pytest.approx(100 * single.top1.float().mean().item())
    assert records[-1]["val_acc5"] == pytest.approx(100 * single.top5.float().mean().item())


def test_one_process_on_shards_evaluates_every_image_once(tiny_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert main(configs(tmp_path, tiny_shards) + ["--output-dir", str(tmp_path / "out")]) == 0
    records = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert records[-1]["val_samples"] == 15 and records[-1]["step"] == 3


def test_a_truncated_image_stops_the_run_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = make_image_folder(tmp_path / "d", classes=3, train_per_class=8, val_counts=(1, 1, 1))
    bad = root / "val" / "n00000002" / "img_0000.JPEG"
    bad.write_bytes(bad.read_bytes()[:300])
    assert main(configs(tmp_path, root) + ["--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: unreadable image")
    assert str(bad) in err and f"python -m train.data.check {root}" in err
