"""Session fixtures shared by the test modules."""

from pathlib import Path

import pytest
from helpers import make_image_folder, uninterrupted_run


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """3 classes, 8 train images each, 15 val images (odd, so 2 processes get unequal shards)."""
    return make_image_folder(tmp_path_factory.mktemp("tiny") / "imagenet")


@pytest.fixture(scope="session")
def reference_run(tiny_folder, tmp_path_factory) -> Path:
    """A finished tiny run on the HF loader (4 epochs, checkpoints every 2 steps), shared by the
    checkpoint and export tests: read it, or copy it before changing anything."""
    return uninterrupted_run(tiny_folder, tmp_path_factory.mktemp("reference"), "hf")
