import os
import random
from pathlib import Path
from typing import Callable, Dict, Tuple

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# State-dict layouts of the published checkpoints, kept in the repository (tests/reference/README.md)
# so that a plain clone with nothing beside it runs every test.
REFERENCE_DIR = Path(__file__).resolve().parent / "reference"

os.environ.setdefault("DETECTRON2_DATASETS", str(REPO_ROOT / "datasets"))


@pytest.fixture(autouse=True)
def same_random_state_for_every_test():
    """Each test starts from the same random state, whichever tests ran before it in its process:
    ``make test`` spreads the test files over several processes, in an order that varies."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Small models run much faster on one thread than on two contended ones (shared test cores)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def swin_masked_logits(monkeypatch):
    """A list that receives, for every shifted-window attention mask a Swin backbone builds, the
    value it gives the masked pairs (the mask's minimum): -100 as built, -inf inside
    ``zero_masked_attention``."""
    import mask_former.modeling.backbone.swin as swin

    masked_logits = []
    build_mask = swin.shifted_window_attention_mask

    def spy(*args, **kwargs):
        mask = build_mask(*args, **kwargs)
        masked_logits.append(float(mask.min()))
        return mask

    monkeypatch.setattr(swin, "shifted_window_attention_mask", spy)
    return masked_logits


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not REFERENCE_DIR.is_dir():
        pytest.fail(f"checkpoint layout references not found at {REFERENCE_DIR}")
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def reference_layout(reference_dir) -> Callable[[str], Dict[str, Tuple[Tuple[int, ...], str]]]:
    """``reference_layout(name)``: {key: (shape tuple, dtype name)} of ``tests/reference/<name>``
    (one ``key<TAB>shape<TAB>dtype`` line per tensor; ``#`` lines are comments)."""

    def read(name: str) -> Dict[str, Tuple[Tuple[int, ...], str]]:
        layout = {}
        for line in (reference_dir / name).read_text().splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            key, shape, dtype = line.split("\t")
            layout[key] = (tuple(int(s) for s in shape.strip("()").split(",") if s.strip()), dtype)
        return layout

    return read


@pytest.fixture(scope="session")
def tiny_synthetic_root(tmp_path_factory) -> Path:
    """Root (for DETECTRON2_DATASETS) of a tiny synthetic dataset, registered as test_synthetic_*."""
    from synthetic_utils import make_tiny_synthetic

    root = tmp_path_factory.mktemp("datasets")
    make_tiny_synthetic(root)
    return root
