"""DDP's free options (issue 24): no buffer broadcast before every forward, gradients as views
of the all-reduce buckets. They must change no result: a 2-process gloo run with them has the
losses and accuracies of the same run with DDP's defaults."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from helpers import REPO, accelerate_launch, clean_env, free_port

from train import startup
from train.config import SGDSAMConfig, TrainConfig
from train.optim import build_optimizer, build_train_step
from train.optim.sam import PREVIOUS_GRAD
from train.rundir import read_metrics

WORKER = Path(__file__).resolve().parent / "ddp_options_worker.py"
METRICS = ("train_loss", "val_loss", "val_acc1", "val_acc5", "val_samples", "step", "lr")


def test_the_accelerator_is_made_with_the_free_ddp_options(monkeypatch):
    """make_accelerator hands Accelerate broadcast_buffers=False and gradient_as_bucket_view=True."""
    made = {}
    monkeypatch.setattr(startup, "Accelerator", lambda **kwargs: made.update(kwargs))
    monkeypatch.setattr(startup, "set_backend_flags", lambda train, cuda: None)
    startup.make_accelerator(TrainConfig(), startup.RunOptions())
    (handler,) = [h for h in made["kwargs_handlers"] if isinstance(h, DistributedDataParallelKwargs)]
    assert handler.to_kwargs() == {"broadcast_buffers": False, "gradient_as_bucket_view": True}


def test_two_processes_give_the_same_metrics_as_with_ddp_defaults(two_process_run, tmp_path):
    """The shared 2-process run (2 epochs, with the new options) against the same configs run
    with broadcast_buffers=True, gradient_as_bucket_view=False: every loss within 1e-6 relative."""
    command = accelerate_launch(2, port=free_port()) + [str(WORKER)] + two_process_run.args + [
        "--output-dir", str(tmp_path / "run")]
    result = subprocess.run(command, cwd=REPO, env=clean_env(XDG_CACHE_HOME=str(tmp_path / "cache")),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    former = read_metrics(tmp_path / "run" / "metrics.jsonl")
    now = read_metrics(two_process_run.dir / "metrics.jsonl")
    assert len(former) == len(now) == 2
    for old, new in zip(former, now):
        for key in METRICS:
            assert new[key] == pytest.approx(old[key], rel=1e-6, abs=0), key


class BucketViewModel(torch.nn.Module):
    """Stands in for DDP with gradient_as_bucket_view: the attribute SAM v2 looks at."""

    gradient_as_bucket_view = True

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.linear(x)


def test_single_step_sam_keeps_a_copy_of_gradients_that_live_in_ddp_buckets():
    """With gradient_as_bucket_view the next backward writes into the same bucket memory: SAM v2
    must keep a copy of the gradient it perturbs with, or a skipped step would lose it."""
    accelerator = Accelerator(cpu=True)
    cfg = SGDSAMConfig(momentum=0.9, weight_decay=0.0, rho=0.1, v2=True)
    net = BucketViewModel()
    optimizer = build_optimizer(net, cfg, 0.1, steps_per_epoch=1)
    step = build_train_step(cfg, net, optimizer, torch.nn.MSELoss(), accelerator, 0.0)
    step(torch.randn(4, 3), torch.randn(4, 2))
    for p in net.parameters():
        kept = optimizer.state[p][PREVIOUS_GRAD]
        assert kept is not p.grad and torch.equal(kept, p.grad)
        p.grad.mul_(0.0)  # what the next step's all-reduce does to the bucket
        assert kept.abs().sum() > 0
