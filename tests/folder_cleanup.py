"""A pytest plugin that keeps this suite's temporary folders from filling the disk.

One pass of the suite writes about 14 GB (each finished run holds checkpoints and an export of a
44 MB model), more than a CI machine may have free. So what a passing test wrote is removed once
nothing needs it: a test's own `tmp_path` at its end (pyproject.toml sets
`tmp_path_retention_policy = "failed"`), a module's folders when the module ends, and the
session's folders with pytest's base folder when every test passed. Whatever a failing test or
module wrote stays, to be read.
"""

import shutil
import tempfile
from pathlib import Path

import pytest

SESSION_FOLDERS: set[Path] = set()
A_TEST_FAILED = pytest.StashKey[bool]()


@pytest.fixture(scope="session")
def session_folder(tmp_path_factory):
    """Makes folders for session fixtures: kept until the session ends, whatever module made them."""
    def make(name: str) -> Path:
        path = tmp_path_factory.mktemp(name)
        SESSION_FOLDERS.add(path)
        return path
    return make


def pytest_report_header(config):
    """The free space where the folders go, printed first: a CI log then says whether a run that
    went wrong had run out of disk."""
    base = Path(config.option.basetemp or tempfile.gettempdir())
    where = base if base.exists() else base.parent
    free = shutil.disk_usage(where).free / 2**30
    return f"temporary folders under {base}: {free:.1f} GiB free (a full pass of this suite needs about 1.5 GiB)"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        item.getparent(pytest.Module).stash[A_TEST_FAILED] = True
    return report


@pytest.fixture(scope="module", autouse=True)
def module_folders_removed_if_it_passed(request, tmp_path_factory):
    """Removes the folders a module's fixtures made (not the session's) when none of its tests
    failed. Being autouse, it is set up before the module's own fixtures and so ends after them:
    nothing of theirs still runs in what it removes."""
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    yield
    if request.node.stash.get(A_TEST_FAILED, False):
        return
    for path in set(base.iterdir()) - before - SESSION_FOLDERS:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
