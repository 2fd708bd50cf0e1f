"""The whole loop as a user runs it: real processes, real files, metrics read back."""

from __future__ import annotations

import tomllib

import pytest
from helpers import data_toml, evaluate_per_image, make_image_folder, run_train, tiny_train_toml, write

from train.cli import main
from train.rundir import read_metrics

REQUIRED = {"epoch", "step", "train_loss", "val_loss", "val_acc1", "val_acc5", "val_samples", "lr",
            "epoch_time_s", "train_time_s", "images_per_s", "eval_time_s", "eta_s", "gpu_hours"}
TIMING = {"epoch_time_s", "train_time_s", "images_per_s", "eval_time_s", "eta_s", "gpu_hours"}


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


def test_two_processes_evaluate_every_image_exactly_once(two_process_run, tiny_folder):
    """15 validation images, 8 and 7 per process: the record is the mean over exactly those 15 of
    what one process computes for each with the same weights and BatchNorm statistics."""
    assert "on 2 process(es)" in two_process_run.stdout  # a real process group, not two single runs
    records = read_metrics(two_process_run.dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [3, 6] and all(r["val_samples"] == 15 for r in records)
    single = evaluate_per_image(two_process_run.dir / "model", tiny_folder, "hf")
    # Every image has a loss of its own: an image counted twice and another missed would change the mean.
    assert len(single.loss) == 15 and len(set(single.loss.tolist())) == 15
    last = records[-1]
    assert last["val_loss"] == pytest.approx(single.loss.mean().item(), rel=1e-5)
    assert last["val_acc1"] == pytest.approx(100 * single.top1.float().mean().item())
    assert last["val_acc5"] == pytest.approx(100 * single.top5.float().mean().item())


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


def test_a_bad_data_folder_is_a_one_line_error(capsys, tmp_path):
    """Each layout problem's message is checked in test_data.py; here, how the command reports one."""
    root = make_image_folder(tmp_path / "d", classes=3, train_per_class=8, val_counts=(1, 1, 1))
    (root / "val" / "n00000002").rename(root / "val" / "n00000009")
    data = write(tmp_path / "data.toml", data_toml(root))
    train = write(tmp_path / "train.toml", tiny_train_toml())
    err = one_line_error(capsys, ["--data-cfg", str(data), "--train-cfg", str(train),
                                  "--output-dir", str(tmp_path / "o")])
    assert "different class folders in train/ and val/" in err and str(root) in err


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
