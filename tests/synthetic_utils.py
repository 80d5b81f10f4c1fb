"""A tiny copy of the built-in synthetic dataset, generated once per test session."""
import os
from pathlib import Path

from mask_former.data.datasets.synthetic import generate_synthetic_dataset, register_synthetic_split

TEST_PREFIX = "test_synthetic"


def make_tiny_synthetic(root: Path, num_train=16, num_val=4, image_size=64) -> str:
    """Generate the dataset under ``root/synthetic`` and register it as ``test_synthetic_*``."""
    dataset_dir = generate_synthetic_dataset(
        root=str(root), num_train=num_train, num_val=num_val, image_size=image_size, seed=0
    )
    for split in ("train", "val"):
        register_synthetic_split(dataset_dir, split, prefix=TEST_PREFIX)
    return os.fspath(dataset_dir)
