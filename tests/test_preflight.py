"""``--preflight``: every stage of a run in miniature, one table, an estimate; a failure names its stage.

Real runs on the CPU, with 1 process and 2 (gloo); failures are real ones (a corrupt image, a
file where a folder must be, a file-size limit, missing validation images), made after the
run has started where the scratch directory must exist first.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import (
    REPO,
    accelerate_launch,
    clean_env,
    data_toml,
    free_port,
    make_image_folder,
    run_train,
    tiny_train_toml,
    write,
)
from test_launch import sbatch, slurm_env, submit_dir
from test_storage_errors import limit_file_size
from test_tracking import scalars

from train import preflight as preflight_module
from train.cli import main
from train.errors import EXIT_IO_ERROR, EXIT_USER_ERROR
from train.loop import train_one_epoch
from train.preflight import contention_note, parse_slurm_time
from train.rundir import read_metrics

STANDINS = REPO / "tests" / "slurm_standins"
def stage_names(warm_up: int, timed: int) -> list[str]:
    """The report's stages, for a preflight of ``warm_up`` + ``timed`` steps."""
    return ["scratch directory next to the run's", "start: data opened and verified, model and optimizer built",
            f"train {warm_up} steps (warm-up)", "checkpoint written and loaded back",
            f"train {timed} steps resumed from it, timed", "input pipeline alone vs model alone",
            "evaluation on a slice of validation", "TensorBoard events written and read back",
            "export written and loaded through timm"]


STAGES = stage_names(2, 6)  # --preflight-steps 8


def configs(tmp_path: Path, folder: Path, loader: str = "hf", **train_overrides) -> list[str]:
    """The tiny run, 10 epochs of 3 steps; its preflight: 8 steps."""
    values = {"max_epochs": 10}
    values.update(train_overrides)
    data = write(tmp_path / "data.toml", data_toml(folder).replace('name = "hf"', f'name = "{loader}"'))
    train = write(tmp_path / "train.toml", tiny_train_toml(**values))
    return ["--data-cfg", str(data), "--train-cfg", str(train), "--preflight", "--preflight-steps", "8"]


def table(stdout: str, stages: list[str] = STAGES) -> dict[str, str]:
    """Each stage's result, from the printed table."""
    rows = {}
    for line in stdout.splitlines():
        for name in stages:
            if line.startswith(f"  {name} "):
                rows[name] = line[len(name) + 2:].split()[0]
    return rows


def assert_failed_at(stage: str, stdout: str, stderr: str) -> None:
    rows = table(stdout)
    assert list(rows) == STAGES, stdout
    at = STAGES.index(stage)
    assert [rows[s] for s in STAGES] == ["ok"] * at + ["failed"] + ["skipped"] * (len(STAGES) - at - 1), stdout
    assert f'error: preflight failed at stage "{stage}": ' in stderr
    # The estimate needs the timed training and the evaluation; after them it is given all the same.
    assert ("estimate for the full run" in stdout) == (at > STAGES.index("evaluation on a slice of validation"))


def leftovers(out: Path) -> list[Path]:
    """The real run directory and any scratch directory next to it."""
    return sorted(out.parent.glob(f"{out.name}*"))


def test_one_process_runs_every_stage_and_estimates_the_run(tiny_folder, tmp_path):
    out = tmp_path / "out"
    result = run_train(configs(tmp_path, tiny_folder) + ["--output-dir", str(out), "--preflight-keep"])
    assert result.returncode == 0, result.stderr[-3000:]
    rows = table(result.stdout)
    assert rows == dict.fromkeys(STAGES, "ok"), result.stdout
    assert re.search(r"train 6 steps resumed from it, timed +ok +[\d.]+s +[\d.]+ s/step, ([\d.]+) img/s per "
                     r"process, \1 img/s in total", result.stdout)
    assert re.search(r"input pipeline alone vs model alone +ok .* bound by the (input pipeline|model): loader alone "
                     r"[\d.]+ img/s, training on a batch in memory [\d.]+ img/s", result.stdout)
    assert re.search(r"peak memory during the preflight: [\d.]+ GiB per process", result.stdout)
    spp = float(re.search(r"10 epochs of 3 steps at ([\d.]+) s/step", result.stdout).group(1))
    assert re.search(r"30 steps, wall time \d:\d\d:\d\d, [\d.]+ process-hours", result.stdout)
    assert spp > 0
    assert "requeue" not in result.stdout  # not under SLURM

    # Nothing was written into the real run's directory; the scratch one, kept, holds every stage's work.
    (scratch,) = leftovers(out)
    assert not out.exists() and scratch.name.startswith("out.preflight-")
    assert f"scratch directory {scratch} (kept)" in result.stdout
    assert [p.name for p in (scratch / "checkpoints").iterdir()] == ["00000002"]
    (record,) = read_metrics(scratch / "metrics.jsonl")
    assert record["step"] == 8 and 0 < record["val_samples"] <= 15
    assert [s for s, _ in scalars(scratch)["val/acc1"]] == [8]
    assert (scratch / "model" / "model.safetensors").is_file()


def test_the_scratch_directory_is_removed_and_the_real_run_is_untouched(tiny_folder, tmp_path):
    """A finished run's directory stays as it was; the preflight's scratch folder goes."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"epoch": 1}\n')
    assert main(configs(tmp_path, tiny_folder) + ["--output-dir", str(out)]) == 0
    assert leftovers(out) == [out] and [p.name for p in out.iterdir()] == ["metrics.jsonl"]
    assert (out / "metrics.jsonl").read_text() == '{"epoch": 1}\n'


def test_dali_loader_preflight(tiny_folder, tmp_path):
    out = tmp_path / "out"
    result = run_train(configs(tmp_path, tiny_folder, loader="dali") + ["--output-dir", str(out)],
                       XDG_CACHE_HOME=str(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert table(result.stdout) == dict.fromkeys(STAGES, "ok"), result.stdout
    assert leftovers(out) == []


def test_two_processes_under_slurm_count_the_requeues(tiny_folder, tmp_path):
    out = tmp_path / "out"
    result = run_train(configs(tmp_path, tiny_folder) + ["--output-dir", str(out)],
                       launcher=accelerate_launch(2, free_port()), SLURM_JOB_ID="4242",
                       STANDIN_SQUEUE_TIME_LIMIT="00:00:01", PATH=f"{STANDINS}:{clean_env()['PATH']}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert table(result.stdout) == dict.fromkeys(STAGES, "ok"), result.stdout
    assert "2 process(es) on cpu" in result.stdout
    per_process, total = map(float, re.search(r"([\d.]+) img/s per process, ([\d.]+) img/s in total",
                                              result.stdout).groups())
    assert total == pytest.approx(2 * per_process, rel=1e-2)
    assert re.search(r"peak memory during the preflight: [\d.]+-[\d.]+ GiB per process", result.stdout)
    hours, minutes, seconds = map(int, re.search(r"wall time (\d+):(\d\d):(\d\d)", result.stdout).groups())
    wall = hours * 3600 + minutes * 60 + seconds
    requeues = int(re.search(r"job 4242's time limit 00:00:01: (\d+) requeue\(s\)", result.stdout).group(1))
    assert requeues >= 1 and abs(requeues - (wall - 1)) <= 1  # one job per second of the estimate
    assert leftovers(out) == []


def test_the_slurm_wrapper_passes_the_flag_and_the_run_directory_stays_empty(tiny_folder, tmp_path):
    """launch/2xCPU.sh under the SLURM stand-ins, --preflight added to the same command."""
    root = submit_dir(tmp_path, tiny_folder, max_epochs=10)
    env = slurm_env(root, job_id=4250, gpus_per_node=1, STANDIN_SQUEUE_TIME_LIMIT="1-00:00:00")
    result = sbatch(root, "2xCPU", env, "--preflight", "--preflight-steps", "8")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert table(result.stdout) == dict.fromkeys(STAGES, "ok"), result.stdout
    assert "2 process(es) on cpu" in result.stdout
    assert "job 4250's time limit 1-00:00:00: 0 requeue(s), 1 job(s) in all" in result.stdout
    assert list((root / "runs").iterdir()) == []  # neither runs/4250 nor its scratch directory is left
    assert not (root / "scontrol.log").exists()


# ------------------------------------------------------------------------- failures, stage by stage


def corrupt_first_image(folder: Path, split: str = "train") -> Path:
    victim = sorted((folder / split).rglob("*.JPEG"))[0]
    victim.write_bytes(victim.read_bytes()[:200])  # a truncated JPEG
    return victim


def test_a_corrupt_image_fails_the_data_stage_on_two_processes(tmp_path):
    folder = make_image_folder(tmp_path / "data")
    victim = corrupt_first_image(folder)
    out = tmp_path / "out"
    result = run_train(configs(tmp_path, folder, loader="dali") + ["--output-dir", str(out)],
                       launcher=accelerate_launch(2, free_port()), XDG_CACHE_HOME=str(tmp_path / "cache"))
    assert result.returncode != 0
    assert_failed_at(STAGES[1], result.stdout, result.stderr)
    assert str(victim) in result.stderr.split("error: preflight failed", 1)[1].splitlines()[0]
    assert leftovers(out) == []


def test_a_checkpoint_that_cannot_be_written_fails_its_stage_on_two_processes(tiny_folder, tmp_path):
    """A file-size limit below a checkpoint's size: the file system refuses it, as a full disk does."""
    out = tmp_path / "out"
    command = accelerate_launch(2, free_port()) + ["-m", "train", *configs(tmp_path, tiny_folder),
                                                   "--output-dir", str(out)]
    result = subprocess.run(command, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=600,
                            preexec_fn=limit_file_size(30 * 2**20))
    assert result.returncode != 0
    assert_failed_at(STAGES[3], result.stdout, result.stderr)
    assert "cannot write checkpoint" in result.stderr
    assert leftovers(out) == []


def test_a_failure_on_the_main_process_alone_stops_both(tiny_folder, tmp_path):
    """The export is the main process's work: the other process learns of its failure and
    stops with the same status, at the same stage."""
    out, statuses = tmp_path / "out", tmp_path / "status"
    statuses.mkdir()
    command = accelerate_launch(2, free_port()) + [str(REPO / "tests" / "preflight_worker.py"), str(statuses),
                                                   *configs(tmp_path, tiny_folder), "--output-dir", str(out)]
    result = subprocess.run(command, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert_failed_at(STAGES[8], result.stdout, result.stderr)
    assert "process 0: " in result.stderr
    assert sorted(p.read_text() for p in statuses.glob("*.exit")) == ["1", "1"]
    assert leftovers(out) == []


def injected(monkeypatch, damage) -> None:
    """``damage(run)`` right after the preflight's run has started (its scratch directory exists)."""
    real = preflight_module.start_run

    def start_run(*args, **kwargs):
        run, state = real(*args, **kwargs)
        damage(run)
        return run, state

    monkeypatch.setattr(preflight_module, "start_run", start_run)


def fail_training_step(after: int):
    """The run's step raises (as a device running out of memory would) from call ``after`` + 1 on."""
    def damage(run) -> None:
        real, calls = run.train_step.on_micro_batches, []

        def on_micro_batches(batches):
            calls.append(1)
            if len(calls) > after:
                raise RuntimeError("CUDA out of memory (injected)")
            return real(batches)
        run.train_step.on_micro_batches = on_micro_batches
    return damage


def file_instead_of(name: str):
    def damage(run) -> None:
        (run.run_dir / name).write_text("a file where a folder must be\n")
    return damage


def remove_validation_images(folder: Path):
    def damage(run) -> None:
        for image in (folder / "val").rglob("*.JPEG"):
            image.unlink()
    return damage


def drop_evaluation_logging(run) -> None:
    """The tracker loses the evaluation's values (nothing reaches the event file)."""
    run.tracker.log_evaluation = lambda record: None


def test_training_resumes_from_what_the_checkpoint_holds(tmp_path, monkeypatch, capsys):
    """Weights spoiled in memory just after the save: the load restores them, so training goes on
    from the checkpoint and every later stage (the export compares outputs) is ok."""
    real_save = preflight_module.save_checkpoint

    def save_then_spoil(run, state) -> None:
        real_save(run, state)
        with torch.no_grad():
            for parameter in run.model.parameters():
                parameter.fill_(float("nan"))

    monkeypatch.setattr(preflight_module, "save_checkpoint", save_then_spoil)
    folder = make_image_folder(tmp_path / "data")
    out = tmp_path / "out"
    assert main(configs(tmp_path, folder) + ["--output-dir", str(out), "--preflight-keep"]) == 0
    assert table(capsys.readouterr().out) == dict.fromkeys(STAGES, "ok")
    (scratch,) = leftovers(out)
    (record,) = read_metrics(scratch / "metrics.jsonl")
    assert math.isfinite(record["val_loss"]) and math.isfinite(record["train_loss"])


def test_a_checkpoint_damaged_after_writing_fails_its_stage(tmp_path, monkeypatch, capsys):
    """The checkpoint is read back, not only written: a weights file cut short after the save is found."""
    real_save = preflight_module.save_checkpoint

    def save_then_truncate(run, state) -> None:
        real_save(run, state)
        (weights,) = (run.run_dir / "checkpoints").glob("*/model.safetensors")
        weights.write_bytes(weights.read_bytes()[:1000])

    monkeypatch.setattr(preflight_module, "save_checkpoint", save_then_truncate)
    folder = make_image_folder(tmp_path / "data")
    out = tmp_path / "out"
    assert main(configs(tmp_path, folder) + ["--output-dir", str(out)]) == 1
    captured = capsys.readouterr()
    assert_failed_at(STAGES[3], captured.out, captured.err)
    assert "the checkpoint of step 2 was not found complete" in captured.err


@pytest.mark.parametrize("stage, damage, status", [
    (STAGES[2], lambda folder: fail_training_step(after=1), 1),
    (STAGES[3], lambda folder: file_instead_of("checkpoints"), EXIT_IO_ERROR),
    (STAGES[4], lambda folder: fail_training_step(after=4), 1),
    (STAGES[5], lambda folder: fail_training_step(after=8), 1),
    (STAGES[6], remove_validation_images, EXIT_USER_ERROR),
    (STAGES[7], lambda folder: drop_evaluation_logging, 1),
    (STAGES[8], lambda folder: file_instead_of("model"), 1),
], ids=["warm-up", "checkpoint", "timed-training", "pipeline-balance", "evaluation", "tensorboard", "export"])
def test_a_failure_in_each_stage_is_named_and_stops_the_preflight(stage, damage, status, tmp_path, monkeypatch,
                                                                  capsys):
    folder = make_image_folder(tmp_path / "data")
    injected(monkeypatch, damage(folder))
    out = tmp_path / "out"
    assert main(configs(tmp_path, folder) + ["--output-dir", str(out)]) == status
    captured = capsys.readouterr()
    assert_failed_at(stage, captured.out, captured.err)
    assert len(captured.err.strip().splitlines()) == 1  # one line, no traceback
    assert leftovers(out) == []


def test_an_output_dir_below_a_file_fails_the_first_stage(tiny_folder, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(configs(tmp_path, tiny_folder) + ["--output-dir", str(blocker / "out")]) == EXIT_USER_ERROR
    captured = capsys.readouterr()
    assert_failed_at(STAGES[0], captured.out, captured.err)
    assert str(blocker) in captured.err


def test_a_corrupt_image_with_the_hf_loader_fails_in_training_naming_the_file(tmp_path, capsys):
    """The HF loader decodes as it goes (no check before the start): the first step that reads it fails."""
    folder = make_image_folder(tmp_path / "data")
    victims = sorted((folder / "train" / "n00000000").glob("*.JPEG"))  # a class in every batch
    for victim in victims:
        victim.write_bytes(victim.read_bytes()[:200])
    assert main(configs(tmp_path, folder) + ["--output-dir", str(tmp_path / "out")]) == EXIT_USER_ERROR
    captured = capsys.readouterr()
    assert_failed_at(STAGES[2], captured.out, captured.err)
    assert re.search(f"cannot decode image {re.escape(str(victims[0].parent))}/img_\\d+.JPEG", captured.err)


# ------------------------------------------------------------------------------- small parts


@pytest.mark.parametrize("text, seconds", [
    ("1-00:00:00", 86400), ("12:00:00", 43200), ("30:00", 1800), ("90", 5400), ("2-12", 216000),
    ("2-06:30", 196200), ("UNLIMITED", None), ("NOT_SET", None), ("", None)])
def test_slurm_time_limits_are_read_in_all_their_forms(text, seconds):
    assert parse_slurm_time(text) == seconds


def test_preflight_steps_below_the_minimum_are_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--preflight", "--preflight-steps", "3"])
    assert exit_info.value.code == 2
    assert "--preflight-steps 3: at least 6" in capsys.readouterr().err



def test_contention_between_loader_and_model_is_noted():
    """46 img/s training against a loader at 2741 and a model at 500 alone (the README's run)."""
    note = contention_note(46.0, 2741.0, 500.0)
    assert note is not None and "(46.0 img/s per process)" in note and "alone (500.0)" in note
    assert contention_note(300.0, 2741.0, 500.0) is None  # 60% of the slower alone: what overlap costs


def test_slurms_time_limit_warning_is_noted_and_the_preflight_goes_on(tiny_folder, tmp_path, monkeypatch, capsys):
    """SIGUSR1 during training (as SLURM sends it at once when the job's time limit is not longer
    than the warning's lead): every stage still ok, a note in the report, status 0."""
    sent = []

    def train_one_epoch_after_a_warning(*args, **kwargs):
        if not sent:
            sent.append(os.kill(os.getpid(), signal.SIGUSR1))
        return train_one_epoch(*args, **kwargs)

    monkeypatch.setattr(preflight_module, "train_one_epoch", train_one_epoch_after_a_warning)
    status = main(configs(tmp_path, tiny_folder) + ["--output-dir", str(tmp_path / "out")])
    stdout = capsys.readouterr().out
    assert status == 0, stdout
    assert sent and table(stdout) == dict.fromkeys(STAGES, "ok"), stdout
    assert "note: SIGUSR1 arrived during the preflight and was noted, not obeyed" in stdout
    assert leftovers(tmp_path / "out") == []
