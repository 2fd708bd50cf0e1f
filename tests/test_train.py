"""The whole loop as a user runs it: real processes, real files, metrics read back."""

from __future__ import annotations

import tomllib

import pytest
from helpers import accelerate_launch, data_toml, make_image_folder, run_train, tiny_train_toml, write

from train.cli import main
from train.rundir import read_metrics

REQUIRED = {"epoch", "step", "train_loss", "val_loss", "val_acc1", "val_acc5", "val_samples", "lr",
            "epoch_time_s", "train_time_s", "images_per_s"}
TIMING = {"epoch_time_s", "train_time_s", "images_per_s"}


def tiny_configs(tmp_path, folder, workers=0, **train_overrides):
    data = write(tmp_path / "data.toml", data_toml(folder, workers=workers))
    train = write(tmp_path / "train.toml", tiny_train_toml(**train_overrides))
    return ["--data-cfg", str(data), "--train-cfg", str(train)]


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


@pytest.fixture(scope="module")
def two_runs(tiny_folder, tmp_path_factory):
    """The same 2-epoch config run twice in fresh processes."""
    runs = []
    for name in ("a", "b"):
        tmp = tmp_path_factory.mktemp(f"run_{name}")
        args = tiny_configs(tmp, tiny_folder, max_epochs=2) + ["--output-dir", str(tmp / "out"),
                                                               "--set", "train.lr=0.02"]
        result = run_train(args)
        assert result.returncode == 0, result.stderr
        runs.append((tmp / "out", result))
    return runs


def test_run_directory_holds_config_metrics_and_log(two_runs):
    out, result = two_runs[0]
    records = read_metrics(out / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(REQUIRED <= r.keys() for r in records)
    assert [r["step"] for r in records] == [3, 6]  # 24 images / batch 8
    assert all(r["val_samples"] == 15 for r in records)
    assert 0 <= records[-1]["val_acc1"] <= records[-1]["val_acc5"] <= 100
    assert records[1]["train_time_s"] == pytest.approx(records[0]["epoch_time_s"] + records[1]["epoch_time_s"])
    config = tomllib.loads((out / "config.toml").read_text())
    assert config["train"]["lr"] == 0.02 and config["data"]["num_classes"] == 3  # --set is recorded
    log = (out / "train.log").read_text()
    assert "epoch 2/2" in log and "finished" in log
    assert str(out.resolve()) in result.stdout


def test_same_seed_gives_same_metrics(two_runs):
    (out_a, _), (out_b, _) = two_runs
    a, b = read_metrics(out_a / "metrics.jsonl"), read_metrics(out_b / "metrics.jsonl")
    assert without_timing(a) == without_timing(b)


def test_other_seed_gives_other_metrics(two_runs, tiny_folder, tmp_path):
    args = tiny_configs(tmp_path, tiny_folder, max_epochs=2) + [
        "--output-dir", str(tmp_path / "out"), "--set", "train.lr=0.02", "--set", "train.reproduce.seed=4"]
    assert run_train(args).returncode == 0
    other = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert other[-1]["train_loss"] != read_metrics(two_runs[0][0] / "metrics.jsonl")[-1]["train_loss"]


def test_two_processes_evaluate_every_image_exactly_once(tiny_folder, tmp_path):
    # 15 validation images: the two processes get 8 and 7 of them.
    args = tiny_configs(tmp_path, tiny_folder, workers=1) + ["--output-dir", str(tmp_path / "out")]
    result = run_train(args, launcher=accelerate_launch(2, port=29617))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 process(es)" in result.stdout  # a real process group, not two single runs
    records = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert len(records) == 1 and records[0]["val_samples"] == 15 and records[0]["step"] == 3


def test_eval_freq_skips_evaluations_but_not_the_last(tiny_folder, tmp_path):
    args = tiny_configs(tmp_path, tiny_folder, max_epochs=3, eval_freq=2) + ["--output-dir", str(tmp_path / "out")]
    assert main(args) == 0
    assert [r["epoch"] for r in read_metrics(tmp_path / "out" / "metrics.jsonl")] == [2, 3]


# --------------------------------------------------------------------- bad data, as a user sees it


def one_line_error(capsys, args) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("breakage, expected", [
    ("no_data_dir", "does not exist"),
    ("no_val", "no 'val/' folder"),
    ("empty_class", "holds no images"),
    ("class_mismatch", "different class folders in train/ and val/"),
    ("num_classes", "data.num_classes = 4 but"),
])
def test_bad_data_folders_are_one_line_errors(capsys, tmp_path, breakage, expected):
    import shutil
    root = make_image_folder(tmp_path / "d", classes=3, train_per_class=8, val_counts=(1, 1, 1))
    num_classes = 3
    if breakage == "no_data_dir":
        root = tmp_path / "missing"
    elif breakage == "no_val":
        shutil.rmtree(root / "val")
    elif breakage == "empty_class":
        for f in (root / "train" / "n00000002").iterdir():
            f.unlink()
    elif breakage == "class_mismatch":
        (root / "val" / "n00000002").rename(root / "val" / "n00000009")
    elif breakage == "num_classes":
        num_classes = 4
    data = write(tmp_path / "data.toml", data_toml(root, num_classes=num_classes))
    train = write(tmp_path / "train.toml", tiny_train_toml())
    err = one_line_error(capsys, ["--data-cfg", str(data), "--train-cfg", str(train),
                                  "--output-dir", str(tmp_path / "o")])
    assert expected in err


def test_errors_from_a_real_process_have_no_traceback(tmp_path):
    data = write(tmp_path / "data.toml", 'num_classes = 3\n')
    result = run_train(["--data-cfg", str(data), "--train-cfg", str(write(tmp_path / "t.toml", tiny_train_toml()))])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {data}: missing required key 'data.data_dir' (a folder with train/ and val/, or hf-hub:<dataset id>)"]


def test_unreachable_hub_data_set_is_one_line(tmp_path):
    data = write(tmp_path / "data.toml", data_toml("hf-hub:no-such-org/no-such-set"))
    train = write(tmp_path / "t.toml", tiny_train_toml())
    result = run_train(["--data-cfg", str(data), "--train-cfg", str(train), "--output-dir", str(tmp_path / "o")],
                       HF_HUB_OFFLINE="1")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot load Hugging Face data set 'no-such-org/no-such-set'" in lines[0]


# ------------------------------------------------------------------------------ the built-in demo


def test_default_run_learns_the_builtin_data_set(tmp_path):
    """`python -m train` with no arguments: generates the data set, trains, reaches >= 90% top-1."""
    result = run_train([], cwd_dir=tmp_path, XDG_CACHE_HOME=str(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr[-3000:]
    run_dirs = list((tmp_path / "runs").iterdir())
    assert len(run_dirs) == 1
    records = read_metrics(run_dirs[0] / "metrics.jsonl")
    assert records[-1]["val_acc1"] >= 90 and records[-1]["val_samples"] == 500
    assert list((tmp_path / "cache").glob("imagenet-trainer/shapes-*/COMPLETE"))
    summary = result.stdout[result.stdout.index("finished:"):]
    assert f"run          {run_dirs[0].resolve()}" in summary and "model        " in summary
