#!/usr/bin/env python3
"""Make the semantic PNGs of COCO panoptic (133 classes) that semantic evaluation needs.

Inputs (under ``coco``): ``annotations/panoptic_{train,val}2017.json`` and
``panoptic_{train,val}2017/*.png``. Outputs: ``panoptic_semseg_{train,val}2017/*.png`` (same
file names), each pixel the contiguous id (0..132, things first, in COCO id order as in
``coco_2017_*_panoptic``'s metadata) of its segment's category and 255 where no segment is.
Crowd segments keep their category: "crowd" concerns instances, not semantics.

Usage::

    python datasets/prepare_coco_panoptic_sem_seg.py [--root $DETECTRON2_DATASETS/coco]
        [--workers 4]
"""
import argparse
import functools
import json
import multiprocessing as mp
import os
import sys

import numpy as np
import tqdm
from panopticapi.utils import rgb2id
from PIL import Image

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from mask_former.data.datasets.standard import get_coco_panoptic_metadata  # noqa: E402

COCO_PANOPTIC_SPLITS = ("train2017", "val2017")
IGNORE_LABEL = 255


def panoptic_to_semantic(panoptic_rgb, segments_info, dataset_id_to_contiguous_id, where=""):
    """
    Args:
        panoptic_rgb (np.ndarray): H x W x 3 uint8 panoptic PNG (id = R + 256 G + 256^2 B).
        segments_info (list[dict]): the annotation's segments, with ``id`` and ``category_id``.
        dataset_id_to_contiguous_id (dict[int, int]): category id -> contiguous id (< 255).
        where (str): file name for error messages.

    Returns:
        np.ndarray: H x W uint8 contiguous ids, 255 where no segment is.
    """
    segment_ids = rgb2id(panoptic_rgb)
    semantic = np.full(segment_ids.shape, IGNORE_LABEL, dtype=np.uint8)
    for segment in segments_info:
        category_id = segment["category_id"]
        if category_id not in dataset_id_to_contiguous_id:
            raise ValueError(
                f"{where}: segment {segment['id']} has category_id {category_id}, which is not "
                f"one of the {len(dataset_id_to_contiguous_id)} COCO panoptic categories"
            )
        semantic[segment_ids == segment["id"]] = dataset_id_to_contiguous_id[category_id]
    return semantic


def _convert_one(annotation, panoptic_dir, semantic_dir, dataset_id_to_contiguous_id):
    in_path = os.path.join(panoptic_dir, annotation["file_name"])
    if not os.path.isfile(in_path):
        raise FileNotFoundError(f"{in_path} (listed in the panoptic JSON) does not exist")
    panoptic_rgb = np.asarray(Image.open(in_path).convert("RGB"))
    semantic = panoptic_to_semantic(
        panoptic_rgb, annotation["segments_info"], dataset_id_to_contiguous_id, in_path
    )
    Image.fromarray(semantic).save(os.path.join(semantic_dir, annotation["file_name"]))


def convert_coco_panoptic_sem_seg(coco_root, splits=COCO_PANOPTIC_SPLITS, num_workers=1):
    """
    Write ``{coco_root}/panoptic_semseg_{split}/*.png`` for each split.

    Returns:
        dict[str, int]: number of PNGs written per split.
    """
    dataset_id_to_contiguous_id = get_coco_panoptic_metadata()["stuff_dataset_id_to_contiguous_id"]
    counts = {}
    for split in splits:
        json_file = os.path.join(coco_root, "annotations", f"panoptic_{split}.json")
        panoptic_dir = os.path.join(coco_root, f"panoptic_{split}")
        for path in [json_file, panoptic_dir]:
            if not os.path.exists(path):
                raise FileNotFoundError(
                    f"{path} does not exist: download the COCO panoptic annotations and unzip "
                    f"panoptic_{split}.zip (see datasets/README.md)"
                )
        semantic_dir = os.path.join(coco_root, f"panoptic_semseg_{split}")
        os.makedirs(semantic_dir, exist_ok=True)
        with open(json_file) as f:
            annotations = json.load(f)["annotations"]

        convert = functools.partial(
            _convert_one,
            panoptic_dir=panoptic_dir,
            semantic_dir=semantic_dir,
            dataset_id_to_contiguous_id=dataset_id_to_contiguous_id,
        )
        progress = functools.partial(tqdm.tqdm, total=len(annotations), desc=f"COCO {split}")
        if num_workers > 1:
            with mp.Pool(num_workers) as pool:
                for _ in progress(pool.imap_unordered(convert, annotations, chunksize=16)):
                    pass
        else:
            for annotation in progress(annotations):
                convert(annotation)
        counts[split] = len(annotations)
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--root",
        default=os.path.join(os.getenv("DETECTRON2_DATASETS", "datasets"), "coco"),
        help="the coco folder (default: $DETECTRON2_DATASETS/coco)",
    )
    parser.add_argument("--workers", type=int, default=4, help="worker processes")
    args = parser.parse_args(argv)
    counts = convert_coco_panoptic_sem_seg(args.root, num_workers=args.workers)
    print(f"Wrote {counts} semantic PNGs under {args.root}")


if __name__ == "__main__":
    main()
