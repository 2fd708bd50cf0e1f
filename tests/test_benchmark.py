"""The benchmark command runs on the CPU and reports what it promises."""

import json
import subprocess
import sys

import pytest
from helpers import REPO, clean_env, data_toml, tiny_train_toml, write

from train import benchmark


def test_step_mode_reports_both_loops_and_their_ratio(tmp_path):
    out = tmp_path / "result.json"
    result = subprocess.run([sys.executable, "-m", "train.benchmark", "--arch", "resnet18", "--batch-size", "4",
                             "--image-size", "32", "--steps", "2", "--warmup", "1", "--rounds", "2",
                             "--json", str(out)],
                            cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    figures = json.loads(out.read_text())
    assert figures["ours_images_per_s"] > 0 and figures["plain_images_per_s"] > 0
    assert abs(figures["ratio"] - figures["ours_images_per_s"] / figures["plain_images_per_s"]) < 1e-9
    assert len(figures["ours_rounds"]) == len(figures["plain_rounds"]) == 2
    assert figures["peak_memory_mb"] > 0 and figures["device"] == "cpu"
    assert "mfu" not in figures  # only with a GPU whose peak is known
    for key in ("ours_images_per_s", "plain_images_per_s", "ratio", "peak_memory_mb"):
        assert key in result.stdout


def test_pipeline_mode_says_per_model_what_limits_the_run(tmp_path, tiny_folder, capsys):
    """Pipeline mode on the CPU: the loader alone, then per model the step on synthetic and on
    real batches, their ratio, the peak memory and a "limited by" line that follows the figures."""
    data = write(tmp_path / "d.toml", data_toml(tiny_folder))
    train = write(tmp_path / "t.toml", tiny_train_toml())
    out = tmp_path / "result.json"
    assert benchmark.main(["--data-cfg", str(data), "--train-cfg", str(train), "--models", "test_resnet,test_vit",
                           "--steps", "1", "--warmup", "1", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["loader"] == "hf" and figures["loader_images_per_s"] > 0 and figures["device"] == "cpu"
    assert [model["arch"] for model in figures["models"]] == ["test_resnet", "test_vit"]
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("loader hf alone: ") for line in lines) == 1
    for model in figures["models"]:
        real, synthetic = model["train_images_per_s"], model["synthetic_train_images_per_s"]
        assert min(real, synthetic, model["peak_memory_mb"]) > 0
        assert model["end_to_end_ratio"] == pytest.approx(real / synthetic)
        assert model["limited_by"] == benchmark.limited_by(real, synthetic)
    assert [line for line in lines if line.startswith("limited by: ")] == [
        f"limited by: {model['limited_by']}" for model in figures["models"]]
    for label in ("step on synthetic data:", "step on real data:", "end-to-end / synthetic:",
                  "peak resident memory of the process:"):
        assert sum(label in line for line in lines) == 2, label


def test_the_loader_limits_a_run_that_real_data_slow_by_more_than_2_percent():
    assert benchmark.limited_by(97.9, 100.0) == "loader"
    assert benchmark.limited_by(98.0, 100.0) == benchmark.limited_by(120.0, 100.0) == "compute"


def test_pipeline_mode_needs_two_batches(tmp_path, tiny_folder, capsys):
    """A data set of one batch cannot time a loader: a one-line error, a non-zero exit."""
    data = write(tmp_path / "d.toml", data_toml(tiny_folder))
    train = write(tmp_path / "t.toml", tiny_train_toml(batch_size=24))
    assert benchmark.main(["--data-cfg", str(data), "--train-cfg", str(train), "--steps", "2"]) != 0
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "make 1 batches of 24; the benchmark needs at least 2" in error[0], error
