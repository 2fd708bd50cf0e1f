"""TensorBoard logging through Accelerate's tracker, into ``<run>/tensorboard/``.

What is written (step = optimizer steps so far):

- every ``log_freq`` steps: ``train/loss`` (that step's batch, this process), ``train/lr``,
  ``train/images_per_s`` (global images per second since the previous log step),
  ``train/grad_norm`` (L2 norm over all parameters of the gradient the optimizer stepped with;
  after clipping when ``grad_clip_norm`` is on) and the peak memory: ``train/peak_memory_gib``
  (``torch.cuda.max_memory_allocated``) on a GPU, ``train/peak_rss_gib`` (the main process's
  peak resident set size) on the CPU;
- every evaluation: ``val/loss``, ``val/acc1``, ``val/acc5`` (percent), ``train/epoch_loss``,
  ``train/epoch``, ``time/epoch_s`` and ``time/train_s`` (training time so far, evaluation
  excluded), ``time/eval_s`` (that evaluation), ``time/eta_s`` (the estimated time to the run's
  end) and ``cost/gpu_hours`` (device-hours so far; process-hours on the CPU: see ``cost.py``),
  the same numbers as the record in ``metrics.jsonl``;
- once per start: the flattened config (``train.optim.momentum`` = 0.9, ...) as hyperparameters.

In the log: every process's peak memory at the first log step and at each evaluation, with a
warning when a process is above 90% of its device's memory (see ``memory_in_use``).

Only the main process writes (Accelerate's trackers act on the main process alone). Values
are read back from the device only at log steps, where the loop already waits for the loss.
With ``[log] wandb_on`` the same values also go to Weights & Biases (``wandb_tracking.py``).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from .config import flatten
from .wandb_tracking import ResumingWandBTracker

LOG = logging.getLogger("train")

TRACKER_FOLDER = "tensorboard"  # Accelerate's project name: the folder under the run directory
# Above this share of its memory a process is one larger batch, or a fragmented cache, away
# from running out: the log warns.
MEMORY_WARNING_SHARE = 0.9


def flatten_config(table: dict) -> dict[str, bool | int | float | str]:
    """The config's dotted keys (``train.lr``) with scalar values: TensorBoard's hyperparameters
    accept only numbers, booleans and strings, so anything else becomes its string."""
    return {key: value if isinstance(value, (bool, int, float, str)) else str(value)
            for key, value in flatten(table).items()}


@torch.no_grad()
def gradient_norm(parameters) -> float | None:
    """The L2 norm of all ``.grad`` tensors taken together, or None when there are none.

    After Accelerate's optimizer step the gradients are unscaled (fp16) and, with DDP, the
    same on every process, so the main process's copy is the global gradient.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return None
    # One multi-tensor kernel for all the per-tensor norms (a loop launches one per parameter).
    norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
    return torch.linalg.vector_norm(torch.stack(norms)).item()


def peak_memory(device: torch.device) -> dict[str, float]:
    """The run's peak memory so far, in GiB, under a tag that says what was measured."""
    if device.type == "cuda":
        return {"train/peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    try:
        import resource
    except ImportError:  # not on Windows
        return {}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    bytes_per_unit = 1 if sys.platform == "darwin" else 1024  # Linux reports KiB, macOS bytes
    return {"train/peak_rss_gib": peak * bytes_per_unit / 2**30}


def memory_in_use(device: torch.device) -> tuple[int, int]:
    """(the most memory this process has held, the memory its device has), in bytes.

    On a GPU: PyTorch's cache at its peak plus everything else on the device now (the CUDA
    context, DALI's buffers, NCCL's), which is what running out depends on. On the CPU: the
    process's peak resident set and the machine's physical memory.
    """
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        others = max(total - free - torch.cuda.memory_reserved(device), 0)
        return torch.cuda.max_memory_reserved(device) + others, total
    peak = peak_memory(device).get("train/peak_rss_gib", 0.0) * 2**30
    return int(peak), os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_report(when: str, usage: list[tuple[float, float]]) -> tuple[str, str | None]:
    """A log line on every process's peak memory (``usage``: (peak, capacity) per process), and
    a warning naming the processes above MEMORY_WARNING_SHARE of their device, or None."""
    gib = [(peak / 2**30, capacity / 2**30) for peak, capacity in usage]
    shares = [peak / capacity if capacity else 0.0 for peak, capacity in usage]
    top = max(range(len(usage)), key=shares.__getitem__)
    peaks = [peak for peak, _ in gib]
    spread = f"{peaks[0]:.2f} GiB" if len(peaks) == 1 else f"{min(peaks):.2f}-{max(peaks):.2f} GiB"
    line = (f"peak memory {when}: {spread} per process, at most {100 * shares[top]:.0f}% of "
            f"{gib[top][1]:.1f} GiB (process {top})")
    crowded = [rank for rank, share in enumerate(shares) if share > MEMORY_WARNING_SHARE]
    warning = None
    if crowded:
        warning = (f"warning: process(es) {', '.join(map(str, crowded))} used more than "
                   f"{100 * MEMORY_WARNING_SHARE:.0f}% of their memory ({gib[top][0]:.2f} of {gib[top][1]:.1f} GiB) "
                   f"{when}: little headroom is left; a lower train.batch_size (per process) leaves more")
    return line, warning


class RunTracker:
    """Owns the run's TensorBoard logging; ``accelerator.end_training()`` closes it.

    ``accelerator`` must have been created with ``log_with="tensorboard"``. Its logging folder
    is set here, because the run directory is only named after the processes can talk to
    each other (the main process's timestamp), that is after the Accelerator exists.
    """

    def __init__(self, accelerator: Accelerator, run_dir: Path, config_table: dict, resumed_at_step: int = 0,
                 wandb_project: str | None = None):
        self.accelerator = accelerator
        if wandb_project is not None:  # W&B too: a tracker object of ours, which init_trackers starts
            accelerator.log_with.append(ResumingWandBTracker(run_dir, wandb_project))
        accelerator.project_configuration.logging_dir = str(run_dir)
        self.log_dir = run_dir / TRACKER_FOLDER
        # A resumed run repeats the steps after its checkpoint, and a run started afresh all of
        # them: purge_step makes TensorBoard drop what an earlier attempt logged for those
        # steps, so each step keeps one value.
        init_kwargs = {"tensorboard": {"purge_step": resumed_at_step + 1}}
        accelerator.init_trackers(TRACKER_FOLDER, config=flatten_config(config_table), init_kwargs=init_kwargs)
        self.memory_reported = False

    def report_memory(self, when: str) -> None:
        """Log every process's peak memory, and warn when one is close to its device's limit
        (collective: every process must call it)."""
        peak, capacity = memory_in_use(self.accelerator.device)
        usage = self.accelerator.gather(torch.tensor([[peak, capacity]], dtype=torch.float64,
                                                     device=self.accelerator.device)).tolist()
        line, warning = memory_report(when, [tuple(row) for row in usage])
        LOG.info(line)
        if warning:
            LOG.warning(warning)

    def log_train_step(self, step: int, loss: float, lr: float, images_per_s: float | None, model) -> None:
        """At a log step, after the optimizer step (its gradients are still in ``.grad``).

        Every process calls it (the first call reports every process's peak memory)."""
        if not self.memory_reported:
            self.memory_reported = True
            self.report_memory(f"at step {step}")
        if not self.accelerator.is_main_process:
            return
        values = {"train/loss": loss, "train/lr": lr}
        if images_per_s is not None:
            values["train/images_per_s"] = images_per_s
        norm = gradient_norm(model.parameters())
        if norm is not None:
            values["train/grad_norm"] = norm
        values.update(peak_memory(self.accelerator.device))
        self.accelerator.log(values, step=step)

    def log_evaluation(self, record: dict) -> None:
        """One ``metrics.jsonl`` record (see loop.run); every process calls it."""
        self.report_memory(f"at the evaluation of epoch {record['epoch']}")
        self.accelerator.log({
            "val/loss": record["val_loss"], "val/acc1": record["val_acc1"], "val/acc5": record["val_acc5"],
            "train/epoch_loss": record["train_loss"], "train/epoch": record["epoch"],
            "time/epoch_s": record["epoch_time_s"], "time/train_s": record["train_time_s"],
            "time/eval_s": record["eval_time_s"], "time/eta_s": record["eta_s"], "cost/gpu_hours": record["gpu_hours"],
            # the weights' moving average, when the run keeps one
            **{f"val_ema/{name}": record[f"val_{name}_ema"] for name in ("loss", "acc1", "acc5")
               if f"val_{name}_ema" in record},
            **({"train/crop_size": record["train_crop_size"]} if "train_crop_size" in record else {}),
        }, step=record["step"])
