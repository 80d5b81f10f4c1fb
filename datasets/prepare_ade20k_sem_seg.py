#!/usr/bin/env python3
"""Convert ADE20K-150 (SceneParsing) labels to detectron2's convention.

``ADEChallengeData2016/annotations/{training,validation}/*.png`` store 0 for "other/void" and
k = 1..150 for the 150 classes. detectron2 wants contiguous ids from 0 and an ignore value, so
this writes ``annotations_detectron2/{training,validation}/*.png`` with 0 -> 255 and k -> k - 1.

Usage::

    python datasets/prepare_ade20k_sem_seg.py [--root $DETECTRON2_DATASETS/ADEChallengeData2016]
"""
import argparse
import os
import sys

import numpy as np
import tqdm
from PIL import Image

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from mask_former.data.datasets.class_tables import load_class_table  # noqa: E402

ADE20K_SPLITS = ("training", "validation")
# the 150 classes and the void value of the class table the registration reads
_TABLE = load_class_table("ade20k_150")
NUM_CLASSES = len(_TABLE.categories)
IGNORE_LABEL = _TABLE.ignore_label


def convert_ade20k_label(label):
    """
    Args:
        label (np.ndarray): H x W integer array with 0 = void and 1..150 = classes.

    Returns:
        np.ndarray: H x W uint8 with 255 = void and 0..149 = classes.
    """
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"expected an H x W label map, got shape {label.shape}")
    if label.size and (label.min() < 0 or label.max() > NUM_CLASSES):
        raise ValueError(
            f"ADE20K labels must lie in [0, {NUM_CLASSES}], got [{label.min()}, {label.max()}]"
        )
    out = label.astype(np.int64) - 1
    out[label == 0] = IGNORE_LABEL
    return out.astype(np.uint8)


def convert_ade20k_sem_seg(ade_root, splits=ADE20K_SPLITS):
    """
    Write ``{ade_root}/annotations_detectron2/{split}/*.png`` for every
    ``{ade_root}/annotations/{split}/*.png``.

    Returns:
        int: the number of label files written.
    """
    written = 0
    for split in splits:
        in_dir = os.path.join(ade_root, "annotations", split)
        out_dir = os.path.join(ade_root, "annotations_detectron2", split)
        if not os.path.isdir(in_dir):
            raise FileNotFoundError(
                f"{in_dir} does not exist: download ADEChallengeData2016 (see datasets/README.md)"
            )
        os.makedirs(out_dir, exist_ok=True)
        for file_name in tqdm.tqdm(sorted(os.listdir(in_dir)), desc=f"ADE20K {split}"):
            if not file_name.endswith(".png"):
                continue
            path = os.path.join(in_dir, file_name)
            try:
                label = convert_ade20k_label(np.asarray(Image.open(path)))
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from e
            Image.fromarray(label).save(os.path.join(out_dir, file_name))
            written += 1
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--root",
        default=os.path.join(os.getenv("DETECTRON2_DATASETS", "datasets"), "ADEChallengeData2016"),
        help="the ADEChallengeData2016 folder (default: $DETECTRON2_DATASETS/ADEChallengeData2016)",
    )
    args = parser.parse_args(argv)
    count = convert_ade20k_sem_seg(args.root)
    print(f"Wrote {count} label maps under {os.path.join(args.root, 'annotations_detectron2')}")


if __name__ == "__main__":
    main()
