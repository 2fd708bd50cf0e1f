"""``train.checkpoint_dir``: a training checkpoint resumes as ``--resume`` does (until the run
has checkpoints of its own); a model folder, a .safetensors file or ``hf-hub:`` id gives a
fresh run its initial weights; anything that does not fit is a one-line error."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers import checkpointing_configs as configs
from helpers import run_train, without_timing
from safetensors.torch import load_file

from train import checkpoint as ckpt
from train.cli import main
from train.config import load_config
from train.errors import UserError
from train.export import WEIGHTS, unwrapped_names
from train.initial_weights import load_initial_weights, training_checkpoint
from train.models import build_model
from train.rundir import read_metrics
from train.startup import RunOptions, start_run


def mid_run_checkpoint(run: Path) -> Path:
    """A checkpoint of ``run`` from before its last step."""
    folders = ckpt.list_checkpoints(run)
    assert len(folders) >= 2
    return folders[-2]


def tiny_model(num_classes: int = 3, arch: str = "resnet18") -> torch.nn.Module:
    return build_model(arch, num_classes, 32, 32)


def assert_same_weights(model: torch.nn.Module, file: Path) -> None:
    saved = unwrapped_names(load_file(str(file)))
    state = model.state_dict()
    assert state.keys() == saved.keys()
    for name, tensor in saved.items():
        assert torch.equal(state[name].cpu(), tensor), name


# --------------------------------------------------------------------- training checkpoints


def test_a_checkpoint_folder_resumes_as_resume_does_until_the_run_has_its_own(reference_run, tiny_folder, tmp_path,
                                                                              capsys):
    start = mid_run_checkpoint(reference_run)
    assert training_checkpoint(str(start)) == start
    out = tmp_path / "out"
    args = configs(tmp_path, tiny_folder) + ["--output-dir", str(out), "--set", f'train.checkpoint_dir="{start}"']
    assert main(args) == 0
    assert f"resumed from {start}:" in capsys.readouterr().out
    assert without_timing(read_metrics(out / "metrics.jsonl")) == \
        without_timing(read_metrics(reference_run / "metrics.jsonl"))
    # A requeued job continues from the run's own newest checkpoint, not from checkpoint_dir again.
    assert main(args + ["--set", "train.max_epochs=5"]) == 0
    assert f"resumed from {out / 'checkpoints' / '00000012'}:" in capsys.readouterr().out
    assert [r["epoch"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4, 5]


def test_a_damaged_checkpoint_named_by_checkpoint_dir_is_a_one_line_error(reference_run, tiny_folder, tmp_path,
                                                                          capsys):
    start = Path(shutil.copytree(mid_run_checkpoint(reference_run), tmp_path / "ckpt"))
    (start / ckpt.MANIFEST).unlink()
    args = configs(tmp_path, tiny_folder) + ["--output-dir", str(tmp_path / "out"),
                                             "--set", f'train.checkpoint_dir="{start}"']
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: train.checkpoint_dir = {start}: not a usable checkpoint (no manifest.json (incomplete))"


# --------------------------------------------------------------------------- initial weights


def test_a_fresh_run_starts_from_the_weights_of_a_model_folder(reference_run, tiny_folder, tmp_path, caplog):
    model_folder = reference_run / "model"
    args = configs(tmp_path, tiny_folder)
    config = load_config(args[1], args[3], [f'train.checkpoint_dir="{model_folder}"'])
    run, state = start_run(config, RunOptions(output_dir=tmp_path / "out"))
    try:
        assert run.trainer.step == 0 and state.batches_done == 0  # a fresh run, not a resumed one
        assert_same_weights(run.accelerator.unwrap_model(run.model), model_folder / WEIGHTS)
    finally:
        run.stop.uninstall()
        run.accelerator.end_training()
    assert f"initialised the weights from {model_folder} (" in (tmp_path / "out" / "train.log").read_text()


def test_a_safetensors_file_gives_its_weights(reference_run):
    model = tiny_model()
    checkpoint_weights = ckpt.list_checkpoints(reference_run)[-1] / WEIGHTS  # Accelerate's file, names as saved
    assert load_initial_weights(model, str(checkpoint_weights), "resnet18 with 3 classes") == len(model.state_dict())
    assert_same_weights(model, checkpoint_weights)


@pytest.mark.parametrize("num_classes, arch, first", [
    (5, "resnet18", "fc.weight is [3, 512] there and [5, 512] in the model (and 1 more)"),
    (3, "resnet34", "layer1.2.conv1.weight is missing there (and "),
])
def test_weights_that_do_not_fit_are_a_one_line_error(reference_run, num_classes, arch, first):
    model = tiny_model(num_classes, arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError) as error:
        load_initial_weights(model, str(reference_run / "model"), f"{arch} with {num_classes} classes")
    message = str(error.value)
    assert len(message.splitlines()) == 1
    assert message.startswith(f"train.checkpoint_dir = '{reference_run / 'model'}': the weights do not fit "
                              f"{arch} with {num_classes} classes: {first}")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # left untouched


@pytest.mark.parametrize("what", ["missing", "folder without weights", "other file"])
def test_a_value_that_names_no_weights_is_a_one_line_error(tmp_path, what):
    target = tmp_path / "x"
    if what == "folder without weights":
        target.mkdir()
    elif what == "other file":
        target = tmp_path / "weights.bin"
        target.write_bytes(b"\0" * 8)
    with pytest.raises(UserError) as error:
        load_initial_weights(tiny_model(), str(target), "resnet18 with 3 classes")
    expected = "no such file or folder" if what == "missing" else "not a training checkpoint (RUN/checkpoints/<step>)"
    assert expected in str(error.value) and len(str(error.value).splitlines()) == 1


def test_a_hub_model_that_cannot_be_fetched_is_a_one_line_error(tiny_folder, tmp_path):
    # The Hub is out of reach here: offline mode gives the error at once instead of after retries.
    args = configs(tmp_path, tiny_folder) + ["--output-dir", str(tmp_path / "out"),
                                             "--set", 'train.checkpoint_dir="hf-hub:timm/resnet18.a1_in1k"']
    result = run_train(args, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: train.checkpoint_dir = 'hf-hub:timm/resnet18.a1_in1k': cannot get "
                               "model.safetensors of timm/resnet18.a1_in1k from the Hugging Face Hub (")
    assert "HF_HUB_OFFLINE=1" in lines[0]
