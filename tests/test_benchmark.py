"""The benchmark command runs on the CPU and reports what it promises."""

import json
import subprocess
import sys

from helpers import REPO, clean_env, data_toml, tiny_train_toml, write


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


def test_pipeline_mode_reads_real_batches(tmp_path, tiny_folder):
    data = write(tmp_path / "d.toml", data_toml(tiny_folder))
    train = write(tmp_path / "t.toml", tiny_train_toml())
    out = tmp_path / "result.json"
    result = subprocess.run([sys.executable, "-m", "train.benchmark", "--data-cfg", str(data),
                             "--train-cfg", str(train), "--steps", "2", "--json", str(out)],
                            cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    figures = json.loads(out.read_text())
    assert figures["loader"] == "hf" and figures["bound_by"] in ("data", "compute")
    speeds = ("loader_images_per_s", "train_images_per_s", "synthetic_train_images_per_s")
    assert min(figures[key] for key in speeds) > 0
