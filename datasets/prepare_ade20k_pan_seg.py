#!/usr/bin/env python3
"""Build ADE20K-150 panoptic annotations and the matching COCO instance JSON.

Inputs (under ``ADEChallengeData2016``):

- ``images/{training,validation}/*.jpg``
- ``annotations/{training,validation}/*.png``: SceneParsing semantic labels, 0 = void,
  k = 1..150 = class k - 1 of the class table ``mask_former/data/datasets/classes/ade20k_150.json``;
- ``annotations_instance/{training,validation}/*.png`` (Places Challenge 2017 instance
  annotations): R = instance class 1..100 (0 = none), G = instance id (0 = none; unique per
  image whatever the class).

Outputs:

- ``ade20k_panoptic_{train,val}/*.png`` + ``ade20k_panoptic_{train,val}.json``: COCO panoptic
  format; category ids are the 0-based SceneParsing ids (0..149), image ids the file stems.
  Stuff segments come from the semantic labels of the 50 stuff classes, thing segments from the
  instance masks, pasted over the stuff (the two annotations overlap slightly). Pixels of a thing
  class that no instance covers are void. Areas and boxes are measured on the final map.
  Segment ids are ``(category_id + 1) * 1000 + k`` (k = 0 for stuff, k = 1, 2, ... for the
  instances of a class), stored as ``id = R + 256 G + 256^2 B``.
- ``ade20k_instance_{train,val}.json``: COCO instance format (RLE masks) with the 100 thing
  classes under their SceneParsing ids, for mask AP.

Instance class -> SceneParsing class: the 100 instance classes (``instanceInfo100_train.txt`` of
the Places Challenge: 1 bed, 2 windowpane, 3 cabinet, 4 person, ..., 100 flag) are the 100
"thing" classes of ADE20K-150 in the same order, so instance class k maps to the k-th class with
``isthing=1``. The official ``ade20k_instance_catid_mapping.txt`` (header line, then
"instance_id sceneparsing_id full_ade_id" per line, 1-based) can be given with
``--catid-mapping`` instead; it is checked against the thing classes.

Usage::

    python datasets/prepare_ade20k_pan_seg.py [--root $DETECTRON2_DATASETS/ADEChallengeData2016]
"""
import argparse
import json
import os
import sys
from collections import defaultdict

import numpy as np
import pycocotools.mask as mask_util
import tqdm
from panopticapi.utils import id2rgb
from PIL import Image

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from mask_former.data.datasets.class_tables import load_class_table  # noqa: E402

ADE20K_150_CATEGORIES = load_class_table("ade20k_150").categories
ADE20K_PANOPTIC_SPLITS = (("train", "training"), ("val", "validation"))
LABEL_DIVISOR = 1000
THING_IDS = [c["id"] for c in ADE20K_150_CATEGORIES if c["isthing"]]
IS_THING = {c["id"]: bool(c["isthing"]) for c in ADE20K_150_CATEGORIES}


def default_instance_to_semantic():
    """{instance class 1..100: SceneParsing id 0..149}: the k-th thing class, in order."""
    return {k + 1: thing_id for k, thing_id in enumerate(THING_IDS)}


def load_instance_to_semantic(mapping_file):
    """
    Read the official ``ade20k_instance_catid_mapping.txt``.

    Returns:
        dict[int, int]: instance class (1-based) -> SceneParsing id (0-based).
    """
    mapping = {}
    with open(mapping_file) as f:
        lines = f.read().splitlines()[1:]  # first line is a header
    for line_number, line in enumerate(lines, start=2):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) < 2 or not fields[0].isdigit() or not fields[1].isdigit():
            raise ValueError(
                f"{mapping_file}:{line_number}: expected 'instance_id sceneparsing_id ...', "
                f"got {line!r}"
            )
        instance_id, semantic_id = int(fields[0]), int(fields[1]) - 1
        if not IS_THING.get(semantic_id, False):
            raise ValueError(
                f"{mapping_file}:{line_number}: instance class {instance_id} maps to SceneParsing "
                f"id {semantic_id + 1}, which is not one of the 100 thing classes"
            )
        mapping[instance_id] = semantic_id
    return mapping


def _bbox(mask):
    """[x, y, width, height] of the True pixels of an H x W mask."""
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    return [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1]


def iter_instances(instance_png, instance_to_semantic, where):
    """
    Yield ``(mask, semantic_id)`` for each instance of an instance annotation.

    Args:
        instance_png (np.ndarray): H x W x 3 uint8, R = instance class, G = instance id.
        instance_to_semantic (dict[int, int]): instance class -> SceneParsing id.
        where (str): file name for error messages.
    """
    if instance_png.ndim != 3 or instance_png.shape[2] < 2:
        raise ValueError(f"{where}: expected an RGB instance PNG, got shape {instance_png.shape}")
    classes, instance_ids = instance_png[..., 0], instance_png[..., 1]
    for instance_id in np.unique(instance_ids):
        if instance_id == 0:
            continue
        mask = instance_ids == instance_id
        instance_classes = np.unique(classes[mask])
        if len(instance_classes) != 1:
            raise ValueError(
                f"{where}: instance {instance_id} has several classes {instance_classes.tolist()}"
            )
        instance_class = int(instance_classes[0])
        if instance_class not in instance_to_semantic:
            raise ValueError(
                f"{where}: instance {instance_id} has class {instance_class}, expected one of "
                f"1..{len(instance_to_semantic)}"
            )
        yield mask, instance_to_semantic[instance_class]


def build_panoptic(semantic, instance_png, instance_to_semantic, where):
    """
    Args:
        semantic (np.ndarray): H x W SceneParsing labels (0 = void, k = class k - 1).
        instance_png (np.ndarray): H x W x 3 instance annotation.
        instance_to_semantic (dict[int, int]): instance class -> SceneParsing id.
        where (str): file name for error messages.

    Returns:
        panoptic (np.ndarray): H x W int32 segment ids, 0 = void.
        segments_info (list[dict]): ``id``, ``category_id``, ``area``, ``bbox``, ``iscrowd``.
    """
    if semantic.shape != instance_png.shape[:2]:
        raise ValueError(
            f"{where}: semantic label {semantic.shape} and instance PNG "
            f"{instance_png.shape[:2]} differ in size"
        )
    if semantic.max(initial=0) > len(ADE20K_150_CATEGORIES):
        raise ValueError(f"{where}: semantic label {semantic.max()} is above 150")
    panoptic = np.zeros(semantic.shape, dtype=np.int32)
    category_of = {}
    for value in np.unique(semantic):
        category_id = int(value) - 1
        if value == 0 or IS_THING[category_id]:
            continue
        segment_id = (category_id + 1) * LABEL_DIVISOR
        panoptic[semantic == value] = segment_id
        category_of[segment_id] = category_id
    instances_per_class = defaultdict(int)
    for mask, category_id in iter_instances(instance_png, instance_to_semantic, where):
        instances_per_class[category_id] += 1
        segment_id = (category_id + 1) * LABEL_DIVISOR + instances_per_class[category_id]
        panoptic[mask] = segment_id
        category_of[segment_id] = category_id

    segments_info = []
    for segment_id in np.unique(panoptic):
        if segment_id == 0:
            continue
        mask = panoptic == segment_id
        segments_info.append(
            {
                "id": int(segment_id),
                "category_id": category_of[int(segment_id)],
                "area": int(mask.sum()),
                "bbox": _bbox(mask),
                "iscrowd": 0,
            }
        )
    return panoptic, segments_info


def build_instance_annotations(instance_png, instance_to_semantic, where):
    """COCO instance annotations (without ``id``/``image_id``) of one instance PNG."""
    annotations = []
    for mask, category_id in iter_instances(instance_png, instance_to_semantic, where):
        rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        annotations.append(
            {
                "category_id": category_id,
                "segmentation": rle,
                "area": int(mask.sum()),
                "bbox": _bbox(mask),
                "iscrowd": 0,
            }
        )
    return annotations


def convert_ade20k_panoptic(ade_root, splits=ADE20K_PANOPTIC_SPLITS, mapping_file=None):
    """
    Write the panoptic PNGs, the panoptic JSON and the instance JSON of each split.

    Args:
        ade_root (str): the ``ADEChallengeData2016`` folder.
        splits: (output split name, input folder name) pairs.
        mapping_file (str or None): official instance -> SceneParsing mapping; the default is
            :func:`default_instance_to_semantic`.

    Returns:
        dict[str, int]: number of images converted per split.
    """
    instance_to_semantic = (
        load_instance_to_semantic(mapping_file) if mapping_file else default_instance_to_semantic()
    )
    panoptic_categories = [dict(c) for c in ADE20K_150_CATEGORIES]
    instance_categories = [
        {"id": c["id"], "name": c["name"], "isthing": 1}
        for c in ADE20K_150_CATEGORIES
        if c["id"] in set(instance_to_semantic.values())
    ]
    counts = {}
    for split, dirname in splits:
        image_dir = os.path.join(ade_root, "images", dirname)
        semantic_dir = os.path.join(ade_root, "annotations", dirname)
        instance_dir = os.path.join(ade_root, "annotations_instance", dirname)
        for path in [image_dir, semantic_dir, instance_dir]:
            if not os.path.isdir(path):
                raise FileNotFoundError(
                    f"{path} does not exist; see datasets/README.md for the ADE20K panoptic inputs"
                )
        panoptic_dir = os.path.join(ade_root, f"ade20k_panoptic_{split}")
        os.makedirs(panoptic_dir, exist_ok=True)

        images, panoptic_annotations, instance_annotations = [], [], []
        file_names = sorted(f for f in os.listdir(image_dir) if f.endswith(".jpg"))
        for file_name in tqdm.tqdm(file_names, desc=f"ADE20K panoptic {split}"):
            stem = os.path.splitext(file_name)[0]
            semantic_path = os.path.join(semantic_dir, stem + ".png")
            instance_path = os.path.join(instance_dir, stem + ".png")
            for path in [semantic_path, instance_path]:
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"{path} (annotation of {file_name}) does not exist")
            with Image.open(os.path.join(image_dir, file_name)) as image:
                width, height = image.size
            semantic = np.asarray(Image.open(semantic_path))
            instance_png = np.asarray(Image.open(instance_path).convert("RGB"))
            if semantic.shape != (height, width):
                raise ValueError(
                    f"{semantic_path} is {semantic.shape}, its image {file_name} is "
                    f"{(height, width)}"
                )

            panoptic, segments_info = build_panoptic(
                semantic, instance_png, instance_to_semantic, instance_path
            )
            Image.fromarray(id2rgb(panoptic)).save(os.path.join(panoptic_dir, stem + ".png"))
            images.append({"id": stem, "file_name": file_name, "width": width, "height": height})
            panoptic_annotations.append(
                {"image_id": stem, "file_name": stem + ".png", "segments_info": segments_info}
            )
            for annotation in build_instance_annotations(
                instance_png, instance_to_semantic, instance_path
            ):
                annotation.update(id=len(instance_annotations) + 1, image_id=stem)
                instance_annotations.append(annotation)

        with open(os.path.join(ade_root, f"ade20k_panoptic_{split}.json"), "w") as f:
            json.dump(
                {
                    "images": images,
                    "annotations": panoptic_annotations,
                    "categories": panoptic_categories,
                },
                f,
            )
        with open(os.path.join(ade_root, f"ade20k_instance_{split}.json"), "w") as f:
            json.dump(
                {
                    "images": images,
                    "annotations": instance_annotations,
                    "categories": instance_categories,
                },
                f,
            )
        counts[split] = len(images)
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--root",
        default=os.path.join(os.getenv("DETECTRON2_DATASETS", "datasets"), "ADEChallengeData2016"),
        help="the ADEChallengeData2016 folder (default: $DETECTRON2_DATASETS/ADEChallengeData2016)",
    )
    parser.add_argument(
        "--catid-mapping",
        default=None,
        help="optional official ade20k_instance_catid_mapping.txt (instance -> SceneParsing ids)",
    )
    args = parser.parse_args(argv)
    counts = convert_ade20k_panoptic(args.root, mapping_file=args.catid_mapping)
    print(f"Converted {counts} images under {args.root}")


if __name__ == "__main__":
    main()
