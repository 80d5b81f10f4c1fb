#!/usr/bin/env python3
"""Convert COCO-Stuff-10K v1.0 (``cocostuff-10k-v1.0.zip``) to detectron2's layout.

Inputs (under ``coco/coco_stuff_10k``): ``imageLists/{train,test}.txt`` (one stem per line),
``images/<stem>.jpg`` and ``annotations/<stem>.mat``. The ``.mat`` field ``S`` is the label map
with MATLAB indexing: 1 = unlabeled, 2..81 = the 80 things, 82..172 = the 91 stuff classes.

Outputs: ``images_detectron2/{train,test}/<stem>.jpg`` (copies) and
``annotations_detectron2/{train,test}/<stem>.png`` with training ids ``S - 2`` (0..170, in the
order of the class table ``mask_former/data/datasets/classes/coco_stuff_171.json``) and 255 for
unlabeled.

The v1.0 ``.mat`` files are MATLAB v7.3 (HDF5) files, read with ``h5py`` (``pip install h5py``);
older-format ``.mat`` files are read with scipy.

Usage::

    python datasets/prepare_coco_stuff_10k_sem_seg.py
        [--root $DETECTRON2_DATASETS/coco/coco_stuff_10k]
"""
import argparse
import os
import shutil
import sys

import numpy as np
import scipy.io
import tqdm
from PIL import Image

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from mask_former.data.datasets.class_tables import load_class_table  # noqa: E402

COCO_STUFF_SPLITS = ("train", "test")
# the 171 classes and the void value of the class table the registration reads
_TABLE = load_class_table("coco_stuff_171")
NUM_CLASSES = len(_TABLE.categories)
IGNORE_LABEL = _TABLE.ignore_label


def read_label_map(mat_path):
    """
    Returns:
        np.ndarray: the H x W field ``S`` of a COCO-Stuff ``.mat`` file.
    """
    try:
        data = scipy.io.loadmat(mat_path, variable_names=["S"])
    except NotImplementedError:  # scipy reads MATLAB files up to v7.2; v7.3 is HDF5
        try:
            import h5py
        except ImportError as e:
            raise ImportError(
                f"{mat_path} is a MATLAB v7.3 (HDF5) file: install h5py to read it"
            ) from e
        with h5py.File(mat_path, "r") as f:
            if "S" not in f:
                raise KeyError(f"{mat_path} has no field 'S' (fields: {sorted(f.keys())})") from None
            # MATLAB stores arrays column-major: HDF5 sees them transposed.
            return np.array(f["S"]).T
    if "S" not in data:
        raise KeyError(f"{mat_path} has no field 'S'")
    return np.asarray(data["S"])


def convert_coco_stuff_label(label_map):
    """
    Args:
        label_map (np.ndarray): H x W with 1 = unlabeled and 2..172 = classes.

    Returns:
        np.ndarray: H x W uint8 with 255 = unlabeled and 0..170 = classes.
    """
    label_map = np.asarray(label_map)
    if label_map.ndim != 2:
        raise ValueError(f"expected an H x W label map, got shape {label_map.shape}")
    if label_map.size and (label_map.min() < 1 or label_map.max() > NUM_CLASSES + 1):
        raise ValueError(
            f"COCO-Stuff v1.0 labels must lie in [1, {NUM_CLASSES + 1}], "
            f"got [{label_map.min()}, {label_map.max()}]"
        )
    out = label_map.astype(np.int64) - 2
    out[label_map == 1] = IGNORE_LABEL
    return out.astype(np.uint8)


def convert_coco_stuff_10k(stuff_root, splits=COCO_STUFF_SPLITS):
    """
    Convert the images listed in ``{stuff_root}/imageLists/{split}.txt``.

    Returns:
        dict[str, int]: number of images written per split.
    """
    counts = {}
    for split in splits:
        list_file = os.path.join(stuff_root, "imageLists", f"{split}.txt")
        if not os.path.isfile(list_file):
            raise FileNotFoundError(
                f"{list_file} does not exist: unzip cocostuff-10k-v1.0.zip into {stuff_root} "
                "(see datasets/README.md)"
            )
        with open(list_file) as f:
            stems = [line.strip() for line in f if line.strip()]
        image_dir = os.path.join(stuff_root, "images_detectron2", split)
        label_dir = os.path.join(stuff_root, "annotations_detectron2", split)
        os.makedirs(image_dir, exist_ok=True)
        os.makedirs(label_dir, exist_ok=True)
        for stem in tqdm.tqdm(stems, desc=f"COCO-Stuff-10K {split}"):
            image_path = os.path.join(stuff_root, "images", stem + ".jpg")
            mat_path = os.path.join(stuff_root, "annotations", stem + ".mat")
            for path in [image_path, mat_path]:
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"{path} (listed in {list_file}) does not exist")
            try:
                label = convert_coco_stuff_label(read_label_map(mat_path))
            except ValueError as e:
                raise ValueError(f"{mat_path}: {e}") from e
            with Image.open(image_path) as image:
                width, height = image.size
            if label.shape != (height, width):
                raise ValueError(
                    f"{mat_path}: label map is {label.shape}, image is {(height, width)}"
                )
            shutil.copyfile(image_path, os.path.join(image_dir, stem + ".jpg"))
            Image.fromarray(label).save(os.path.join(label_dir, stem + ".png"))
        counts[split] = len(stems)
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--root",
        default=os.path.join(
            os.getenv("DETECTRON2_DATASETS", "datasets"), "coco", "coco_stuff_10k"
        ),
        help="the coco_stuff_10k folder (default: $DETECTRON2_DATASETS/coco/coco_stuff_10k)",
    )
    args = parser.parse_args(argv)
    counts = convert_coco_stuff_10k(args.root)
    print(f"Converted {counts} images under {args.root}")


if __name__ == "__main__":
    main()
