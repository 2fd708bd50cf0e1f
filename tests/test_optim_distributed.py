"""SAM, Schedule-Free, BatchNorm evaluation and the checkpoint policy with 2 real processes (gloo on
the CPU, through accelerate launch); Schedule-Free and single-step SAM runs killed mid-epoch."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from helpers import (
    REPO,
    LaunchedRun,
    accelerate_launch,
    assert_mid_epoch,
    assert_rerun_reproduces,
    clean_env,
    evaluate_per_image,
    free_port,
    kill_after_checkpoint,
    launched_run,
    run_configs,
    sam_v2_toml,
    schedule_free_toml,
)
from optim_reference import SGDReference, gradient, sam_e, tiny_problem
from optim_worker import evaluation_net

from train.rundir import read_metrics
from train.validation import evaluate

WORKER = Path(__file__).resolve().parent / "optim_worker.py"


@pytest.fixture(scope="module")
def launched(tmp_path_factory, tiny_folder):
    """One 2-process launch: the worker's checks, then a Schedule-Free training run (2 epochs,
    checkpoints every 2 steps)."""
    out = tmp_path_factory.mktemp("optim_worker")
    args = run_configs(out, tiny_folder, schedule_free_toml(max_epochs=2))
    command = accelerate_launch(2, port=free_port()) + [str(WORKER), str(out)] + args + [
        "--output-dir", str(out / "run")]
    result = subprocess.run(command, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(2)], LaunchedRun(out / "run", args, result.stdout,
                                                                            result.stderr)


@pytest.fixture(scope="module")
def ranks(launched):
    return launched[0]


@pytest.fixture(scope="module")
def schedule_free_run(launched) -> LaunchedRun:
    return launched[1]


@pytest.fixture(scope="module")
def sam_v2_run(tmp_path_factory, tiny_folder) -> LaunchedRun:
    """Single-step adaptive SAM on 2 processes: 2 epochs, checkpoints every 2 steps."""
    tmp = tmp_path_factory.mktemp("sam_v2")
    return launched_run(run_configs(tmp, tiny_folder, sam_v2_toml(max_epochs=2)), tmp / "run",
                        accelerate_launch(2, port=free_port()))


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


def test_schedule_free_trains_and_evaluates_on_two_processes(schedule_free_run, tiny_folder):
    """Each evaluation is of what is exported: the averaged weights with the statistics recomputed for
    them, the same on both processes (a 1-process evaluation of the exported model gives the same
    metrics), and the weights moved away from the initial ones."""
    records = read_metrics(schedule_free_run.dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [3, 6] and all(r["val_samples"] == 15 for r in records)
    # warm-up over 2 epochs of 3 steps: the lr reported is the one the optimizer applied, not 0.05
    assert [r["lr"] for r in records] == pytest.approx([0.025, 0.05])
    assert "on 2 process(es)" in schedule_free_run.stdout
    assert "BatchNorm statistics recomputed for the averaged weights over 16 training samples" in \
        schedule_free_run.stdout
    single = evaluate_per_image(schedule_free_run.dir / "model", tiny_folder, "hf")
    assert records[-1]["val_loss"] == pytest.approx(single.loss.mean().item(), rel=1e-5)
    assert records[-1]["val_acc1"] == pytest.approx(100 * single.top1.float().mean().item())
    assert records[0]["train_loss"] != pytest.approx(records[1]["train_loss"], rel=1e-3)  # training moved


def test_batchnorm_statistics_are_shared_before_evaluating_on_two_processes(ranks):
    """Each process's running statistics come from its own batches; evaluation on both gives the
    metrics of one process evaluating every batch with the main process's statistics."""
    seen = [rank["evaluation"] for rank in ranks]
    before = [s["buffers_before"] for s in seen]
    assert not torch.allclose(before[0]["1.running_mean"], before[1]["1.running_mean"])  # they do differ
    for name, buffer in before[0].items():
        assert torch.equal(seen[1]["buffers_after"][name], buffer), name  # process 1 now holds process 0's
    net = evaluation_net()
    net.load_state_dict(seen[0]["state_before"])
    batches = seen[0]["batches"] + seen[1]["batches"]
    alone = evaluate(net, batches, Accelerator(cpu=True), 0.0, 3, channels_last=False)
    for key in ("val_loss", "val_acc1", "val_acc5", "val_samples"):
        assert seen[0]["result"][key] == pytest.approx(alone[key], rel=1e-6), key
        assert seen[1]["result"][key] == seen[0]["result"][key], key


def test_the_main_process_clock_decides_time_based_checkpoints_for_all(ranks):
    """checkpoint_every_minutes: only the main process reads the clock, and its decision is everyone's."""
    decisions = [rank["policy"] for rank in ranks]
    assert decisions[0] == decisions[1]
    assert decisions[0] == {"main's time is up": "CHECKPOINT", "only process 1's time is up": "CONTINUE",
                            "nobody's time is up": "CONTINUE"}


# ------------------------------------------------------------------ killed and run again


@pytest.mark.parametrize("optimizer", ["schedule-free", "sam-v2"])
def test_two_process_runs_killed_mid_epoch_then_rerun_give_the_same_metrics(optimizer, request, tmp_path):
    """Schedule-Free's z and averaging weights, SAM's previous gradient: everything a step needs
    comes back from the checkpoint on both processes."""
    reference: LaunchedRun = request.getfixturevalue(
        "schedule_free_run" if optimizer == "schedule-free" else "sam_v2_run")
    out = tmp_path / "out"
    newest = kill_after_checkpoint(reference.args, out, step=2, launcher=accelerate_launch(2, port=free_port()))
    assert_mid_epoch(newest)
    assert_rerun_reproduces(reference.args, out, newest, reference.dir, accelerate_launch(2, port=free_port()))
