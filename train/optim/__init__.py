"""Optimizers, the step that drives each, lr schedules and BatchNorm statistics.

- ``registry``: optimizers by name (``[optim] name``) and what each needs;
- ``step``: the plain train step (forward and backward per micro-batch, one optimizer step through Accelerate);
- ``sam``: SAM's two-step (v1) and single-step (v2) train steps;
- ``schedule_free``: Schedule-Free SGD/AdamW and their averaged-weights evaluation hook;
- ``timm_optimizers``: any other optimizer timm's ``create_optimizer_v2`` knows, its keys checked against its class;
- ``weights``: the evaluation hook's default (evaluate the weights being trained);
- ``schedules``: lr schedules, stepped once per optimizer step;
- ``batchnorm``: recomputing or freezing BatchNorm running statistics.
"""

from .registry import (
                       OPTIMIZERS,
                       build_optimizer,
                       build_train_step,
                       check_supported,
                       evaluation_weights,
                       param_groups,
                       reads_training_batches,
                       reported_lr,
)
from .schedules import build_schedule
from .step import TrainStep
from .weights import TrainedWeights

__all__ = ["OPTIMIZERS", "TrainStep", "TrainedWeights", "build_optimizer", "build_schedule", "build_train_step",
           "check_supported", "evaluation_weights", "param_groups", "reads_training_batches", "reported_lr"]
