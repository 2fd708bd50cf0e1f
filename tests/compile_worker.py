"""Run by test_compile.py under ``accelerate launch`` with 2 processes and ``torch.compile``:

    compile_worker.py OUT

Each process prepares a small compiled model with Accelerate (DDP inside the compiled
wrapper), records the wrapper's parameter names, evaluates it with the project's
``evaluate`` (which compiles the unwrapped model for evaluation), records the names again and
how many graphs evaluation compiled, then takes one two-step SAM
step on its own batch and records the first pass's gradient: it must be this process's own,
not the average, so the wrapper must still run the forward through DDP's ``no_sync``.
Last, the names of the weights the trainer would export (``bare_model``'s, as ``loop.finish``
writes them). Everything goes to ``OUT/rank<r>.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from train.config import SGDSAMConfig  # noqa: E402
from train.models import bare_model  # noqa: E402
from train.optim import build_optimizer, build_train_step  # noqa: E402
from train.validation import evaluate, evaluation_model  # noqa: E402

SAM_V1 = SGDSAMConfig(momentum=0.9, weight_decay=0.0, rho=0.05, adaptive=False, v2=False)


def small_net() -> torch.nn.Module:
    torch.manual_seed(0)  # the same weights on both processes
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 8, 8, generator=generator), torch.randint(0, 3, (4,), generator=generator)


def main() -> None:
    accelerator = Accelerator(cpu=True, dynamo_backend="inductor")
    assert accelerator.num_processes == 2
    model = small_net()
    optimizer = build_optimizer(model, SAM_V1, 0.1, steps_per_epoch=1)
    model, optimizer = accelerator.prepare(model, optimizer)
    names_before = list(model.state_dict())
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    evaluate(model, [batch(100)], accelerator, 0.0, 3, channels_last=False)
    eval_graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
    names_after = list(model.state_dict())
    eval_model = evaluation_model(accelerator, model)

    step = build_train_step(SAM_V1, model, optimizer, torch.nn.CrossEntropyLoss(), accelerator, 0.0)
    seen = {}
    perturb = step.perturb

    def record_first_gradient(weights, grads):
        seen["first_grads"] = [g.detach().clone() for g in grads]
        perturb(weights, grads)

    step.perturb = record_first_gradient
    step(*batch(accelerator.process_index))  # each process its own batch
    result = {"names_before": names_before, "names_after": names_after, "first_grads": seen["first_grads"],
              "export_names": list(bare_model(accelerator, model).state_dict()),
              # evaluation compiled a graph of its own, of the bare model, made once for the run
              "eval_graphs": eval_graphs, "eval_model_reused": evaluation_model(accelerator, model) is eval_model,
              "eval_model_wraps_bare": getattr(eval_model, "_orig_mod", None) is bare_model(accelerator, model)}
    torch.save(result, Path(sys.argv[1]) / f"rank{accelerator.process_index}.pt")


if __name__ == "__main__":
    main()
