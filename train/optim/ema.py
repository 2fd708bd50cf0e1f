"""An exponential moving average of the weights (``[train.ema]``), through timm's ``ModelEmaV3``.

The average is updated once per optimizer step that moved the weights: after a whole
accumulated batch, never per micro-batch, and not after an fp16 step the grad scaler skipped.
The number of updates drives timm's decay warm-up and travels with the average in each
checkpoint, so a resumed run continues with the decay it would have used.

BatchNorm statistics (``buffers``): by default, as timm's ``train.py`` runs ``ModelEmaV3``,
every floating-point entry of the state dict is averaged, running means and variances
included, and integer buffers (``num_batches_tracked``) are copied; ``"copy"`` (timm's
``exclude_buffers``) averages the parameters only and copies every buffer from the trained model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from timm.utils.model_ema import ModelEmaV3

from ..config import EmaConfig
from ..errors import UserError


class WeightAverage:
    """The average of ``trained``'s weights (the bare model, whose parameters the optimizer moves)."""

    def __init__(self, trained: torch.nn.Module, cfg: EmaConfig):
        self.trained = trained
        self.cfg = cfg
        # A copy on the trained model's device, in eval mode, never given gradients.
        self.ema = ModelEmaV3(trained, decay=cfg.decay, use_warmup=cfg.warmup, warmup_gamma=cfg.warmup_gamma,
                              warmup_power=cfg.warmup_power, exclude_buffers=cfg.buffers == "copy")
        self.ema.requires_grad_(False)
        self.updates = 0  # optimizer steps averaged so far

    @property
    def module(self) -> torch.nn.Module:
        """The averaged model, to evaluate or export."""
        return self.ema.module

    def decay(self) -> float:
        """The decay the next update uses. timm counts the first update as step 1, which copies the
        weights (decay 0), as its train.py does by passing the number of updates."""
        return self.ema.get_decay(self.updates + 1)

    def update(self) -> None:
        """Fold the trained weights into the average (after an optimizer step that moved them)."""
        self.updates += 1
        self.ema.update(self.trained, step=self.updates)

    def save(self, path: Path) -> None:
        """The average as safetensors, its update count in the metadata."""
        state = {name: tensor.detach().to("cpu").contiguous() for name, tensor in self.module.state_dict().items()}
        save_file(state, str(path), metadata={"format": "pt", "updates": str(self.updates)})

    def load(self, path: Path) -> None:
        if not path.is_file():
            raise UserError(f"{path.parent}: the checkpoint has no {path.name}, but train.ema.enabled = true; it was "
                            "written by a run without the average: resume it with train.ema.enabled = false")
        self.module.load_state_dict(load_file(str(path)))
        self.updates = read_updates(path)


def read_updates(path: Path) -> int:
    with safe_open(str(path), framework="pt") as f:
        return int(f.metadata()["updates"])


def build_weight_average(trained: torch.nn.Module, cfg: EmaConfig) -> WeightAverage | None:
    """The run's average, or None when ``[train.ema]`` is off."""
    return WeightAverage(trained, cfg) if cfg.enabled else None
