"""train/peers.py on its own: which rank the heartbeats name, and the watchdog's timing.

The whole path (a node killed, a rank stopped, a link cut, on two real SLURM nodes) is in
test_slurm_two_nodes.py; these pin the parts that decide what the user reads and when.
"""

from __future__ import annotations

import datetime
import threading
import time

import pytest
from helpers import data_toml, tiny_train_toml, write

from train.config import ConfigError, TrainConfig, load_config
from train.peers import Heartbeat, heartbeat_interval, process_group_kwargs, stalled_ranks


def beat(rank: int, host: str, step: int, at: float) -> dict:
    return {"rank": rank, "host": host, "step": step, "time": at}


def test_a_silent_rank_is_named_with_its_host_and_last_step():
    """A process whose heartbeat is stale (stopped, or gone) is the one named."""
    now = 1000.0
    beats = [beat(0, "node1", 9, now - 1), beat(1, "node2", 8, now - 40), beat(2, "node3", 9, now - 2)]
    assert stalled_ranks(beats, 0, now, 10) == (
        "stopped making progress: rank 1 on node2 (no heartbeat for 40 s, last at step 8)")


def test_an_alive_rank_behind_the_others_is_named_as_stuck():
    """All heartbeats fresh: the rank at a lower step than the others is the stuck one."""
    now = 1000.0
    beats = [beat(0, "node1", 12, now), beat(1, "node2", 11, now - 1)]
    assert stalled_ranks(beats, 0, now, 10) == "stopped making progress: rank 1 on node2 (alive, stuck at step 11)"


def test_no_heartbeats_say_so_instead_of_blaming_a_rank():
    assert "do not tell" in stalled_ranks([beat(0, "node1", 3, 5.0)], 0, 6.0, 10)
    assert "do not tell" in stalled_ranks([beat(0, "n", 3, 5.0), beat(1, "m", 3, 5.0)], 0, 6.0, 10)


def test_the_watchdog_fires_after_the_progress_timeout_and_not_while_paused():
    """Armed by a finished step, it fires once no step has finished for progress_timeout_s;
    paused (evaluation, checkpoints), it does not."""
    fired = threading.Event()
    watchdog = Heartbeat(0, 2, interval_s=0.05, progress_timeout_s=0.5, on_stall=fired.set).start()
    try:
        watchdog.progressed(1)
        watchdog.pause()
        assert not fired.wait(1.0)  # paused: twice the timeout passes
        started = time.monotonic()
        watchdog.progressed(2)
        assert fired.wait(5.0)
        assert time.monotonic() - started >= 0.5
    finally:
        watchdog.close()


def test_steps_keep_the_watchdog_quiet():
    fired = threading.Event()
    watchdog = Heartbeat(0, 2, interval_s=0.05, progress_timeout_s=0.5, on_stall=fired.set).start()
    try:
        for step in range(1, 16):
            watchdog.progressed(step)
            time.sleep(0.1)
        assert not fired.is_set()
    finally:
        watchdog.close()


def test_heartbeats_are_stale_well_within_the_timeout():
    """Three missed heartbeats (what 'stale' means) fit inside the timeout, so that the process
    giving up at the timeout finds the stopped one's heartbeat stale."""
    for timeout in (1, 20, 30, 600, 1800):
        assert 3 * heartbeat_interval(timeout) < timeout


def test_the_collective_timeout_is_the_process_groups():
    assert process_group_kwargs(30).timeout == datetime.timedelta(seconds=30)
    train = TrainConfig()
    # Shorter than torch's defaults (NCCL 10 min, gloo 30 min), and the watchdog fires first.
    assert (train.collective_timeout_s, train.progress_timeout_s) == (600.0, 300.0)


@pytest.mark.parametrize("key", ["collective_timeout_s", "progress_timeout_s"])
def test_timeouts_must_be_positive(tmp_path, key):
    data = write(tmp_path / "data.toml", data_toml(tmp_path))
    train = write(tmp_path / "train.toml", tiny_train_toml())
    with pytest.raises(ConfigError, match=f"train.{key} must be > 0, got 0"):
        load_config(data, train, [f"train.{key}=0"])
