"""Session fixtures shared by the test modules."""

from pathlib import Path

import pytest
from helpers import make_image_folder


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """3 classes, 8 train images each, 15 val images (odd, so 2 processes get unequal shards)."""
    return make_image_folder(tmp_path_factory.mktemp("tiny") / "imagenet")
