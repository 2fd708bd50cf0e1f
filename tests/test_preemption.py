"""Stopping on a signal: every process takes the same decision, at the same step.

A stop signal may reach some processes and not others (or reach them on either side of an
epoch's end). The 2-process runs here signal one process only, at the epoch boundary and in
the middle of an epoch: both processes must write one checkpoint together and exit with 75,
and the same command then finishes with the metrics of an uninterrupted run. How often the
processes agree is checked on the policy itself, with a fake clock.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
from helpers import REPO, accelerate_launch, clean_env, data_toml, free_port, tiny_train_toml, without_timing, write

from train import checkpoint as ckpt
from train import preemption
from train.preemption import EXIT_PREEMPTED, Action, CheckpointPolicy, StopRequests
from train.rundir import read_metrics

WORKER = Path(__file__).resolve().parent / "hooked_worker.py"


def configs(tmp: Path, folder: Path) -> list[str]:
    """4 epochs of 3 steps on 2 processes; no checkpoint but the last one, unless stopped."""
    data = write(tmp / "data.toml", data_toml(folder))
    train = write(tmp / "train.toml", tiny_train_toml(max_epochs=4, lr=0.02) + "checkpoint_freq = 100\n")
    return ["--data-cfg", str(data), "--train-cfg", str(train)]


def launch(args: list[str], status_dir: Path, stop: str | None = None, preexec_fn=None,
           stderr_lines: list[str] | None = None, **env) -> list[int]:
    """Both processes' exit statuses (through hooked_worker.py, which records them); ``preexec_fn``
    runs in the launcher's process before it starts (its limits pass on to the workers),
    ``stderr_lines`` receives what the run printed on stderr, ``env`` adds to the environment."""
    status_dir.mkdir(parents=True, exist_ok=True)
    for old in status_dir.glob("*"):
        old.unlink()
    env.update({"TRAIN_WORKER_STATUS_DIR": str(status_dir), **({"STOP_ONE_PROCESS": stop} if stop else {})})
    command = accelerate_launch(2, port=free_port()) + [str(WORKER), *args]
    process = subprocess.Popen(command, cwd=REPO, env=clean_env(**env), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=preexec_fn)
    try:
        _, stderr = process.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the workers too: they may be waiting on each other
        _, stderr = process.communicate()
        pytest.fail(f"the processes hung: {stderr[-2000:]}")
    statuses = [int((status_dir / f"{rank}.exit").read_text()) for rank in range(2)
                if (status_dir / f"{rank}.exit").exists()]
    assert len(statuses) == 2, stderr[-3000:]
    if stderr_lines is not None:
        stderr_lines += stderr.splitlines()
    return statuses


@pytest.fixture(scope="module")
def reference(tiny_folder, tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("uninterrupted")
    assert launch(configs(tmp, tiny_folder) + ["--output-dir", str(tmp / "run")], tmp / "status") == [0, 0]
    return read_metrics(tmp / "run" / "metrics.jsonl")


@pytest.mark.parametrize("stop, step", [("1:epoch-end:2", 6), ("1:step:4", 4)], ids=["epoch-end", "mid-epoch"])
def test_a_signal_to_one_process_stops_both_with_one_checkpoint(stop, step, reference, tiny_folder, tmp_path):
    args = configs(tmp_path, tiny_folder) + ["--output-dir", str(tmp_path / "run")]
    assert launch(args, tmp_path / "status", stop=stop) == [EXIT_PREEMPTED, EXIT_PREEMPTED]
    saved = ckpt.list_checkpoints(tmp_path / "run")
    assert [int(folder.name) for folder in saved] == [step]
    assert ckpt.checkpoint_problem(saved[0]) is None

    assert launch(args, tmp_path / "status") == [0, 0]  # the same command again
    assert without_timing(read_metrics(tmp_path / "run" / "metrics.jsonl")) == without_timing(reference)


# ------------------------------------------------------------------ how often they agree


class FakeClock:
    def __init__(self, seconds_per_step: float):
        self.now, self.seconds_per_step = 1000.0, seconds_per_step

    def __call__(self) -> float:
        return self.now


def agreement_steps(monkeypatch, seconds_per_step: float, log_freq: int, steps: int = 200,
                    signal_at: int | None = None) -> tuple[list[int], int | None]:
    """The steps at which the policy agreed with the other processes, and the step it stopped at."""
    clock = FakeClock(seconds_per_step)
    monkeypatch.setattr(preemption.time, "monotonic", clock)
    agreed = []
    real = preemption._max_over_processes

    def counting(values, device):
        agreed.append(current[0])
        return real(values, device)

    monkeypatch.setattr(preemption, "_max_over_processes", counting)
    requests = StopRequests()
    policy = CheckpointPolicy(requests, every_steps=0, every_minutes=0, max_interval=log_freq,
                              is_main_process=True, device="cpu")
    current, stopped = [0], None
    for step in range(1, steps + 1):
        clock.now += seconds_per_step
        current[0] = step
        if step == signal_at:
            requests.received = 10
        if policy.after_step(step) & Action.STOP:
            stopped = step
            break
    return agreed, stopped


def test_fast_steps_agree_every_log_freq_steps_not_every_step(monkeypatch):
    agreed, _ = agreement_steps(monkeypatch, seconds_per_step=0.01, log_freq=20)
    gaps = {b - a for a, b in zip(agreed[1:], agreed[2:])}
    assert gaps == {20}, agreed[:6]
    assert len(agreed) <= 200 // 20 + 2


def test_slow_steps_agree_every_few_seconds(monkeypatch):
    agreed, _ = agreement_steps(monkeypatch, seconds_per_step=2.0, log_freq=100)
    gaps = {b - a for a, b in zip(agreed[1:], agreed[2:])}
    assert gaps == {int(preemption.AGREE_EVERY_S / 2.0)}, agreed[:6]


def test_a_signal_is_acted_on_at_the_next_agreement(monkeypatch):
    agreed, stopped = agreement_steps(monkeypatch, seconds_per_step=0.01, log_freq=20, signal_at=45)
    assert stopped == min(step for step in agreed if step >= 45)
    assert stopped - 45 < 20


def test_time_based_checkpoints_are_taken_at_an_agreement(monkeypatch):
    clock = FakeClock(1.0)
    monkeypatch.setattr(preemption.time, "monotonic", clock)
    policy = CheckpointPolicy(StopRequests(), every_steps=0, every_minutes=1, max_interval=100,
                              is_main_process=True, device="cpu")
    checkpoints = []
    for step in range(1, 200):
        clock.now += 1.0
        if policy.after_step(step) & Action.CHECKPOINT:
            checkpoints.append(step)
            policy.saved()
    assert checkpoints and all(b - a <= 60 + preemption.AGREE_EVERY_S for a, b in zip([0, *checkpoints],
                                                                                     checkpoints))


def test_a_child_forked_with_the_handler_leaves_the_stop_to_the_trainer():
    """A loader worker forked while the trainer's handler is installed and signalled before its
    worker_init_fn runs (SLURM signals every process of a job at once): it neither records nor
    reports the stop; the trainer does, once per rank."""
    requests = StopRequests().install()
    try:
        pid = os.fork()
        if pid == 0:  # the child, with the inherited handler
            os.kill(os.getpid(), signal.SIGTERM)
            os._exit(0 if requests.received is None else 1)
        _, status = os.waitpid(pid, 0)
    finally:
        requests.uninstall()
    assert os.waitstatus_to_exitcode(status) == 0
    assert requests.received is None  # nothing reached the trainer itself


@pytest.fixture
def signal_handlers_restored():
    """The test process's own handlers back after a test (StopRequests leaves the stop signals
    ignored once one has been received)."""
    before = {sig: signal.getsignal(sig) for sig in preemption.STOP_SIGNALS}
    yield
    for sig, handler in before.items():
        signal.signal(sig, handler)


def test_a_second_signal_while_the_first_is_reported_is_not_reported_again(monkeypatch, signal_handlers_restored):
    """Under scancel a trainer gets SIGTERM three times within milliseconds (from SLURM, from the
    node launcher, from torchrun's agent). Python runs a handler again, nested, when a signal
    arrives while the first handler still runs (here: while it logs): the stop is still reported
    once."""
    reported = []

    def warning_while_another_signal_arrives(message, *args, **kwargs):
        reported.append(message)
        if len(reported) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # handled at the next bytecode boundary, in here
            for _ in range(1000):  # calls: points where Python runs pending handlers
                len(reported)

    monkeypatch.setattr(preemption.LOG, "warning", warning_while_another_signal_arrives)
    requests = StopRequests().install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):
            len(reported)
    finally:
        requests.uninstall()
    assert requests.received == signal.SIGTERM
    assert len(reported) == 1, reported


def test_a_preflight_notes_time_limit_warnings_and_still_stops_on_sigterm(signal_handlers_restored):
    """stop_on_warnings=False: SIGUSR1 and SIGUSR2 are noted in ``warned``; SIGTERM (scancel, the
    limit itself) still stops. A training run's requests stop on all three."""
    preflight = StopRequests(stop_on_warnings=False).install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR2)
        assert (preflight.received, preflight.warned) == (None, signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGTERM)
        assert preflight.received == signal.SIGTERM
    finally:
        preflight.uninstall()
    training = StopRequests().install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert (training.received, training.warned) == (signal.SIGUSR1, None)
    finally:
        training.uninstall()
