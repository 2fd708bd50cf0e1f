"""Session fixtures shared by the test modules: data, finished runs and the shipped configs.

The runs are the expensive part of the suite (real processes, 2 of them on gloo for the
multi-process ones); each is made once and read by every test that needs one. Tests read
them, or copy them before changing anything.
"""

import logging
import os
from pathlib import Path

# One thread per torch process (this one and every process a test starts, which inherit the
# variable): two pytest processes run tests side by side on two cores, and OpenMP threads that
# outnumber the cores spin against each other, slowing every process several-fold.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
from helpers import (  # noqa: E402
    REPO,
    LaunchedRun,
    accelerate_launch,
    checkpointing_configs,
    free_port,
    launched_run,
    make_image_folder,
    run_configs,
    tiny_train_toml,
)

from train.config import Config, load_config  # noqa: E402

SHIPPED_DATA = REPO / "configs" / "data"
SHIPPED_TRAIN = REPO / "configs" / "train"

# What a passing test wrote is removed when it is no longer needed (folder_cleanup.py says why);
# which pytest process runs which tests: xdist_groups.py.
pytest_plugins = ["folder_cleanup", "xdist_groups"]


# The "train" logger as the test process starts, before any run has set it up.
TRAIN_LOGGER = logging.getLogger("train")
TRAIN_LOGGER_AS_FOUND = (list(TRAIN_LOGGER.handlers), TRAIN_LOGGER.propagate, TRAIN_LOGGER.level)


@pytest.fixture(autouse=True)
def train_logger_as_found():
    """After each test, the "train" logger as the process started. A run inside the test process
    (train.rundir.setup_logging, also from a module or session fixture) gives it handlers of its
    own and stops propagation, after which caplog, which listens at the root logger, would see
    nothing in the tests that follow."""
    yield
    handlers, propagate, level = TRAIN_LOGGER_AS_FOUND
    for handler in TRAIN_LOGGER.handlers:
        if handler not in handlers:
            handler.close()  # a run's train.log
    TRAIN_LOGGER.handlers[:] = handlers
    TRAIN_LOGGER.propagate, TRAIN_LOGGER.level = propagate, level


@pytest.fixture(scope="session")
def tiny_folder(session_folder) -> Path:
    """3 classes, 8 train images each, 15 val images (odd, so 2 processes get unequal shards)."""
    return make_image_folder(session_folder("tiny") / "imagenet")


@pytest.fixture(scope="session")
def reference_run(tiny_folder, session_folder) -> Path:
    """A finished tiny run on the HF loader (4 epochs of 3 steps, checkpoints every 2 steps), shared
    by the checkpoint and export tests."""
    tmp = session_folder("reference")
    return launched_run(checkpointing_configs(tmp, tiny_folder), tmp / "out").dir


def two_process_reference(session_folder, folder: Path, loader: str) -> LaunchedRun:
    """A tiny run on 2 processes through `accelerate launch`: 2 epochs of 3 steps (lr 0.02),
    checkpoints every 2 steps, one loader worker per process."""
    tmp = session_folder(f"two_processes_{loader}")
    args = run_configs(tmp, folder, tiny_train_toml(max_epochs=2, lr=0.02), loader, workers=1)
    return launched_run(args, tmp / "out", accelerate_launch(2, port=free_port()), XDG_CACHE_HOME=str(tmp / "cache"))


@pytest.fixture(scope="session")
def two_process_run(tiny_folder, session_folder) -> LaunchedRun:
    """HF loader."""
    return two_process_reference(session_folder, tiny_folder, "hf")


@pytest.fixture(scope="session")
def two_process_dali_run(tiny_folder, session_folder) -> LaunchedRun:
    """DALI loader reading the folder."""
    return two_process_reference(session_folder, tiny_folder, "dali")


@pytest.fixture(scope="session")
def shipped_configs() -> dict[str, Config]:
    """Every shipped training config with the shipped DALI data config, by file name, loaded and
    validated once (for 8 processes: every batch size must divide among them)."""
    return {path.stem: load_config(SHIPPED_DATA / "imagenet.toml", path, num_processes=8)
            for path in sorted(SHIPPED_TRAIN.glob("*.toml"))}
