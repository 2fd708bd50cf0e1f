"""``[log] profile_steps``: a trace in the format Perfetto and TensorBoard's profiler plugin
read, written by a run that otherwise trains exactly as an unprofiled one. (That only the
main process of several writes one is tested in test_seed_features.py.)"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from helpers import checkpointing_configs as configs
from helpers import run_train, without_timing

from train.profiling import PROFILE_FOLDER, SKIP_STEPS, WARMUP_STEPS, StepProfiler
from train.rundir import read_metrics

# How torch-tb-profiler recognises a worker's trace file under its log folder.
TB_PLUGIN_FILE = re.compile(r"^(.*?)(\.\d+)?\.pt\.trace\.json(?:\.gz)?$")


def trace_events(path: Path) -> list[dict]:
    """The events of a Chrome trace-event file, checked against that format: a JSON object
    whose ``traceEvents`` are dicts with a phase; complete ("X") events with a name, a process,
    a thread, a start and a non-negative duration, in microseconds."""
    trace = json.loads(path.read_text())
    assert isinstance(trace, dict) and isinstance(trace["traceEvents"], list)
    events = trace["traceEvents"]
    assert all(isinstance(e, dict) and isinstance(e.get("ph"), str) for e in events)
    complete = [e for e in events if e["ph"] == "X"]
    assert complete
    for event in complete:
        assert isinstance(event["name"], str) and "pid" in event and "tid" in event
        assert isinstance(event["ts"], (int, float)) and isinstance(event["dur"], (int, float)) and event["dur"] >= 0
    return events


def test_a_profiled_run_writes_one_trace_and_trains_as_an_unprofiled_one(reference_run, tiny_folder, tmp_path):
    out = tmp_path / "out"
    args = configs(tmp_path, tiny_folder) + ["--output-dir", str(out), "--set", "train.log.profile_steps=2"]
    result = run_train(args)
    assert result.returncode == 0, result.stderr[-3000:]
    (trace,) = (out / PROFILE_FOLDER).iterdir()
    assert TB_PLUGIN_FILE.match(trace.name) and trace.name.startswith("main-process.")
    assert f"profiler: trace of up to 2 training steps in {trace}" in result.stdout
    events = trace_events(trace)
    recorded = [e["name"] for e in events if e["name"].startswith("ProfilerStep#")]
    first = SKIP_STEPS + WARMUP_STEPS
    assert recorded == [f"ProfilerStep#{first}", f"ProfilerStep#{first + 1}"]  # two steps, after the skipped ones
    assert any(e["name"] == "aten::convolution" and e["ph"] == "X" for e in events)  # the model's own work
    assert without_timing(read_metrics(out / "metrics.jsonl")) == \
        without_timing(read_metrics(reference_run / "metrics.jsonl"))


def test_an_attempt_shorter_than_the_skipped_steps_writes_nothing_and_says_so(tmp_path, caplog):
    profiler = StepProfiler(2, tmp_path, enabled=True, cuda=False)
    with caplog.at_level(logging.INFO, logger="train"):
        for _ in range(SKIP_STEPS):
            torch.ones(4).sum()
            profiler.step()
        profiler.close()
    assert not list((tmp_path / PROFILE_FOLDER).iterdir())
    assert "profiler: no trace, the attempt ended within its first" in caplog.text


def test_other_processes_and_runs_without_profile_steps_do_not_profile(tmp_path):
    for profiler in (StepProfiler(2, tmp_path, enabled=False, cuda=False),
                     StepProfiler(0, tmp_path, enabled=True, cuda=False)):
        assert profiler.profiler is None
        profiler.step()
        profiler.close()
    assert not (tmp_path / PROFILE_FOLDER).exists()
