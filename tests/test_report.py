"""The report command on generated run directories: grouping, mean ± 2σ, the table, the plots."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, clean_env, data_toml, tiny_train_toml, write
from PIL import Image

from train.config import load_config
from train.report import PLOTS, curve, find_run_dirs, group_labels, group_runs, load_run, main
from train.rundir import write_config

ADAM = ['train.optim={name="adam", weight_decay=1e-4}', "train.lr=0.003"]
EPOCHS, STEPS_PER_EPOCH = 3, 10


def make_run(root: Path, name: str, overrides: list[str], seed: int, epochs_done: int = EPOCHS) -> dict:
    """A run directory as training leaves it: config.toml and one metrics record per epoch."""
    data = write(root / "cfg" / "data.toml", data_toml("/data/imagenet"))
    train = write(root / "cfg" / "train.toml", tiny_train_toml(max_epochs=EPOCHS))
    config = load_config(data, train, [*overrides, f"train.reproduce.seed={seed}"])
    run = root / name
    run.mkdir(parents=True)
    write_config(run, config)
    rng = np.random.default_rng(zlib.crc32(name.encode()))  # each run its own numbers
    records = []
    for epoch in range(1, epochs_done + 1):
        acc1 = float(20 * epoch + rng.normal(0, 2))
        records.append({"epoch": epoch, "step": epoch * STEPS_PER_EPOCH, "train_loss": 1.0, "val_loss": 1.0,
                        "val_acc1": acc1, "val_acc5": min(100.0, acc1 + 25 + float(rng.normal(0, 1))),
                        "val_samples": 500, "lr": 0.1, "epoch_time_s": 600.0,
                        "train_time_s": float(epoch * 600 + rng.normal(0, 20)), "images_per_s": 100.0})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"path": run, "records": records}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """SGD lr 0.05 (3 seeds, one with another log_freq, plus an unfinished 4th), Adam (3 seeds),
    SGD lr 0.1 (1 seed)."""
    root = tmp_path_factory.mktemp("runs")
    made = {
        "sgd": [make_run(root, "sgd-s1", [], 1), make_run(root, "sgd-s2", [], 2),
                make_run(root, "sgd-s3", ["train.log.log_freq=7"], 3)],
        "adam": [make_run(root, f"adam-s{s}", ADAM, s) for s in (1, 2, 3)],
        "sgd-lr0.1": [make_run(root, "sgd-lr0.1-s1", ["train.lr=0.1"], 1)],
        "unfinished": [make_run(root, "sgd-s4", [], 4, epochs_done=2)],
    }
    # The unfinished run's numbers would move the SGD mean a lot if they were counted.
    for record in made["unfinished"][0]["records"]:
        record["val_acc1"] = 0.0
    path = made["unfinished"][0]["path"] / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in made["unfinished"][0]["records"]))
    return root, made


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory):
    root, _ = runs
    out = tmp_path_factory.mktemp("report") / "out"
    result = subprocess.run([sys.executable, "-m", "train.report", str(root), "--out", str(out)], cwd=REPO,
                            env=clean_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return out, result


def table_rows(markdown: str) -> dict[str, list[str]]:
    """Optimizer/config cell -> the row's cells."""
    rows = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0].isdigit():
            rows[cells[2]] = cells
    return rows


def expected_cell(values) -> str:
    """mean ± 2 sample standard deviations, computed here with numpy."""
    values = np.array(values)
    return f"{values.mean():.4f} ± {2 * np.std(values, ddof=1):.4f}"


def test_table_cells_are_mean_and_two_sample_standard_deviations(runs, report):
    _, made = runs
    out, result = report
    rows = table_rows((out / "results.md").read_text())
    assert set(rows) == {"resnet18 SGD (lr=0.05)", "resnet18 Adam", "resnet18 SGD (lr=0.1)"}
    for label, key in (("resnet18 SGD (lr=0.05)", "sgd"), ("resnet18 Adam", "adam")):
        last = [run["records"][-1] for run in made[key]]
        epoch, steps, _, n, top1, top5, hours = rows[label]
        assert (epoch, steps, n) == ("3", "30", "3")  # the unfinished 4th SGD run is not counted
        assert top1 == expected_cell([r["val_acc1"] for r in last])
        assert top5 == expected_cell([r["val_acc5"] for r in last])
        assert hours == expected_cell([r["train_time_s"] / 3600 for r in last])
    single = made["sgd-lr0.1"][0]["records"][-1]
    assert rows["resnet18 SGD (lr=0.1)"][3:5] == ["1", f"{single['val_acc1']:.4f}"]  # no σ from one run
    assert table_rows(result.stdout) == rows  # the same table on the console


def test_header_follows_the_seed_format(report):
    out, _ = report
    text = (out / "results.md").read_text()
    assert ("| Epoch | Steps | Optimizer / config | Runs | Top-1 Acc. (%) | Top-5 Acc. (%) | Training Time (hours) |"
            in text)


def test_unfinished_runs_are_listed_and_warned_about(runs, report):
    root, _ = runs
    out, result = report
    assert f"warning: {root / 'sgd-s4'}: unfinished (epoch 2 of 3), left out of the statistics" in result.stderr
    text = (out / "results.md").read_text()
    unfinished = text[text.index("## Unfinished runs"):]
    assert "sgd-s4" in unfinished and "epoch 2 of 3" in unfinished
    assert "sgd-s4" not in text[:text.index("## Unfinished runs")]


def test_four_readable_png_plots_are_written(report):
    out, _ = report
    for name in PLOTS:
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size == (900, 600)
            # Something was drawn: a blank figure would be a single colour.
            assert len(image.convert("RGB").getcolors(maxcolors=100_000) or range(100_001)) > 50
        assert f"![]({name})" in (out / "results.md").read_text()


def test_plotted_curves_are_mean_and_two_sigma_per_evaluation(runs):
    root, made = runs
    groups = group_runs([load_run(path) for path in find_run_dirs([str(root)])])
    (sgd,) = [g for g in groups if g.label == "resnet18 SGD (lr=0.05)"]
    assert [run.config["train.reproduce.seed"] for run in sgd.runs] == [1, 2, 3]
    c = curve(sgd, "val_acc1")
    acc1 = np.array([[r["val_acc1"] for r in run["records"]] for run in made["sgd"]])
    times = np.array([[r["train_time_s"] for r in run["records"]] for run in made["sgd"]])
    assert list(c["step"]) == [10, 20, 30]
    np.testing.assert_allclose(c["mean"], acc1.mean(axis=0))
    np.testing.assert_allclose(c["two_sd"], 2 * acc1.std(axis=0, ddof=1))
    np.testing.assert_allclose(c["time_s"], times.mean(axis=0))


def test_a_glob_selects_runs(runs, tmp_path):
    root, _ = runs
    assert main([str(root / "adam-*"), "--out", str(tmp_path / "out")]) == 0
    rows = table_rows((tmp_path / "out" / "results.md").read_text())
    assert list(rows) == ["resnet18 Adam"]
    assert rows["resnet18 Adam"][3] == "3"


def test_labels_name_what_tells_groups_of_the_same_model_and_optimizer_apart():
    base = {"train.arch": "resnet50", "train.lr": 0.1, "train.max_epochs": 90, "train.optim.v2": True,
            "train.lr_scheduler.name": "cosine", "train.lr_scheduler.warmup_epochs": 5.0}
    sgd = {**base, "train.optim.name": "sgd", "train.optim.momentum": 0.875}
    sgd_momentum = {**sgd, "train.optim.momentum": 0.9}
    sgd_constant = {**sgd, "train.lr_scheduler.name": "constant"}
    del sgd_constant["train.lr_scheduler.warmup_epochs"]  # a constant schedule has no warm-up key
    adam = {**base, "train.optim.name": "adam", "train.optim.beta1": 0.9, "train.lr": 0.001}
    sam_v1 = {**base, "train.optim.name": "sgd-sam", "train.optim.v2": False}
    assert group_labels([sgd, sgd_momentum, sgd_constant, adam, sam_v1, {**sgd, "train.arch": "vgg16"}]) == [
        "resnet50 SGD (lr_scheduler.name=cosine, optim.momentum=0.875)",
        "resnet50 SGD (lr_scheduler.name=cosine, optim.momentum=0.9)",
        "resnet50 SGD (lr_scheduler.name=constant, optim.momentum=0.875)",
        "resnet50 Adam", "resnet50 SAM-v1", "vgg16 SGD"]


def test_bad_input_is_one_line_and_status_2(runs, tmp_path, capsys):
    root, _ = runs
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'missing'}: no such run directory\n"
    assert main([str(root / "sgd-s4"), "--out", str(tmp_path / "o")]) == 2
    assert "none of the 1 run(s) has finished" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert main([str(tmp_path / "nothing-*"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nothing-*'}: matches nothing\n"
    damaged = tmp_path / "damaged"
    shutil.copytree(root / "sgd-s1", damaged)
    with open(damaged / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 4, "st\n')
    assert main([str(damaged), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {damaged / 'metrics.jsonl'}: line 4 is not valid JSON")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.toml").write_text("[train]\nlr = -1\n[data]\ndata_dir = 'x'\n")
    assert main([str(broken), "--out", str(tmp_path / "o")]) == 2
    assert "train.lr must be > 0" in capsys.readouterr().err
