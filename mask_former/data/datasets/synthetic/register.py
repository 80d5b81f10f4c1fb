"""Registration of the built-in synthetic dataset through the one registration layer.

Each split is registered three times, one per annotation format, with the class metadata of
:mod:`.categories` (numbered things first):

- ``{prefix}_panoptic_{split}``: PQ, plus mIoU and mask AP from the same model (its metadata names
  the semantic PNGs and the instance JSON);
- ``{prefix}_sem_seg_{split}``: mIoU;
- ``{prefix}_instance_{split}``: mask AP.

Nothing is read from disk: loading a split that was not generated raises ``FileNotFoundError``
naming the missing path and ``datasets/prepare_synthetic.py``.
"""
import os

from ..registration import register_instances, register_panoptic, register_semantic
from .categories import SYNTHETIC_METADATA
from .generator import SPLITS, split_paths

__all__ = ["register_synthetic_split", "register_all_synthetic"]

_HOW_TO_PREPARE = "run `python datasets/prepare_synthetic.py` (see datasets/README.md)"
_IGNORE_LABEL = 255  # the semantic PNGs have no void pixels; 255 is what the evaluators expect

# The semantic datasets keep contiguous ids in their predictions (no dataset-id map), the
# instance datasets know only the things.
_SEMANTIC_KEYS = ("stuff_classes", "stuff_colors")
_INSTANCE_KEYS = ("thing_classes", "thing_colors", "thing_dataset_id_to_contiguous_id")


def register_synthetic_split(dataset_dir, split, prefix="synthetic"):
    """
    Register ``{prefix}_panoptic_{split}``, ``{prefix}_sem_seg_{split}`` and
    ``{prefix}_instance_{split}`` for the files of ``split`` under ``dataset_dir``
    (``<root>/synthetic``). Reads nothing from disk.
    """
    paths = split_paths(dataset_dir, split)
    register_panoptic(
        f"{prefix}_panoptic_{split}",
        SYNTHETIC_METADATA,
        paths["image_root"],
        paths["panoptic_root"],
        paths["panoptic_json"],
        paths["sem_seg_root"],
        paths["instances_json"],
        how_to_prepare=_HOW_TO_PREPARE,
    )
    register_semantic(
        f"{prefix}_sem_seg_{split}",
        {key: SYNTHETIC_METADATA[key] for key in _SEMANTIC_KEYS},
        paths["image_root"],
        paths["sem_seg_root"],
        ignore_label=_IGNORE_LABEL,
        image_ext=".png",
        gt_ext=".png",
        how_to_prepare=_HOW_TO_PREPARE,
    )
    register_instances(
        f"{prefix}_instance_{split}",
        {key: SYNTHETIC_METADATA[key] for key in _INSTANCE_KEYS},
        paths["instances_json"],
        paths["image_root"],
        how_to_prepare=_HOW_TO_PREPARE,
    )


def register_all_synthetic(root):
    """Register the train and val splits of ``<root>/synthetic`` under their standard names."""
    dataset_dir = os.path.join(root, "synthetic")
    for split in SPLITS:
        register_synthetic_split(dataset_dir, split)
