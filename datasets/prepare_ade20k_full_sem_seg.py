#!/usr/bin/env python3
"""Convert ADE20K-Full (``ADE20K_2021_17_01``) to 847-class 16-bit semantic labels.

Inputs (under the datasets root, i.e. ``$DETECTRON2_DATASETS``):

- ``ADE20K_2021_17_01/index_ade20k.pkl``: a pickled dict whose ``folder`` and ``filename`` lists
  give, per image, its folder relative to the datasets root (e.g.
  ``ADE20K_2021_17_01/images/ADE/training/urban/street``) and its file name
  (``ADE_train_00016869.jpg``);
- next to each image, ``<stem>_seg.png`` whose pixels encode the ADE20K object class as
  ``R // 10 * 256 + G``.

Outputs: ``ADE20K_2021_17_01/images_detectron2/{training,validation}/<stem>.jpg`` and
``ADE20K_2021_17_01/annotations_detectron2/{training,validation}/<stem>.tif`` (uint16 training
ids 0..846 of the class table ``mask_former/data/datasets/classes/ade20k_full_847.json``; every
other class, and 0 = unlabeled, becomes its ignore label 65535).
Images whose filename has ``val`` as its second ``_``-separated token go to ``validation``, the
others to ``training``. Images whose shorter side exceeds ``--max-size`` (512) are resized so that
it equals 512 (bilinear for the image, nearest for the labels), as for the MaskFormer paper;
other images are copied unchanged.

Usage::

    python datasets/prepare_ade20k_full_sem_seg.py [--root $DETECTRON2_DATASETS]
"""
import argparse
import os
import pickle
import shutil
import sys

import cv2
import numpy as np
import tqdm
from PIL import Image

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from mask_former.data.datasets.class_tables import load_class_table  # noqa: E402

ADE_FULL_DIRNAME = "ADE20K_2021_17_01"
# The 847 classes, as the dataset registration reads them: (ADE20K object id, name) per
# training id, and the 16-bit void value.
_TABLE = load_class_table("ade20k_full_847")
ADE20K_FULL_CATEGORIES = [(c["id"], c["name"]) for c in _TABLE.categories]
ADE20K_FULL_IGNORE_LABEL = _TABLE.ignore_label


def decode_ade20k_class_mask(seg_rgb):
    """
    Args:
        seg_rgb (np.ndarray): H x W x 3 uint8 ``*_seg.png``.

    Returns:
        np.ndarray: H x W int32 ADE20K object class ids, ``R // 10 * 256 + G``.
    """
    if seg_rgb.ndim != 3 or seg_rgb.shape[2] < 2:
        raise ValueError(f"expected an RGB *_seg.png, got shape {seg_rgb.shape}")
    return (seg_rgb[..., 0].astype(np.int32) // 10) * 256 + seg_rgb[..., 1].astype(np.int32)


def class_mask_to_train_ids(class_mask):
    """ADE20K object ids -> uint16 training ids (65535 for classes outside the 847)."""
    lookup = {object_id: train_id for train_id, (object_id, _) in enumerate(ADE20K_FULL_CATEGORIES)}
    out = np.full(class_mask.shape, ADE20K_FULL_IGNORE_LABEL, dtype=np.uint16)
    for object_id in np.unique(class_mask):
        train_id = lookup.get(int(object_id))
        if train_id is not None:
            out[class_mask == object_id] = train_id
    return out


def resized_shape(height, width, max_size):
    """(height, width) after scaling the shorter side down to ``max_size``, or None when the
    shorter side is not above ``max_size``."""
    if width >= height > max_size:
        return max_size, round(width / height * max_size)
    if height >= width > max_size:
        return round(height / width * max_size), max_size
    return None


def split_of(file_name):
    """'validation' for ``ADE_val_*`` files, 'training' otherwise."""
    tokens = file_name.split("_")
    return "validation" if len(tokens) > 1 and tokens[1] == "val" else "training"


def convert_ade20k_full_sem_seg(datasets_root, max_size=512):
    """
    Convert every image listed in ``{datasets_root}/ADE20K_2021_17_01/index_ade20k.pkl``.

    Returns:
        dict[str, int]: number of images written per split.
    """
    ade_root = os.path.join(datasets_root, ADE_FULL_DIRNAME)
    index_file = os.path.join(ade_root, "index_ade20k.pkl")
    if not os.path.isfile(index_file):
        raise FileNotFoundError(
            f"{index_file} does not exist: download ADE20K_2021_17_01 (see datasets/README.md)"
        )
    with open(index_file, "rb") as f:
        index = pickle.load(f)
    for key in ["folder", "filename"]:
        if key not in index:
            raise KeyError(f"{index_file} has no '{key}' list (keys: {sorted(index)})")
    if len(index["folder"]) != len(index["filename"]):
        raise ValueError(f"{index_file}: 'folder' and 'filename' differ in length")

    for kind in ["images_detectron2", "annotations_detectron2"]:
        for split in ["training", "validation"]:
            os.makedirs(os.path.join(ade_root, kind, split), exist_ok=True)

    counts = {"training": 0, "validation": 0}
    pairs = list(zip(index["folder"], index["filename"]))
    for folder, file_name in tqdm.tqdm(pairs, desc="ADE20K-Full"):
        split = split_of(file_name)
        image_path = os.path.join(datasets_root, folder, file_name)
        seg_path = os.path.join(datasets_root, folder, os.path.splitext(file_name)[0] + "_seg.png")
        for path in [image_path, seg_path]:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} (listed in {index_file}) does not exist")

        labels = class_mask_to_train_ids(
            decode_ade20k_class_mask(np.asarray(Image.open(seg_path).convert("RGB")))
        )
        out_image = os.path.join(ade_root, "images_detectron2", split, file_name)
        out_label = os.path.join(
            ade_root, "annotations_detectron2", split, os.path.splitext(file_name)[0] + ".tif"
        )
        with Image.open(image_path) as image:
            width, height = image.size
        if labels.shape != (height, width):
            raise ValueError(f"{seg_path} is {labels.shape}, {image_path} is {(height, width)}")
        new_shape = resized_shape(height, width, max_size)
        if new_shape is None:
            shutil.copyfile(image_path, out_image)
        else:
            new_h, new_w = new_shape
            image = np.asarray(Image.open(image_path).convert("RGB"))
            image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
            Image.fromarray(image).save(out_image)
            labels = cv2.resize(labels, (new_w, new_h), interpolation=cv2.INTER_NEAREST)
        Image.fromarray(labels).save(out_label)
        counts[split] += 1
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--root",
        default=os.getenv("DETECTRON2_DATASETS", "datasets"),
        help="the datasets root holding ADE20K_2021_17_01 (default: $DETECTRON2_DATASETS)",
    )
    parser.add_argument("--max-size", type=int, default=512, help="shorter side limit")
    args = parser.parse_args(argv)
    counts = convert_ade20k_full_sem_seg(args.root, max_size=args.max_size)
    print(f"Converted {counts} images under {os.path.join(args.root, ADE_FULL_DIRNAME)}")


if __name__ == "__main__":
    main()
