import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# State-dict layouts of the published checkpoints, kept in the repository (tests/reference/README.md)
# so that a plain clone with nothing beside it runs every test.
REFERENCE_DIR = Path(__file__).resolve().parent / "reference"

os.environ.setdefault("DETECTRON2_DATASETS", str(REPO_ROOT / "datasets"))


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not REFERENCE_DIR.is_dir():
        pytest.fail(f"checkpoint layout references not found at {REFERENCE_DIR}")
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def tiny_synthetic_root(tmp_path_factory) -> Path:
    """Root (for DETECTRON2_DATASETS) of a tiny synthetic dataset, registered as test_synthetic_*."""
    from synthetic_utils import make_tiny_synthetic

    root = tmp_path_factory.mktemp("datasets")
    make_tiny_synthetic(root)
    return root
