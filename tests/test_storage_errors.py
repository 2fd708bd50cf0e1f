"""A disk that fills up, and a run directory that cannot be created: one line, no traceback,
nothing finished lost, and an exit status (74) that the SLURM wrapper does not requeue.

Two ways of filling the disk, neither needing root: a file-size limit (RLIMIT_FSIZE) makes
the real writers (safetensors, torch) fail in the kernel, on two real processes; and a fault
injected into torch's writer raises ENOSPC half-way through a file, as a full disk does.
"""

from __future__ import annotations

import errno
import resource
import signal

import torch
from helpers import checkpointing_configs
from test_preemption import configs, launch

from train import checkpoint as ckpt
from train.cli import main
from train.errors import EXIT_IO_ERROR


def limit_file_size(limit: int):
    """For the child process: writes past ``limit`` bytes fail with EFBIG (SIGXFSZ ignored)."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_two_processes_stop_together_when_a_checkpoint_does_not_fit(tiny_folder, tmp_path):
    run = tmp_path / "run"
    args = configs(tmp_path, tiny_folder) + ["--output-dir", str(run)]
    assert launch(args + ["--set", "train.max_epochs=1"], tmp_path / "status") == [0, 0]
    (previous,) = ckpt.list_checkpoints(run)

    # ResNet-18's weights alone are about 45 MB: the next checkpoint (at the end of epoch 4) cannot be written.
    stderr: list[str] = []
    statuses = launch(args, tmp_path / "status", preexec_fn=limit_file_size(30 * 2**20), stderr_lines=stderr)
    assert statuses == [EXIT_IO_ERROR, EXIT_IO_ERROR]
    errors = [line for line in stderr if line.startswith("error:")]
    assert len(errors) == 1, stderr[-20:]
    # No traceback from the trainer (accelerate launch prints its own for any worker that fails).
    ours = [line for line in stderr if "/train/" in line or line.startswith(("RuntimeError", "OSError", "Safetensor"))]
    assert not ours, ours
    assert errors[0].startswith(f"error: cannot write checkpoint {run / 'checkpoints' / '00000012'}: ")
    assert "File too large" in errors[0] and "GiB free" in errors[0]
    assert f"the previous checkpoint {previous} is intact" in errors[0]
    assert ckpt.list_checkpoints(run) == [previous] and ckpt.checkpoint_problem(previous) is None
    assert not list((run / "checkpoints").glob(ckpt.TMP_PREFIX + "*"))  # the staging folder is gone

    assert launch(args, tmp_path / "status") == [0, 0]  # space freed: the same command resumes and finishes
    assert [int(p.name) for p in ckpt.list_checkpoints(run)] == [3, 12]


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(tiny_folder, tmp_path,
                                                                                 monkeypatch, capsys):
    """The user's case: checkpoints every 2 steps, the second save runs out of space."""
    real_save = torch.save

    def save_until_the_disk_is_full(obj, f, *args, **kwargs):
        if f"{ckpt.TMP_PREFIX}00000004" not in str(f):  # the first checkpoint fits
            return real_save(obj, f, *args, **kwargs)
        with open(f, "wb") as out:
            out.write(b"\0" * 1000)  # part of the file made it to disk
        raise OSError(errno.ENOSPC, "No space left on device", str(f))

    monkeypatch.setattr(torch, "save", save_until_the_disk_is_full)
    monkeypatch.setattr(ckpt, "free_bytes", lambda path: 2**20)  # and the file system says so
    run = tmp_path / "run"
    args = checkpointing_configs(tmp_path, tiny_folder) + ["--output-dir", str(run)]
    assert main(args) == EXIT_IO_ERROR
    captured = capsys.readouterr()
    first = run / "checkpoints" / "00000002"
    assert ckpt.list_checkpoints(run) == [first] and ckpt.checkpoint_problem(first) is None
    assert not list((run / "checkpoints").glob(ckpt.TMP_PREFIX + "*"))
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"error: cannot write checkpoint {run / 'checkpoints' / '00000004'}: "
                          "No space left on device (")
    assert "has 0.00 GiB free, a checkpoint takes about 0.0" in err
    assert f"the previous checkpoint {first} is intact: free some space, then run the same command" in err
    # Before the save, a warning: less space than the last checkpoint took.
    assert "warning: 0.00 GiB free on " in captured.out and "less than the last checkpoint (00000002" in captured.out


def test_an_output_dir_that_cannot_be_created_is_one_line(tmp_path, tiny_folder, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    args = checkpointing_configs(tmp_path, tiny_folder) + ["--output-dir", str(blocker / "run")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --output-dir {blocker / 'run'}: cannot create the run directory: {blocker} is a file, " \
                  "not a folder"
