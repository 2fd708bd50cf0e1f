"""``compile = true`` with several processes: unwrapping the model for evaluation, BatchNorm
statistics or export must leave the training wrapper (torch.compile around DDP) as it was.

Two real processes (gloo on the CPU, inductor compiling for the CPU) run compile_worker.py.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from helpers import REPO, accelerate_launch, clean_env, free_port

WORKER = Path(__file__).resolve().parent / "compile_worker.py"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile_worker")
    command = accelerate_launch(2, port=free_port()) + [str(WORKER), str(out)]
    result = subprocess.run(command, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def test_evaluation_leaves_the_compiled_ddp_wrapper_intact(ranks):
    for rank in ranks:
        assert rank["names_before"][0].startswith("_orig_mod.module."), rank["names_before"][:2]
        assert rank["names_after"] == rank["names_before"]


def test_sam_v1_first_pass_stays_local_after_evaluation(ranks):
    """no_sync still applies: each process's first gradient is its own batch's, not the average."""
    first = [rank["first_grads"] for rank in ranks]
    assert len(first[0]) == len(first[1]) > 0
    assert any(not torch.allclose(a, b) for a, b in zip(*first))


def test_exported_names_carry_no_wrapper_prefix(ranks):
    for rank in ranks:
        names = rank["export_names"]
        assert names and not [n for n in names if n.startswith(("_orig_mod.", "module."))], names[:3]
        assert "0.weight" in names


def test_evaluation_runs_a_compiled_copy_of_the_bare_model(ranks):
    """compile = true: evaluation runs compiled too (issue 24), through a compiled wrapper of the
    unwrapped model made once per run, not the training wrapper (DDP inside) nor eagerly."""
    for rank in ranks:
        assert rank["eval_graphs"] >= 1
        assert rank["eval_model_reused"] and rank["eval_model_wraps_bare"]
