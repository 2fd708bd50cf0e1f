"""SAM and Schedule-Free with 2 real processes (gloo on the CPU, through accelerate launch)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from helpers import REPO, accelerate_launch, clean_env, data_toml, tiny_train_toml, write
from optim_reference import SGDReference, gradient, sam_e, tiny_problem

from train.rundir import read_metrics

WORKER = Path(__file__).resolve().parent / "optim_worker.py"


def schedule_free_configs(folder: Path, tmp: Path) -> list[str]:
    data = write(tmp / "data.toml", data_toml(folder))
    train = write(tmp / "train.toml", tiny_train_toml(num_samples_for_stats=16).replace(
        '[optim]\nname = "sgd"\nmomentum = 0.9\nweight_decay = 1e-4',
        '[optim]\nname = "sgd-schedule-free"\nmomentum = 0.9\nweight_decay = 1e-4\nwarmup_epochs = 2').replace(
        'name = "cosine"\nwarmup_epochs = 0.5', 'name = "constant"'))
    return ["--data-cfg", str(data), "--train-cfg", str(train), "--output-dir", str(tmp / "run")]


@pytest.fixture(scope="module")
def launched(tmp_path_factory, tiny_folder):
    """One 2-process launch: the worker's checks, then a Schedule-Free training run."""
    out = tmp_path_factory.mktemp("optim_worker")
    command = accelerate_launch(2, port=29633) + [str(WORKER), str(out)] + schedule_free_configs(tiny_folder, out)
    result = subprocess.run(command, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(2)], out / "run", result


@pytest.fixture(scope="module")
def ranks(launched):
    return launched[0]


def test_two_step_sam_perturbs_with_the_local_gradient_and_steps_with_the_averaged_one(ranks):
    weight, bias, _ = tiny_problem(seed=0)
    first, second = [], []
    for rank in ranks:
        sam = rank["sam"]
        x, t = sam["batch"]
        local = gradient(weight, bias, x, t)
        # The first gradient is this process's own: no all-reduce happened (no_sync).
        for seen, expected in zip(sam["first_grads"], local):
            torch.testing.assert_close(seen.double(), expected, rtol=1e-5, atol=1e-7)
        e_w, e_b = sam_e(weight.double(), bias.double(), *local, rho=0.3, adaptive=False)
        first.append(local)
        second.append(gradient(weight.double() + e_w, bias.double() + e_b, x, t))
    assert not torch.allclose(*(g[0] for g in first))  # the processes' batches really differ

    averaged = [(a + b) / 2 for a, b in zip(*second)]
    expected_w, expected_b = SGDReference(0.1, 0.9, 0.01).step(weight.double(), bias.double(), *averaged)
    for rank in ranks:
        sam = rank["sam"]
        assert sam["updated"]
        # The second gradient is all-reduced: the average of both processes' gradients at their w + e.
        for seen, expected in zip(sam["second_grads"], averaged):
            torch.testing.assert_close(seen.double(), expected, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(sam["weights_after"][0].double(), expected_w, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(sam["weights_after"][1].double(), expected_b, rtol=1e-5, atol=1e-7)


def test_recomputed_batchnorm_statistics_are_the_average_over_all_processes_batches(ranks):
    stats = [rank["batchnorm"] for rank in ranks]
    assert all(s["used"] == 2 for s in stats)
    for name, buffer in stats[0]["buffers"].items():
        assert torch.equal(buffer, stats[1]["buffers"][name]), name  # identical on both processes
    # The first layer normalises the inputs themselves, so its statistics can be computed by hand:
    # every batch weighs the same (cumulative average), on both processes.
    batches = stats[0]["batches"] + stats[1]["batches"]
    mean = torch.stack([b.mean(dim=(0, 2, 3)) for b in batches]).mean(0)
    var = torch.stack([b.var(dim=(0, 2, 3), unbiased=True) for b in batches]).mean(0)
    torch.testing.assert_close(stats[0]["buffers"]["0.running_mean"], mean)
    torch.testing.assert_close(stats[0]["buffers"]["0.running_var"], var)
    assert not torch.allclose(stats[0]["buffers"]["0.running_mean"], stats[0]["before"])


def test_schedule_free_trains_and_evaluates_on_two_processes(launched):
    """prepare_for_eval in a real run: averaged weights, statistics from the stats stream, one record."""
    _, run_dir, result = launched
    records = read_metrics(run_dir / "metrics.jsonl")
    assert len(records) == 1 and records[0]["val_samples"] == 15
    # warm-up over 2 epochs of 3 steps: the lr reported is the one the optimizer applied, not 0.05
    assert records[0]["lr"] == pytest.approx(0.025)
    assert "on 2 process(es)" in result.stdout
    assert "BatchNorm statistics recomputed for the averaged weights over 16 training samples" in result.stdout
