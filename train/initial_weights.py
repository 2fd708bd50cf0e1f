"""``train.checkpoint_dir``: where a run starts when its run directory has no checkpoint yet.

Two kinds of value:

- a training checkpoint (``RUN/checkpoints/<step>``, recognised by its ``trainer_state.json``):
  the run resumes from it exactly as ``--resume`` would (``startup.open_run_dir``);
- weights, for a fresh run that starts from them (fine-tuning): an exported model folder
  (``model.safetensors`` and ``config.json``), a ``.safetensors`` file, or ``hf-hub:<repo id>``,
  whose ``model.safetensors`` is fetched from the Hugging Face Hub (or its local cache).

Weights must fit the configured model exactly: same parameter names and shapes. Anything else
is a one-line error naming the first tensor that does not fit.
"""

from __future__ import annotations

from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError
from safetensors import SafetensorError
from safetensors.torch import load_file

from .checkpoint import TRAINER_STATE
from .errors import UserError
from .export import WEIGHTS, unwrapped_names

HUB_PREFIX = "hf-hub:"
KEY = "train.checkpoint_dir"


def training_checkpoint(checkpoint_dir: str) -> Path | None:
    """The training checkpoint ``checkpoint_dir`` names, or None when it names weights (or nothing)."""
    if not checkpoint_dir or checkpoint_dir.startswith(HUB_PREFIX):
        return None
    path = Path(checkpoint_dir)
    return path if (path / TRAINER_STATE).is_file() else None


def weights_file(checkpoint_dir: str) -> Path:
    """The safetensors file of a model folder, a file, or a Hub model (downloaded or cached)."""
    where = f"{KEY} = {checkpoint_dir!r}"
    if checkpoint_dir.startswith(HUB_PREFIX):
        repo_id = checkpoint_dir[len(HUB_PREFIX):]
        try:
            return Path(hf_hub_download(repo_id, WEIGHTS))
        except (HfHubHTTPError, EntryNotFoundError, OSError, ValueError) as exc:
            reason = " ".join(str(exc).split())[:200]
            raise UserError(f"{where}: cannot get {WEIGHTS} of {repo_id} from the Hugging Face Hub ({reason}); "
                            "check the id, the network and your access, or download the model folder and name "
                            "it here (HF_HUB_OFFLINE=1 reads the local cache only)") from None
    path = Path(checkpoint_dir)
    if path.is_dir() and (path / WEIGHTS).is_file():
        return path / WEIGHTS
    if path.is_file() and path.suffix == ".safetensors":
        return path
    if not path.exists():
        raise UserError(f"{where}: no such file or folder")
    raise UserError(f"{where}: not a training checkpoint (RUN/checkpoints/<step>), a model folder with {WEIGHTS}, "
                    "a .safetensors file or hf-hub:<repo id>")


def load_initial_weights(model: torch.nn.Module, checkpoint_dir: str, description: str) -> int:
    """Copy the weights ``checkpoint_dir`` names into ``model``; returns the number of tensors.

    ``description`` says what the model is ("resnet18 with 3 classes"), for the error.
    """
    file = weights_file(checkpoint_dir)
    try:
        state = unwrapped_names(load_file(str(file)))
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{KEY} = {checkpoint_dir!r}: cannot read {file} ({exc})") from None
    expected = model.state_dict()
    problems = [f"{name} is {list(state[name].shape)} there and {list(tensor.shape)} in the model"
                for name, tensor in expected.items() if name in state and state[name].shape != tensor.shape]
    problems += [f"{name} is missing there" for name in expected if name not in state]
    problems += [f"{name} is not in the model" for name in state if name not in expected]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(f"{KEY} = {checkpoint_dir!r}: the weights do not fit {description}: {problems[0]}{more}")
    model.load_state_dict(state)
    return len(state)
