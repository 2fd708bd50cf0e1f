"""SAM v1 (two-step) and v2 (single-step) against hand-computed references, BatchNorm and fp16.

The steps run as the trainer runs them: built by the optimizer registry, on a model and
optimizer prepared by Accelerate. The references are in optim_reference.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate import Accelerator
from optim_reference import gradient, linear_model, sam_e, sam_v1_trajectory, sam_v2_trajectory, tiny_problem

from train.config import SGDConfig, SGDSAMConfig
from train.optim import build_optimizer, build_train_step
from train.optim.sam import PREVIOUS_GRAD, perturbation

LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 0.01


def prepared_step(model, cfg, criterion=None, scaler=None):
    """(step, model, optimizer) as run() builds them; `scaler` stands in for fp16 on the CPU.

    Accelerate gives a CPU run no GradScaler (it has no fp16 autocast there), so the fp16
    tests hand it a real CPU GradScaler: the loss scaling, unscaling and skipping are the
    same code paths a GPU run takes.
    """
    accelerator = Accelerator(cpu=True)
    if scaler is not None:
        accelerator.scaler = scaler
    optimizer = build_optimizer(model, cfg, LR, steps_per_epoch=10)
    model, optimizer = accelerator.prepare(model, optimizer)
    step = build_train_step(cfg, model, optimizer, criterion or torch.nn.MSELoss(), accelerator, grad_clip_norm=0.0)
    return step, model, optimizer


def sam_config(v2: bool, rho: float = 0.3, adaptive: bool = False) -> SGDSAMConfig:
    return SGDSAMConfig(momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, rho=rho, adaptive=adaptive, v2=v2)


def sgd_config() -> SGDConfig:
    return SGDConfig(momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


def close(actual: torch.Tensor, reference: torch.Tensor) -> None:
    """float32 training against a float64 reference."""
    torch.testing.assert_close(actual.detach().double(), reference, rtol=1e-5, atol=1e-6)


def run_steps(step, batches):
    results = [step(x, t) for x, t in batches]
    assert all(updated for _, updated in results)
    return results


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_sam_follows_the_reference_trajectory(v2, adaptive):
    weight, bias, batches = tiny_problem(steps=4)
    model = linear_model(weight, bias)
    step, model, _ = prepared_step(model, sam_config(v2, adaptive=adaptive))
    reference = (sam_v2_trajectory if v2 else sam_v1_trajectory)(weight, bias, batches, LR, MOMENTUM, WEIGHT_DECAY,
                                                                  rho=0.3, adaptive=adaptive)
    for (x, t), (ref_w, ref_b) in zip(batches, reference):
        _, updated = step(x, t)
        assert updated
        close(model.weight, ref_w)
        close(model.bias, ref_b)


def test_perturbation_has_length_rho_along_the_gradient():
    weights = [torch.randn(3, 4), torch.randn(4)]
    grads = [torch.randn(3, 4), torch.randn(4)]
    e = perturbation(weights, grads, rho=0.7, adaptive=False)
    flat_e, flat_g = torch.cat([t.flatten() for t in e]), torch.cat([t.flatten() for t in grads])
    assert torch.linalg.vector_norm(flat_e).item() == pytest.approx(0.7)
    assert torch.nn.functional.cosine_similarity(flat_e, flat_g, dim=0).item() == pytest.approx(1.0)
    # Adaptive: |w|-scaled, so a zero weight is never perturbed.
    weights[0][0, 0] = 0.0
    assert perturbation(weights, grads, rho=0.7, adaptive=True)[0][0, 0] == 0.0


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_rho_zero_is_exactly_the_base_sgd(v2):
    """Weights, momentum and BatchNorm statistics equal plain SGD's bit for bit."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5))
    batches = [(torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))) for _ in range(3)]
    ce = torch.nn.CrossEntropyLoss()
    sam_step, sam_model, _ = prepared_step(copy.deepcopy(net), sam_config(v2, rho=0.0), ce)
    sgd_step, sgd_model, _ = prepared_step(copy.deepcopy(net), sgd_config(), ce)
    for x, t in batches:
        sam_loss, _ = sam_step(x, t)
        sgd_loss, _ = sgd_step(x, t)
        assert torch.equal(sam_loss, sgd_loss)
    for (name, a), b in zip(sam_model.state_dict().items(), sgd_model.state_dict().values()):
        assert torch.equal(a, b), name


def test_single_step_sam_departs_from_sgd_at_the_second_step():
    weight, bias, batches = tiny_problem(steps=2)
    sam_step, sam_model, _ = prepared_step(linear_model(weight, bias), sam_config(v2=True))
    sgd_step, sgd_model, _ = prepared_step(linear_model(weight, bias), sgd_config())
    (x1, t1), (x2, t2) = batches
    sam_step(x1, t1), sgd_step(x1, t1)
    assert torch.equal(sam_model.weight, sgd_model.weight)  # nothing to perturb with yet
    sam_step(x2, t2), sgd_step(x2, t2)
    assert (sam_model.weight - sgd_model.weight).abs().max() > 1e-3
    # ... and the step that differs is the hand-computed one.
    ref_w, ref_b = sam_v2_trajectory(weight, bias, batches, LR, MOMENTUM, WEIGHT_DECAY, 0.3, False)[-1]
    close(sam_model.weight, ref_w)


def test_single_step_sam_keeps_the_gradient_it_stepped_with_in_the_optimizer_state(tmp_path):
    """So a checkpoint carries it: a run resumed from Accelerate's saved state perturbs at its
    first step as the original does."""
    weight, bias, batches = tiny_problem(steps=2)
    step, model, optimizer = prepared_step(linear_model(weight, bias), sam_config(v2=True))
    step(*batches[0])
    grad_w, grad_b = gradient(weight, bias, *batches[0])
    close(optimizer.state[model.weight][PREVIOUS_GRAD], grad_w)
    close(optimizer.state_dict()["state"][1][PREVIOUS_GRAD], grad_b)
    step.accelerator.save_state(str(tmp_path / "checkpoint"))  # what train.checkpoint.save writes

    resumed_step, resumed_model, resumed_optimizer = prepared_step(linear_model(weight * 0, bias * 0),
                                                                   sam_config(v2=True))
    resumed_step.accelerator.load_state(str(tmp_path / "checkpoint"))
    close(resumed_optimizer.state[resumed_model.weight][PREVIOUS_GRAD], grad_w)
    step(*batches[1])
    resumed_step(*batches[1])
    assert torch.equal(resumed_model.weight, model.weight) and torch.equal(resumed_model.bias, model.bias)
    ref_w, ref_b = sam_v2_trajectory(weight, bias, batches, LR, MOMENTUM, WEIGHT_DECAY, 0.3, False)[-1]
    close(resumed_model.weight, ref_w)  # the perturbed step, not a plain one


def test_two_step_sam_reports_the_loss_at_w():
    """The loss a step returns (logged, and averaged into the epoch's train_loss) is the batch's
    loss at w, the first pass's, not at w + e."""
    weight, bias, ((x, t),) = tiny_problem(steps=1)
    step, _, _ = prepared_step(linear_model(weight, bias), sam_config(v2=False))
    loss, _ = step(x, t)
    w, b, x64, t64 = weight.double(), bias.double(), x.double(), t.double()
    e_w, e_b = sam_e(w, b, *gradient(weight, bias, x, t), rho=0.3, adaptive=False)
    at_w = ((x64 @ w.T + b - t64) ** 2).mean().item()
    at_w_plus_e = ((x64 @ (w + e_w).T + (b + e_b) - t64) ** 2).mean().item()
    assert at_w_plus_e > 1.01 * at_w  # e ascends the loss: the two are told apart
    assert loss.item() == pytest.approx(at_w, rel=1e-6)


def test_two_step_sam_updates_batchnorm_statistics_in_the_first_pass_only():
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 6 * 6, 5))
    x, t = torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))
    once = copy.deepcopy(net).train()
    with torch.no_grad():
        once(x)  # one forward at w: what the statistics must become
    step, model, _ = prepared_step(net, sam_config(v2=False, rho=0.5), torch.nn.CrossEntropyLoss())
    step(x, t)
    bn = model[1]
    assert bn.num_batches_tracked.item() == 1
    assert torch.equal(bn.running_mean, once[1].running_mean) and torch.equal(bn.running_var, once[1].running_var)
    assert bn.track_running_stats  # switched back on after the second pass


def count_forwards(model):
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_fp16_loss_scaling_gives_the_unscaled_result(v2):
    """A power-of-two loss scale is exact: with it, SAM steps as without it (e computed unscaled)."""
    weight, bias, batches = tiny_problem(steps=3)
    scaled_step, scaled_model, _ = prepared_step(linear_model(weight, bias), sam_config(v2),
                                                 scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 12))
    plain_step, plain_model, _ = prepared_step(linear_model(weight, bias), sam_config(v2))
    run_steps(scaled_step, batches), run_steps(plain_step, batches)
    assert torch.equal(scaled_model.weight, plain_model.weight)


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_fp16_overflow_skips_the_whole_step_and_backs_off_the_scale(v2):
    weight, bias, batches = tiny_problem(steps=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    step, model, optimizer = prepared_step(linear_model(weight, bias), sam_config(v2), scaler=scaler)
    step(*batches[0])  # a normal step first: v2 then holds a gradient to perturb with
    before = [p.detach().clone() for p in model.parameters()]
    kept = {k: v.clone() for k, v in optimizer.state[model.weight].items()}
    forwards = count_forwards(model)

    scaler.update(new_scale=3e38)  # any loss > 1 now overflows when scaled
    x, t = batches[1]
    _, updated = step(x, 100 * t)
    assert not updated
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert len(forwards) == (1 if v2 else 2)  # v1: the second pass ran at w (e = 0), its step skipped
    assert scaler.get_scale() == pytest.approx(3e38 * scaler.get_backoff_factor(), rel=1e-6)
    for key, value in kept.items():  # momentum and v2's previous gradient are untouched
        assert torch.equal(optimizer.state[model.weight][key], value), key


def test_fp16_two_step_sam_never_reads_the_device_between_its_passes(monkeypatch):
    """The overflow decision stays on the device: a read-back (.item(), bool()) between the
    first and the second forward pass would leave a GPU idle while the host waits."""
    weight, bias, batches = tiny_problem(steps=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    step, model, _ = prepared_step(linear_model(weight, bias), sam_config(v2=False), scaler=scaler)
    events = []
    model.register_forward_hook(lambda *_: events.append("forward"))

    def recording(name):
        original = getattr(torch.Tensor, name)

        def read_back(self, *args):
            events.append(name)
            return original(self, *args)
        return read_back

    for name in ("item", "__bool__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, recording(name))
    for x, t in batches:
        events.clear()
        _, updated = step(x, t)
        assert updated
        first, second = [i for i, event in enumerate(events) if event == "forward"]
        assert events[first + 1:second] == [], events


def test_fp16_overflow_on_another_process_skips_the_step_here_too(monkeypatch):
    """Two-step SAM's first gradients are local: an overflow on one process alone must skip the
    step on all (the all-reduce of the overflow flag is simulated: the other process found one)."""
    weight, bias, batches = tiny_problem(steps=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    step, model, optimizer = prepared_step(linear_model(weight, bias), sam_config(v2=False), scaler=scaler)
    reduce = step.accelerator.reduce
    monkeypatch.setattr(step.accelerator, "reduce", lambda tensor, op: reduce(tensor, op) + 1)
    before = [p.detach().clone() for p in model.parameters()]
    _, updated = step(*batches[0])
    assert not updated
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert scaler.get_scale() == 2.0 ** 12 * scaler.get_backoff_factor()
    assert not optimizer.state[model.weight]  # no momentum buffer: the optimizer never stepped
