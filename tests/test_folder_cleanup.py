"""The suite's temporary folders: a passing test's and module's are removed, a failing one's stay.

Runs a small suite of its own through pytester with the plugin the real suite uses
(tests/folder_cleanup.py) and looks at what is left in its base folder.
"""

import pytest

pytest_plugins = ["pytester"]

CONFTEST = """
import pytest

pytest_plugins = ["folder_cleanup"]

@pytest.fixture(scope="session")
def shared(session_folder):
    folder = session_folder("shared")
    (folder / "data").write_text("x")
    return folder
"""

def module_with_a_folder(name: str, tests: str) -> str:
    """A test module whose module fixture writes into a folder of its own, ``name``0."""
    return f"""
import pytest

@pytest.fixture(scope="module")
def module_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("{name}")
    (folder / "checkpoint").write_text("x")
    return folder
""" + tests


# Runs first. Its first test does not ask for the session fixture, so pytest makes that folder
# only for the second, when the module is under way and its own folders exist.
MODULE_THAT_PASSES = module_with_a_folder("passing_module", """
def test_reads_its_module_folder(module_run):
    assert (module_run / "checkpoint").exists()

def test_reads_both(shared, module_run, tmp_path):
    (tmp_path / "own").write_text("x")
    assert (shared / "data").exists() and (module_run / "checkpoint").exists()
""")

MODULE_THAT_FAILS = module_with_a_folder("failing_module", """
def test_still_reads_the_session_folder(shared):
    assert (shared / "data").exists()

def test_fails(module_run, tmp_path):
    (tmp_path / "evidence").write_text("x")
    assert False
""")


@pytest.fixture
def outcome(pytester, tmp_path):
    pytester.makeini("[pytest]\ntmp_path_retention_policy = failed\n")
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_a_passes=MODULE_THAT_PASSES, test_b_fails=MODULE_THAT_FAILS)
    base = tmp_path / "base"
    # pytest never removes a --basetemp it was given, so what the plugin left can be read.
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", f"--basetemp={base}")
    return result, sorted(path.name for path in base.iterdir())


def test_what_a_passing_module_wrote_is_gone_and_a_failing_ones_stays(outcome):
    result, left = outcome
    result.assert_outcomes(passed=3, failed=1)
    assert "passing_module0" not in left
    assert "test_reads_both0" not in left
    assert "failing_module0" in left
    assert "test_fails0" in left


def test_a_session_folder_outlives_the_module_that_made_it(outcome):
    result, left = outcome
    result.assert_outcomes(passed=3, failed=1)  # test_still_reads_the_session_folder among them
    assert "shared0" in left


def test_this_suite_removes_a_passing_tests_own_folder(pytestconfig):
    """The plugin leaves a test's own tmp_path to pytest, which removes it only under this policy."""
    assert pytestconfig.getini("tmp_path_retention_policy") == "failed"
