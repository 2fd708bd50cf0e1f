"""Evaluation (``train/validation.py``) costs the device nothing it need not: no autograd
bookkeeping, no host read per batch, and the compiled model when training compiles.

The compiled path on several processes is ``test_compile.py``'s (a real inductor compile).
"""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from train.validation import evaluate

HOST_READS = {torch.tensor, torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
              torch.Tensor.__float__, torch.Tensor.cpu,
              torch.Tensor.numpy, torch.as_tensor}


class Recorder(torch.nn.Module):
    """A linear classifier that records whether each forward ran in inference mode."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(6, 3)
        self.inference = []

    def forward(self, x):
        self.inference.append(torch.is_inference_mode_enabled())
        return self.linear(x)


class CountHostReads(torch.overrides.TorchFunctionMode):
    """Counts the calls that make a tensor from host values or read one back to the host."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += func in HOST_READS
        return func(*args, **(kwargs or {}))


def batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(count)
    return [(torch.randn(4, 6, generator=generator), torch.randint(0, 3, (4,), generator=generator))
            for _ in range(count)]


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


def test_evaluation_runs_under_inference_mode(accelerator):
    """The model's forwards run under torch.inference_mode (not merely no_grad)."""
    model = Recorder()
    evaluate(model, batches(2), accelerator, 0.0, 3, channels_last=False)
    assert model.inference == [True, True]


def test_evaluation_reads_nothing_back_per_batch(accelerator):
    """Host reads and host-made tensors are as many for 8 batches as for 2: the totals stay on
    the device until the end, and the sample count is kept on the host."""
    counts = []
    for count in (2, 8):
        with CountHostReads() as mode:
            evaluate(Recorder(), batches(count), accelerator, 0.0, 3, channels_last=False)
        counts.append(mode.calls)
    assert counts[0] == counts[1]


def test_evaluation_metrics_are_the_exact_averages(accelerator):
    """Loss, top-1 and the sample count agree with a direct computation over all batches."""
    model, data = Recorder(), batches(3)
    result = evaluate(model, data, accelerator, 0.1, 3, channels_last=False)
    images, labels = torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])
    with torch.no_grad():
        logits = model.linear(images)
    assert result["val_samples"] == 12
    assert result["val_loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels,
                                                                                 label_smoothing=0.1).item())
    assert result["val_acc1"] == pytest.approx(100 * (logits.argmax(1) == labels).float().mean().item())
    assert result["val_acc5"] == 100.0  # top-5 of 3 classes is every class
