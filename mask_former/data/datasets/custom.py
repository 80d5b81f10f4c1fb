"""One-call registration of user datasets in the three formats MaskFormer trains on.

Each ``register_*`` function puts a lazy loader into ``DatasetCatalog`` and complete metadata
into ``MetadataCatalog``, so that ``tools/train_net.py`` and the evaluators it picks from
``evaluator_type`` work on the registered name:

- :func:`register_semantic_folder`: a folder of images and a folder of label PNGs
  (``evaluator_type="sem_seg"``).
- :func:`register_coco_instance_json`: a COCO instance-segmentation JSON
  (``evaluator_type="coco"``).
- :func:`register_coco_panoptic_json`: COCO panoptic PNGs + JSON, optionally with semantic PNGs
  and an instance JSON for semantic and instance evaluation of the same model
  (``evaluator_type="coco_panoptic_seg"``).

Loading (``DatasetCatalog.get``) raises ``FileNotFoundError`` naming the missing path, and
``ValueError`` naming the file and the value when an annotation refers to an unknown category.
"""

import json
import logging
import os
from collections.abc import Mapping

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json, load_sem_seg
from detectron2.utils.colormap import colormap

__all__ = [
    "panoptic_metadata_from_categories",
    "load_coco_panoptic_json",
    "load_semantic_folder",
    "register_semantic_folder",
    "register_coco_instance_json",
    "register_coco_panoptic_json",
]

logger = logging.getLogger(__name__)


def _require_file(path, what):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")


def _require_dir(path, what):
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} directory not found: {path}")


def _default_colors(num):
    """``num`` distinct RGB colors (lists of 3 ints) from detectron2's fixed palette."""
    palette = colormap(rgb=True, maximum=255).astype(int).tolist()
    return [palette[i % len(palette)] for i in range(num)]


def _check_colors(colors, num, where):
    if len(colors) != num:
        raise ValueError(f"{where}: got {len(colors)} colors for {num} classes")
    for color in colors:
        if len(color) != 3 or not all(0 <= int(c) <= 255 for c in color):
            raise ValueError(f"{where}: color {color!r} is not 3 integers in [0, 255]")
    return [[int(c) for c in color] for color in colors]


# ------------------------------------------------------------------------------ semantic


def load_semantic_folder(image_root, sem_seg_root, image_ext=".jpg", gt_ext=".png"):
    """
    Pair images with label PNGs that have the same relative name (extension aside).

    Returns:
        list[dict]: ``{"file_name", "sem_seg_file_name"}`` per pair, sorted by name (files present
        in only one of the two folders are skipped with a warning, as detectron2's
        ``load_sem_seg`` does).
    """
    _require_dir(image_root, "Image")
    _require_dir(sem_seg_root, "Semantic label")
    if not any(f.endswith(gt_ext) for f in os.listdir(sem_seg_root)):
        raise FileNotFoundError(f"No label files ending in '{gt_ext}' in {sem_seg_root}")
    dicts = load_sem_seg(sem_seg_root, image_root, gt_ext=gt_ext, image_ext=image_ext)
    if not dicts:
        raise FileNotFoundError(
            f"No image in {image_root} ending in '{image_ext}' has a label in {sem_seg_root} "
            f"ending in '{gt_ext}' (images and labels are paired by file name)"
        )
    return dicts


def register_semantic_folder(
    name,
    image_root,
    sem_seg_root,
    classes,
    ignore_label=255,
    colors=None,
    image_ext=".jpg",
    gt_ext=".png",
):
    """
    Register a semantic segmentation dataset: ``image_root/x{image_ext}`` is labelled by
    ``sem_seg_root/x{gt_ext}``, a single-channel image whose pixel values are indices into
    ``classes`` (or ``ignore_label``).

    Args:
        name (str): dataset name, e.g. ``"my_dataset_train"``.
        classes (list[str]): class names; label value ``i`` is ``classes[i]``.
        ignore_label (int): label value excluded from training and evaluation.
        colors (list[list[int]] or None): one RGB color per class for visualization;
            None picks detectron2's palette.
        image_ext, gt_ext (str): file name endings of images and labels.

    Sets metadata ``stuff_classes``, ``stuff_colors``, ``ignore_label``, ``image_root``,
    ``sem_seg_root`` and ``evaluator_type="sem_seg"``. Nothing is read from disk until the
    dataset is loaded.
    """
    classes = list(classes)
    if not classes or not all(isinstance(c, str) for c in classes):
        raise ValueError(
            f"Dataset '{name}': classes must be a non-empty list of str, got {classes!r}"
        )
    if not (0 <= int(ignore_label) <= 255) or int(ignore_label) < len(classes):
        raise ValueError(
            f"Dataset '{name}': ignore_label={ignore_label} must be in [{len(classes)}, 255], "
            f"so that it is no class id of the {len(classes)} classes and fits in a uint8 PNG"
        )
    colors = _default_colors(len(classes)) if colors is None else colors
    colors = _check_colors(colors, len(classes), f"Dataset '{name}'")

    DatasetCatalog.register(
        name, lambda: load_semantic_folder(image_root, sem_seg_root, image_ext, gt_ext)
    )
    MetadataCatalog.get(name).set(
        stuff_classes=classes,
        stuff_colors=colors,
        ignore_label=int(ignore_label),
        image_root=image_root,
        sem_seg_root=sem_seg_root,
        evaluator_type="sem_seg",
    )


# ------------------------------------------------------------------------------ instances


def _load_coco_instance_json(json_file, image_root, name):
    _require_file(json_file, "COCO instance json")
    _require_dir(image_root, "Image")
    try:
        return load_coco_json(json_file, image_root, name)
    except KeyError as e:
        # load_coco_json reports an annotation whose category is not in "categories" this way
        if "category_id" not in str(e):
            raise
        raise ValueError(f"{json_file}: {e.args[0]}") from e


def register_coco_instance_json(name, json_file, image_root, thing_classes=None):
    """
    Register a dataset in COCO instance-segmentation JSON format (like detectron2's
    ``register_coco_instances``), with ``evaluator_type="coco"``.

    Category ids are mapped to contiguous ids in increasing id order when the dataset is
    loaded, which is also when ``thing_classes`` and ``thing_dataset_id_to_contiguous_id``
    enter the metadata (read from the JSON's ``categories``). Pass ``thing_classes`` (names in
    increasing category-id order) to have them in the metadata before loading, e.g. for the
    demo on a machine without the JSON.
    """
    DatasetCatalog.register(name, lambda: _load_coco_instance_json(json_file, image_root, name))
    meta = dict(json_file=json_file, image_root=image_root, evaluator_type="coco")
    if thing_classes is not None:
        meta["thing_classes"] = list(thing_classes)
    MetadataCatalog.get(name).set(**meta)


# ------------------------------------------------------------------------------ panoptic


def panoptic_metadata_from_categories(categories):
    """
    Metadata of a panoptic dataset from its COCO panoptic ``categories``.

    Contiguous ids put the thing categories first (by increasing dataset id), then the stuff
    categories (by increasing dataset id): detectron2's COCOEvaluator needs the things at
    0..T-1, and this is the order ``load_coco_json`` gives the things of an instance JSON.

    Args:
        categories (list[dict]): each with "id" (int), "name" (str), "isthing" (0/1) and
            optionally "color" (RGB); missing colors come from detectron2's palette.

    Returns:
        dict: ``thing_classes``, ``thing_colors``, ``stuff_classes`` and ``stuff_colors`` (all
        classes, things first), ``thing_dataset_id_to_contiguous_id`` (things only) and
        ``stuff_dataset_id_to_contiguous_id`` (all categories -> 0..K-1).
    """
    if not categories:
        raise ValueError("A panoptic dataset needs at least one category, got none")
    seen = set()
    for cat in categories:
        for key in ("id", "name", "isthing"):
            if key not in cat:
                raise ValueError(f"Category {cat!r} has no '{key}' (needs id, name, isthing)")
        if cat["id"] in seen:
            raise ValueError(f"Category id {cat['id']} appears twice in the categories")
        seen.add(cat["id"])
    things = sorted((c for c in categories if c["isthing"]), key=lambda c: c["id"])
    stuff = sorted((c for c in categories if not c["isthing"]), key=lambda c: c["id"])
    ordered = things + stuff
    palette = _default_colors(len(ordered))
    colors = [list(c["color"]) if "color" in c else palette[i] for i, c in enumerate(ordered)]
    colors = _check_colors(colors, len(ordered), "Panoptic categories")
    return {
        "thing_classes": [c["name"] for c in things],
        "thing_colors": colors[: len(things)],
        "stuff_classes": [c["name"] for c in ordered],
        "stuff_colors": colors,
        "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(things)},
        "stuff_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(ordered)},
    }


def load_coco_panoptic_json(json_file, image_dir, gt_dir, meta, sem_seg_dir=None, image_ext=None):
    """
    Load a COCO panoptic dataset into detectron2's format.

    Args:
        json_file (str): the panoptic JSON ("images", "annotations" with "segments_info").
        image_dir (str): folder of the images named by the JSON's "images" entries.
        gt_dir (str): folder of the panoptic PNGs named by the annotations' "file_name".
        meta (Mapping): with ``thing_dataset_id_to_contiguous_id`` and
            ``stuff_dataset_id_to_contiguous_id`` (all categories), as made by
            :func:`panoptic_metadata_from_categories`.
        sem_seg_dir (str or None): folder of semantic PNGs (contiguous ids) with the panoptic
            PNGs' names; adds "sem_seg_file_name" to each dict.
        image_ext (str or None): for a JSON without an "images" list: the image of annotation
            ``X.png`` is ``X`` + image_ext in image_dir (detectron2's COCO panoptic convention).

    Returns:
        list[dict]: one per annotation, with "file_name", "image_id", "height", "width" (when the
        image entry has them), "pan_seg_file_name", "segments_info" (each segment's
        "category_id" mapped to its contiguous id, plus "isthing") and "sem_seg_file_name".
    """
    if not isinstance(meta, Mapping):
        raise TypeError(f"meta must be a Mapping (dict), got {type(meta).__name__}")
    _require_file(json_file, "COCO panoptic json")
    _require_dir(image_dir, "Image")
    _require_dir(gt_dir, "Panoptic PNG")
    if sem_seg_dir is not None:
        _require_dir(sem_seg_dir, "Semantic PNG")
    with open(json_file) as f:
        json_info = json.load(f)
    required = ("annotations",) if image_ext is not None else ("images", "annotations")
    for key in required:
        if key not in json_info:
            raise ValueError(f"{json_file} has no '{key}' list (not a COCO panoptic json)")

    thing_ids = meta["thing_dataset_id_to_contiguous_id"]
    all_ids = meta["stuff_dataset_id_to_contiguous_id"]
    images = {img["id"]: img for img in json_info.get("images", [])}

    dataset_dicts = []
    for ann in json_info["annotations"]:
        image_id = ann["image_id"]
        if image_id not in images and image_ext is not None:
            images[image_id] = {"file_name": os.path.splitext(ann["file_name"])[0] + image_ext}
        if image_id not in images:
            raise ValueError(
                f"{json_file}: annotation {ann['file_name']} has image_id {image_id} "
                "that is not in 'images'"
            )
        image_info = images[image_id]
        segments_info = []
        for segment in ann["segments_info"]:
            category_id = segment["category_id"]
            if category_id not in all_ids:
                raise ValueError(
                    f"{json_file}: segment {segment.get('id')} of {ann['file_name']} has "
                    f"category_id {category_id}, which is not among the categories "
                    f"{sorted(all_ids)}"
                )
            segments_info.append(
                dict(segment, category_id=all_ids[category_id], isthing=category_id in thing_ids)
            )
        record = {
            "file_name": os.path.join(image_dir, image_info["file_name"]),
            "image_id": image_id,
            "pan_seg_file_name": os.path.join(gt_dir, ann["file_name"]),
            "segments_info": segments_info,
        }
        if "height" in image_info and "width" in image_info:
            record["height"] = image_info["height"]
            record["width"] = image_info["width"]
        if sem_seg_dir is not None:
            stem = os.path.splitext(ann["file_name"])[0]
            record["sem_seg_file_name"] = os.path.join(sem_seg_dir, stem + ".png")
        dataset_dicts.append(record)

    if not dataset_dicts:
        raise ValueError(f"{json_file} has no annotations")
    # checking every file would cost a stat per image on large datasets; the first catches a
    # wrong folder
    first = dataset_dicts[0]
    for key in ("file_name", "pan_seg_file_name", "sem_seg_file_name"):
        if key in first:
            _require_file(first[key], f"'{key}' of image {first['image_id']}")
    return dataset_dicts


def register_coco_panoptic_json(
    name,
    image_root,
    panoptic_root,
    panoptic_json,
    sem_seg_root=None,
    instances_json=None,
    categories=None,
):
    """
    Register a COCO panoptic dataset with ``evaluator_type="coco_panoptic_seg"``.

    Metadata must be complete at registration, so unless ``categories`` is given this reads
    the "categories" of ``panoptic_json`` now (one file read; raises FileNotFoundError when it
    is missing). The images themselves are read lazily.

    Args:
        name (str): dataset name.
        image_root (str): folder of the images.
        panoptic_root (str): folder of the panoptic PNGs (segment ids encoded as RGB).
        panoptic_json (str): the COCO panoptic JSON.
        sem_seg_root (str or None): folder of semantic PNGs with contiguous ids (things first, see
            :func:`panoptic_metadata_from_categories`), needed for semantic evaluation.
        instances_json (str or None): COCO instance JSON of the things, needed for instance
            (mask AP) evaluation.
        categories (list[dict] or None): the categories, to skip reading them from the JSON.

    Metadata: everything :func:`panoptic_metadata_from_categories` returns, plus
    ``panoptic_root``, ``panoptic_json``, ``image_root``, ``sem_seg_root`` and ``json_file``
    (the latter two when given), ``ignore_label=255``, ``label_divisor=1000``.
    """
    if categories is None:
        _require_file(panoptic_json, "COCO panoptic json")
        with open(panoptic_json) as f:
            json_info = json.load(f)
        if "categories" not in json_info:
            raise ValueError(f"{panoptic_json} has no 'categories' list")
        categories = json_info["categories"]
    meta = panoptic_metadata_from_categories(categories)

    DatasetCatalog.register(
        name,
        lambda: load_coco_panoptic_json(
            panoptic_json, image_root, panoptic_root, meta, sem_seg_root
        ),
    )
    extra = {"sem_seg_root": sem_seg_root, "json_file": instances_json}
    MetadataCatalog.get(name).set(
        panoptic_root=panoptic_root,
        panoptic_json=panoptic_json,
        image_root=image_root,
        ignore_label=255,
        label_divisor=1000,
        evaluator_type="coco_panoptic_seg",
        **{k: v for k, v in extra.items() if v is not None},
        **meta,
    )
