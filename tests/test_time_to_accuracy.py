"""benchmarks/time_to_accuracy.py: the seed recipe against a fast one, in alternating rounds."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
from helpers import REPO, data_toml, tiny_train_toml, write

spec = importlib.util.spec_from_file_location("time_to_accuracy", REPO / "benchmarks/time_to_accuracy.py")
time_to_accuracy = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = time_to_accuracy  # its dataclasses look their module up there
spec.loader.exec_module(time_to_accuracy)


def records(accuracies: list[float], epoch_s: float = 10.0, eval_s: float = 1.0) -> list[dict]:
    return [{"epoch": i + 1, "val_acc1": acc, "train_time_s": epoch_s * (i + 1), "eval_time_s": eval_s}
            for i, acc in enumerate(accuracies)]


def test_time_to_the_target_counts_training_and_every_evaluation_up_to_the_first_at_or_above_it():
    history = records([90.0, 98.0, 99.0, 98.5, 99.2])
    assert time_to_accuracy.time_to_reach(history, 99.0) == (30.0 + 3 * 1.0, 3)
    assert time_to_accuracy.time_to_reach(history, 99.1) == (50.0 + 5 * 1.0, 5)
    assert time_to_accuracy.time_to_reach(history, 99.5) == (None, None)


def test_rounds_alternate_which_recipe_trains_first():
    assert [time_to_accuracy.round_order(i) for i in range(3)] == [("seed", "fast"), ("fast", "seed"),
                                                                    ("seed", "fast")]


def test_the_summary_is_the_median_round_and_the_ratio_of_the_medians():
    result = time_to_accuracy.Result
    results = [result("seed", 1, 99.0, 8, 60.0, 50.0, 8), result("fast", 1, 99.2, 4, 40.0, 20.0, 3),
               result("seed", 2, 98.8, 8, 70.0, 56.0, 7), result("fast", 2, 98.0, 4, 45.0, None, None),
               result("seed", 3, 99.0, 8, 65.0, 52.0, 8), result("fast", 3, 99.0, 4, 42.0, 30.0, 4)]
    summary = time_to_accuracy.summarise(results)
    assert summary["seed"]["median_seconds_to_target"] == 52.0
    assert summary["fast"]["median_seconds_to_target"] == 25.0  # of the two rounds that reached it
    assert (summary["fast"]["rounds_reaching_target"], summary["fast"]["rounds"]) == (2, 3)
    assert summary["fast"]["median_final_acc1"] == 99.0
    assert summary["fast_over_seed"] == pytest.approx(25.0 / 52.0)


def test_a_round_on_an_image_folder_trains_both_recipes_and_reports_them(tmp_path, tiny_folder, capsys):
    data = write(tmp_path / "data.toml", data_toml(tiny_folder))
    seed = write(tmp_path / "seed.toml", tiny_train_toml(max_epochs=2))
    fast = write(tmp_path / "fast.toml", tiny_train_toml(max_epochs=1))
    out = tmp_path / "figures.json"
    assert time_to_accuracy.main(["--data-cfg", str(data), "--seed-cfg", str(seed), "--fast-cfg", str(fast),
                                  "--rounds", "1", "--work-dir", str(tmp_path / "runs"), "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    by_recipe = {r["recipe"]: r for r in figures["results"]}
    assert (by_recipe["seed"]["epochs"], by_recipe["fast"]["epochs"]) == (2, 1)
    seed_metrics = [json.loads(line) for line in (tmp_path / "runs/round1-seed/metrics.jsonl").open()]
    assert by_recipe["seed"]["final_acc1"] == seed_metrics[-1]["val_acc1"]
    # The target is the seed run's own final top-1, which it reaches by its last epoch at the latest.
    assert by_recipe["seed"]["seconds_to_target"] is not None and by_recipe["seed"]["epoch_at_target"] <= 2
    printed = capsys.readouterr().out
    assert "round 1 seed: final top-1" in printed and "round 1 fast: final top-1" in printed
    assert "seed: median final top-1" in printed


def test_a_recipe_that_fails_stops_the_benchmark_with_its_error(tmp_path, tiny_folder):
    data = write(tmp_path / "data.toml", data_toml(tiny_folder))
    seed = write(tmp_path / "seed.toml", tiny_train_toml(arch='"resnet5"'))  # the first to train
    fast = write(tmp_path / "fast.toml", tiny_train_toml())
    with pytest.raises(SystemExit, match=r"the seed recipe .*seed.toml. failed with exit status 2:\n.*resnet5"):
        time_to_accuracy.main(["--data-cfg", str(data), "--seed-cfg", str(seed), "--fast-cfg", str(fast),
                               "--rounds", "1"])
