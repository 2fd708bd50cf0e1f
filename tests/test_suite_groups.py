"""How the suite is shared by its two pytest processes (tests/xdist_groups.py, pytest-xdist).

Every test module runs in one process, so its module fixtures run once; the modules marked
``xdist_group("slurm")`` (the real SLURM clusters) run in one process, one after the other, so
the clusters never run at the same time. When the grouping silently stops working (pytest 9
with pytest-xdist 3.8 ignores the marks), each process starts the same cluster, or submits the
same stand-in job, with the same job ids, and their rendezvous ports collide.

Runs a small suite of its own through pytester, in two pytest processes with the suite's plugin.
"""

import logging
import tomllib

from helpers import REPO

pytest_plugins = ["pytester"]

MODULE = """
import os
import pytest
{mark}

@pytest.fixture(scope="module")
def started_in():
    return os.environ["PYTEST_XDIST_WORKER"]

{tests}
"""


def test_each_module_and_each_group_runs_in_one_process_the_longest_first(pytester, monkeypatch):
    ran = pytester.mkdir("ran")
    modules = {"test_z_cluster_one": 'pytestmark = pytest.mark.xdist_group("slurm")',
               "test_z_cluster_two": 'pytestmark = pytest.mark.xdist_group("slurm")',
               "test_plain_a": "", "test_plain_b": "", "test_plain_c": ""}
    for name, mark in modules.items():
        tests = "\n".join(f"def test_{i}(started_in):\n"
                          f"    open({str(ran / name)!r} + '.{i}', 'w').write(started_in + ' ' + "
                          "os.environ['PYTEST_XDIST_WORKER'])\n" for i in range(6))
        pytester.makepyfile(**{name: MODULE.format(mark=mark, tests=tests)})
    monkeypatch.setenv("PYTHONPATH", str(REPO / "tests"))
    result = pytester.runpytest_subprocess("-n", "2", "--dist", "loadgroup", "--no-loadscope-reorder",
                                           "-p", "xdist_groups", "-p", "no:cacheprovider", "-v")
    result.assert_outcomes(passed=30)

    def workers(prefix: str) -> set[str]:
        return {worker for path in ran.glob(f"{prefix}.*") for worker in path.read_text().split()}
    # The module fixture's process is each test's, and one process ran the whole unit.
    assert len(workers("test_z_cluster_*")) == 1
    assert all(len(workers(name)) == 1 for name in ("test_plain_a", "test_plain_b", "test_plain_c"))
    # The slurm group is handed out first (it is LONGEST_FIRST's first unit), the rest in file order.
    collected = pytester.runpytest_subprocess("-n", "0", "-p", "xdist_groups", "-p", "no:cacheprovider",
                                              "--collect-only", "-q")
    files = [line.split("::")[0] for line in collected.outlines if "::" in line]
    assert list(dict.fromkeys(files)) == ["test_z_cluster_one.py", "test_z_cluster_two.py", "test_plain_a.py",
                                          "test_plain_b.py", "test_plain_c.py"]


def test_the_real_clusters_modules_share_one_group_and_the_suite_distributes_by_group():
    import test_slurm_real
    import test_slurm_two_nodes
    marks = [test_slurm_real.pytestmark, test_slurm_two_nodes.pytestmark]
    assert all(mark.name == "xdist_group" and mark.args == ("slurm",) for mark in marks)
    options = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["addopts"]
    assert "--dist loadgroup --no-loadscope-reorder" in options


# These two run in this order (one module, one process): the first sets the "train" logger up as
# a run in the test process does; conftest.py's train_logger_as_found puts it back after it.
def test_a_run_in_the_test_process_sets_up_the_train_logger():
    from train.rundir import setup_logging
    setup_logging(None, is_main_process=True)
    assert not logging.getLogger("train").propagate


def test_the_next_test_sees_the_train_loggers_records_in_caplog(caplog):
    with caplog.at_level("WARNING", logger="train"):
        logging.getLogger("train").warning("a warning from the train logger")
    assert "a warning from the train logger" in caplog.text
