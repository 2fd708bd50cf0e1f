"""Which of the suite's two pytest processes runs which tests (pytest-xdist, ``--dist loadgroup``).

* Every test module is one unit: a module's tests run in one process, one after the other, so
  a module fixture runs once. Spread over both processes, each process would run it: twice the
  work, and two copies of a fixture that submits the stand-in SLURM job 4242 at once collide on
  that job's rendezvous port.
* A test marked ``xdist_group(NAME)`` belongs to the unit NAME instead: the real SLURM modules
  share "slurm", so their two clusters never run at the same time.
* The units are handed out in the order set here (pyproject.toml passes
  ``--no-loadscope-reorder``): the longest first, so that the two processes end close together
  rather than one finishing a long module alone.

Loaded by tests/conftest.py; tests/test_suite_groups.py runs it on a small suite of its own.
"""

from __future__ import annotations

import pytest

# Measured in a full run (the sum of each unit's test durations): the slurm group about 410 s,
# then these, from about 490 s down to 45 s under that run's load. The order only balances the
# two processes; a stale order costs minutes, never a result.
LONGEST_FIRST = ("slurm", "test_checkpoint.py", "test_accumulation.py", "test_launch.py", "test_train.py",
                 "test_optim_distributed.py", "test_preflight.py", "test_ema.py", "test_preemption.py",
                 "test_crop_ramp.py", "test_compile.py")


def unit_of(item: pytest.Item) -> str:
    for mark in item.iter_markers("xdist_group"):
        return str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
    return item.path.name


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook, which reads the marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.path.name))

    def rank(item: pytest.Item) -> int:
        unit = unit_of(item)
        return LONGEST_FIRST.index(unit) if unit in LONGEST_FIRST else len(LONGEST_FIRST)
    items.sort(key=rank)  # a stable sort keeps the order inside each unit, and of the rest
