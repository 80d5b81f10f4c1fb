"""Writing the built-in synthetic dataset to disk, in the three annotation formats.

:func:`generate_synthetic_dataset` draws each image with :func:`scenes.synthesize_scene` from its
own random stream (seed, split, index) and writes, pixel for pixel in agreement, COCO panoptic
PNGs + JSON, semantic PNGs (contiguous ids, things first) and a COCO instance JSON; the layout is
:func:`split_paths`. It registers nothing (see :mod:`.register`).
"""
import json
import os
import shutil
import tempfile

import numpy as np
from panopticapi.utils import id2rgb
from PIL import Image
from pycocotools import mask as mask_util
from tqdm import tqdm

from ..registration import datasets_root
from .categories import SYNTHETIC_CATEGORIES, SYNTHETIC_METADATA
from .scenes import synthesize_scene

__all__ = ["MARKER_FILE", "SPLITS", "split_paths", "generate_synthetic_dataset"]

# bump when the generated content changes, so that old copies get regenerated
_FORMAT_VERSION = 1
MARKER_FILE = "generation_complete.json"
_SPLIT_CODES = {"train": 0, "val": 1}
SPLITS = tuple(_SPLIT_CODES)


def _mask_bbox(mask):
    """[x, y, w, h] (ints) of the pixels of a non-empty H x W bool mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def split_paths(dataset_dir, split):
    """The files of ``split`` under ``dataset_dir`` (``<root>/synthetic``): the layout the
    generator writes and the registration reads."""
    return {
        "image_root": os.path.join(dataset_dir, "images", split),
        "panoptic_root": os.path.join(dataset_dir, f"panoptic_{split}"),
        "panoptic_json": os.path.join(dataset_dir, f"panoptic_{split}.json"),
        "sem_seg_root": os.path.join(dataset_dir, f"semantic_{split}"),
        "instances_json": os.path.join(dataset_dir, f"instances_{split}.json"),
    }


def _write_split(dataset_dir, split, num_images, image_size, seed, max_instances, progress):
    paths = split_paths(dataset_dir, split)
    for key in ("image_root", "panoptic_root", "sem_seg_root"):
        os.makedirs(paths[key], exist_ok=True)
    contiguous = SYNTHETIC_METADATA["stuff_dataset_id_to_contiguous_id"]
    images, panoptic_anns, instance_anns = [], [], []

    indices = range(num_images)
    if progress:
        indices = tqdm(indices, desc=f"synthetic {split}", unit="img")
    for index in indices:
        # one stream per image: an image does not depend on the number of images in any split
        rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
        scene = synthesize_scene(rng, image_size, max_instances)
        image_id = index + 1
        file_name = f"{image_id:06d}.png"
        semantic = np.zeros(scene.segment_ids.shape, dtype=np.uint8)
        segments_info = []
        for segment in scene.segments:
            semantic[segment["mask"]] = contiguous[segment["category_id"]]
            area, bbox = int(segment["mask"].sum()), _mask_bbox(segment["mask"])
            segments_info.append(
                dict(
                    id=segment["id"],
                    category_id=segment["category_id"],
                    area=area,
                    bbox=bbox,
                    iscrowd=0,
                )
            )
            if segment["isthing"]:
                rle = mask_util.encode(np.asfortranarray(segment["mask"].astype(np.uint8)))
                instance_anns.append(
                    dict(
                        id=len(instance_anns) + 1,
                        image_id=image_id,
                        category_id=segment["category_id"],
                        segmentation={"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                        area=area,
                        bbox=bbox,
                        iscrowd=0,
                    )
                )
        Image.fromarray(scene.image).save(os.path.join(paths["image_root"], file_name))
        Image.fromarray(id2rgb(scene.segment_ids)).save(
            os.path.join(paths["panoptic_root"], file_name)
        )
        Image.fromarray(semantic).save(os.path.join(paths["sem_seg_root"], file_name))
        images.append(dict(id=image_id, file_name=file_name, height=image_size, width=image_size))
        panoptic_anns.append(
            dict(image_id=image_id, file_name=file_name, segments_info=segments_info)
        )

    info = {
        "description": f"MaskFormer synthetic scenes, {split} split",
        "version": str(_FORMAT_VERSION),
    }
    categories = [
        dict(c, supercategory="thing" if c["isthing"] else "stuff") for c in SYNTHETIC_CATEGORIES
    ]
    panoptic = dict(
        info=info, licenses=[], images=images, annotations=panoptic_anns, categories=categories
    )
    instances = dict(
        info=info,
        licenses=[],
        images=images,
        annotations=instance_anns,
        categories=[c for c in categories if c["isthing"]],
    )
    with open(paths["panoptic_json"], "w") as f:
        json.dump(panoptic, f)
    with open(paths["instances_json"], "w") as f:
        json.dump(instances, f)


def _read_marker(dataset_dir):
    try:
        with open(os.path.join(dataset_dir, MARKER_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def generate_synthetic_dataset(
    root=None, num_train=400, num_val=50, image_size=128, seed=0, max_instances=6, progress=False
):
    """
    Write the synthetic dataset under ``<root>/synthetic`` (see the package docstring).

    Deterministic for given parameters, and idempotent: returns at once when the dataset was
    already generated with the same parameters, and replaces a copy generated with other
    parameters. Files are written to a temporary folder next to it and moved into place when
    complete, so readers never see a partial dataset. In distributed jobs, call it from one
    process and synchronize (``detectron2.utils.comm.synchronize``) before loading.

    Args:
        root (str or None): datasets root; None means ``$DETECTRON2_DATASETS`` or "datasets".
        num_train, num_val (int): images per split.
        image_size (int): height and width of the square images.
        seed (int): the random seed.
        max_instances (int): things drawn per image before dropping hidden ones.
        progress (bool): show a tqdm progress bar.

    Returns:
        str: the dataset folder ``<root>/synthetic``.
    """
    if root is None:
        root = datasets_root()
    for key, value, minimum in (
        ("num_train", num_train, 0),
        ("num_val", num_val, 0),
        ("seed", seed, 0),
        ("image_size", image_size, 16),
        ("max_instances", max_instances, 1),
    ):
        if not isinstance(value, (int, np.integer)) or value < minimum:
            raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r}")
    params = dict(
        format_version=_FORMAT_VERSION,
        num_train=int(num_train),
        num_val=int(num_val),
        image_size=int(image_size),
        seed=int(seed),
        max_instances=int(max_instances),
    )
    dataset_dir = os.path.join(root, "synthetic")
    if _read_marker(dataset_dir) == params:
        return dataset_dir

    os.makedirs(root, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=".synthetic-", dir=root)
    try:
        for split, num_images in (("train", params["num_train"]), ("val", params["num_val"])):
            _write_split(tmp_dir, split, num_images, image_size, seed, max_instances, progress)
        with open(os.path.join(tmp_dir, MARKER_FILE), "w") as f:
            json.dump(params, f, indent=2)
        if _read_marker(dataset_dir) == params:  # another process finished first
            return dataset_dir
        if os.path.isdir(dataset_dir):
            shutil.rmtree(dataset_dir)
        os.rename(tmp_dir, dataset_dir)
    finally:
        if os.path.isdir(tmp_dir):
            shutil.rmtree(tmp_dir)
    return dataset_dir
