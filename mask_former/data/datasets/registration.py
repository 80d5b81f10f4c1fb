"""The one registration layer: every dataset of this project (standard, custom and built-in) is
registered by one of three functions, one per annotation format:

- :func:`register_semantic`: a folder of images and a folder of label maps of the same names
  (``evaluator_type="sem_seg"``);
- :func:`register_instances`: a COCO instance-segmentation JSON (``evaluator_type="coco"``);
- :func:`register_panoptic`: COCO panoptic PNGs + JSON, optionally with semantic PNGs and an
  instance JSON of the same images, so that one model is also scored on mIoU and mask AP
  (``evaluator_type="coco_panoptic_seg"`` unless told otherwise).

Each takes the class metadata ready-made (from :func:`metadata.build_metadata`), puts a lazy
loader into ``DatasetCatalog`` and the complete metadata into ``MetadataCatalog``, and reads no
file: ``--eval-only`` and the demo work on a machine that has only the metadata. The loaders
raise ``FileNotFoundError`` naming the dataset, the missing path and, when the registration gave
one, how to create it; and ``ValueError`` naming the file and the value of a bad annotation.
"""
import json
import logging
import os
from collections.abc import Mapping

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.utils.file_io import PathManager

__all__ = [
    "datasets_root",
    "require_paths",
    "load_sem_seg_checked",
    "load_coco_instances",
    "load_coco_panoptic_json",
    "register_semantic",
    "register_instances",
    "register_panoptic",
]

logger = logging.getLogger(__name__)

# Panoptic datasets: the void value of their semantic PNGs, and the divisor that
# encodes (class, instance) into one id in predictions.
PANOPTIC_IGNORE_LABEL = 255
PANOPTIC_LABEL_DIVISOR = 1000


def datasets_root():
    """The folder holding the standard datasets: ``$DETECTRON2_DATASETS``, default ``datasets``
    (relative to the working directory), as in detectron2's own builtin registration."""
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def require_paths(paths, dataset_name=None, how_to_prepare=None):
    """
    Raise ``FileNotFoundError`` for the first of ``paths`` that does not exist.

    Args:
        paths (list[str]): files or directories a loader needs.
        dataset_name (str or None): registered name, quoted in the message.
        how_to_prepare (str or None): how to create the data, e.g.
            "run `python datasets/prepare_ade20k_sem_seg.py`".
    """
    for path in paths:
        if not PathManager.exists(path):
            if dataset_name:
                message = f"Dataset '{dataset_name}' needs '{path}', which does not exist."
            else:
                message = f"'{path}' does not exist."
            if how_to_prepare:
                message += f" To create it, {how_to_prepare}."
            raise FileNotFoundError(message)


# ------------------------------------------------------------------------------ loaders


def read_json(path):
    """The content of the JSON file ``path``; a file that is not valid JSON raises ValueError
    naming it (with the line and column of the error)."""
    with PathManager.open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e


def load_sem_seg_checked(
    dataset_name, gt_root, image_root, gt_ext="png", image_ext="jpg", how_to_prepare=None
):
    """
    The (image, label) pairs of two folders: ``image_root/x{image_ext}`` is labelled by
    ``gt_root/x{gt_ext}`` (sub-folders included). Files present in only one of the folders are
    skipped with a warning that names them. (detectron2's ``load_sem_seg`` pairs files by their
    sorted order when both folders hold as many files, so one unlabelled image and one stray
    label would be paired silently; this pairs by name always.)

    Returns:
        list[dict]: ``{"file_name", "sem_seg_file_name"}`` per pair, sorted by name.
    """
    require_paths([image_root, gt_root], dataset_name, how_to_prepare)
    images = _files_by_stem(image_root, image_ext)
    labels = _files_by_stem(gt_root, gt_ext)
    if not labels:
        raise FileNotFoundError(f"No label files ending in '{gt_ext}' in {gt_root}")
    dicts = [
        {"file_name": os.path.join(image_root, images[stem]), "sem_seg_file_name": os.path.join(gt_root, labels[stem])}
        for stem in sorted(set(images) & set(labels))
    ]
    if not dicts:
        raise FileNotFoundError(
            f"No image in {image_root} ending in '{image_ext}' has a label in {gt_root} "
            f"ending in '{gt_ext}' (images and labels are paired by file name)"
        )
    for files, others, root, what in ((images, labels, image_root, "images without a label"),
                                      (labels, images, gt_root, "labels without an image")):
        unpaired = [files[stem] for stem in sorted(set(files) - set(others))]
        if unpaired:
            shown = 10
            more = f" and {len(unpaired) - shown} more" if len(unpaired) > shown else ""
            logger.warning(
                f"Dataset {dataset_name!r}: {len(unpaired)} {what} in {root} are not used: "
                f"{', '.join(unpaired[:shown])}{more}"
            )
    logger.info(f"Loaded {len(dicts)} images with semantic labels from {image_root}")
    return dicts


def _files_by_stem(root, ext):
    """File name (relative to ``root``, sub-folders included) by its name without ``ext``."""
    ext = ext if ext.startswith(".") else "." + ext
    found = {}
    for dirpath, _, names in os.walk(PathManager.get_local_path(root)):
        for name in names:
            if name.endswith(ext):
                relative = os.path.relpath(os.path.join(dirpath, name), root)
                found[relative[: -len(ext)]] = relative
    return found


def load_coco_instances(dataset_name, json_file, image_root, how_to_prepare=None):
    """
    detectron2's ``load_coco_json(json_file, image_root, dataset_name)`` after checking that both
    exist; an annotation whose category is not among the JSON's categories raises ``ValueError``
    naming the file. Contiguous ids follow increasing category id, and loading records
    ``thing_classes`` and ``thing_dataset_id_to_contiguous_id`` in the metadata.
    """
    require_paths([json_file, image_root], dataset_name, how_to_prepare)
    try:
        return load_coco_json(json_file, image_root, dataset_name)
    except json.JSONDecodeError as e:
        raise ValueError(f"{json_file}: not valid JSON ({e})") from e
    except KeyError as e:
        # load_coco_json reports an annotation whose category is not in "categories" this way
        if "category_id" not in str(e):
            raise
        raise ValueError(f"{json_file}: {e.args[0]}") from e


def load_coco_panoptic_json(
    json_file,
    image_dir,
    gt_dir,
    meta,
    sem_seg_dir=None,
    image_ext=None,
    *,
    dataset_name=None,
    how_to_prepare=None,
):
    """
    Load a COCO panoptic dataset into detectron2's format.

    Args:
        json_file (str): the panoptic JSON ("images", "annotations" with "segments_info").
        image_dir (str): folder of the images named by the JSON's "images" entries.
        gt_dir (str): folder of the panoptic PNGs (segment id = R + 256 G + 256^2 B) named by the
            annotations' "file_name".
        meta (Mapping): with ``thing_dataset_id_to_contiguous_id`` (things) and
            ``stuff_dataset_id_to_contiguous_id`` (all categories), from
            :func:`metadata.build_metadata`.
        sem_seg_dir (str or None): folder of semantic PNGs (contiguous ids, 255 = void) with the
            panoptic PNGs' names; adds "sem_seg_file_name" to each dict.
        image_ext (str or None): for a JSON without an "images" entry for an annotation: the
            image of annotation ``X.png`` is ``X`` + image_ext in image_dir (detectron2's COCO
            panoptic convention).
        dataset_name (str or None): registered name, for error messages.
        how_to_prepare (str or None): hint for the missing-file error.

    Returns:
        list[dict]: one per annotation, with "file_name", "image_id", "height", "width" (when the
        image entry has them), "pan_seg_file_name", "segments_info" (each segment's
        "category_id" mapped to its contiguous id, plus "isthing") and "sem_seg_file_name".
    """
    if not isinstance(meta, Mapping):
        raise TypeError(f"meta must be a Mapping (dict), got {type(meta).__name__}")
    folders = [image_dir, gt_dir] + ([sem_seg_dir] if sem_seg_dir is not None else [])
    require_paths([json_file] + folders, dataset_name, how_to_prepare)
    json_info = read_json(json_file)
    if not isinstance(json_info, dict):
        raise ValueError(
            f"{json_file} holds a JSON {type(json_info).__name__}, not an object (not a COCO panoptic json)"
        )
    required = ("annotations",) if image_ext is not None else ("images", "annotations")
    for key in required:
        if key not in json_info:
            raise ValueError(f"{json_file} has no '{key}' list (not a COCO panoptic json)")
    for image in json_info.get("images", []):
        _require_keys(image, ("id", "file_name"), json_file, "an 'images' entry")

    thing_ids = meta["thing_dataset_id_to_contiguous_id"]
    all_ids = meta["stuff_dataset_id_to_contiguous_id"]
    images = {img["id"]: img for img in json_info.get("images", [])}

    dataset_dicts = []
    for ann in json_info["annotations"]:
        _require_keys(ann, ("image_id", "file_name", "segments_info"), json_file, "an annotation")
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
            _require_keys(segment, ("category_id",), json_file, f"a segment of {ann['file_name']}")
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
        where = f" (dataset '{dataset_name}')" if dataset_name else ""
        raise ValueError(f"{json_file} has no annotations{where}")
    # Checking every file would cost a stat per image on large datasets; the first record
    # catches a wrong folder.
    first = dataset_dicts[0]
    keys = ("file_name", "pan_seg_file_name", "sem_seg_file_name")
    require_paths([first[k] for k in keys if k in first], dataset_name, how_to_prepare)
    logger.info(f"Loaded {len(dataset_dicts)} images with panoptic annotations from {json_file}")
    return dataset_dicts


def _require_keys(entry, keys, json_file, what):
    """Raise ValueError naming ``json_file`` and the key when ``entry`` (``what``, e.g. "an
    annotation") is not a dict holding every one of ``keys``."""
    if not isinstance(entry, dict):
        raise ValueError(f"{json_file}: {what} is a {type(entry).__name__}, not an object: {entry!r:.200}")
    for key in keys:
        if key not in entry:
            raise ValueError(f"{json_file}: {what} has no '{key}': {entry!r:.200}")


# ------------------------------------------------------------------------------ registration


def register_semantic(
    name,
    metadata,
    image_root,
    sem_seg_root,
    *,
    ignore_label,
    image_ext="jpg",
    gt_ext="png",
    how_to_prepare=None,
):
    """
    Register a semantic segmentation dataset: ``image_root/x{image_ext}`` is labelled by
    ``sem_seg_root/x{gt_ext}``, a single-channel image of contiguous class ids (or
    ``ignore_label``), loaded with :func:`load_sem_seg_checked`.

    Args:
        name (str): the dataset name.
        metadata (dict): class metadata (``stuff_classes``, ``stuff_colors``, ...), set as given.
        image_root, sem_seg_root (str): the two folders.
        ignore_label (int): label value excluded from training and evaluation.
        image_ext, gt_ext (str): file name endings of images and labels.
        how_to_prepare (str or None): hint for the missing-file error.

    Metadata: ``metadata`` plus ``image_root``, ``sem_seg_root``, ``ignore_label`` and
    ``evaluator_type="sem_seg"``.
    """
    DatasetCatalog.register(
        name,
        lambda: load_sem_seg_checked(
            name, sem_seg_root, image_root, gt_ext, image_ext, how_to_prepare
        ),
    )
    MetadataCatalog.get(name).set(
        image_root=image_root,
        sem_seg_root=sem_seg_root,
        evaluator_type="sem_seg",
        ignore_label=ignore_label,
        **metadata,
    )


def register_instances(name, metadata, json_file, image_root, *, how_to_prepare=None):
    """
    Register a dataset in COCO instance-segmentation JSON format, loaded with
    :func:`load_coco_instances` (contiguous ids by increasing category id).

    Args:
        name (str): the dataset name.
        metadata (dict): class metadata known before loading (``thing_classes``, ...), possibly
            empty: loading adds ``thing_classes`` and ``thing_dataset_id_to_contiguous_id`` from
            the JSON's categories (and fails if they differ from what is given).
        json_file, image_root (str): the JSON and the folder of its images.
        how_to_prepare (str or None): hint for the missing-file error.

    Metadata: ``metadata`` plus ``json_file``, ``image_root`` and ``evaluator_type="coco"``.
    """
    DatasetCatalog.register(
        name, lambda: load_coco_instances(name, json_file, image_root, how_to_prepare)
    )
    MetadataCatalog.get(name).set(
        json_file=json_file, image_root=image_root, evaluator_type="coco", **metadata
    )


def register_panoptic(
    name,
    metadata,
    image_root,
    panoptic_root,
    panoptic_json,
    sem_seg_root=None,
    instances_json=None,
    *,
    evaluator_type="coco_panoptic_seg",
    image_ext=None,
    replace=False,
    how_to_prepare=None,
):
    """
    Register a COCO-format panoptic dataset, loaded with :func:`load_coco_panoptic_json`.

    Args:
        name (str): the dataset name.
        metadata (dict): class metadata with both id maps, from :func:`metadata.build_metadata`.
        image_root, panoptic_root, panoptic_json (str): images, panoptic PNGs and JSON.
        sem_seg_root (str or None): semantic PNGs in the contiguous ids of ``metadata``: adds
            ``sem_seg_file_name`` to the dicts, for semantic evaluation.
        instances_json (str or None): COCO instance JSON of the same images (metadata
            ``json_file``), for instance evaluation (mask AP).
        evaluator_type (str): e.g. "coco_panoptic_seg" or "ade20k_panoptic_seg".
        image_ext (str or None): see :func:`load_coco_panoptic_json`.
        replace (bool): replace a registration of the same name (e.g. detectron2's own) instead
            of failing.
        how_to_prepare (str or None): hint for the missing-file error.

    Metadata: ``metadata`` plus ``image_root``, ``panoptic_root``, ``panoptic_json``,
    ``sem_seg_root`` and ``json_file`` (the latter two when given), ``evaluator_type``,
    ``ignore_label=255`` and ``label_divisor=1000``.
    """
    if replace and name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(
        name,
        lambda: load_coco_panoptic_json(
            panoptic_json,
            image_root,
            panoptic_root,
            metadata,
            sem_seg_root,
            image_ext,
            dataset_name=name,
            how_to_prepare=how_to_prepare,
        ),
    )
    optional = {"sem_seg_root": sem_seg_root, "json_file": instances_json}
    MetadataCatalog.get(name).set(
        image_root=image_root,
        panoptic_root=panoptic_root,
        panoptic_json=panoptic_json,
        evaluator_type=evaluator_type,
        ignore_label=PANOPTIC_IGNORE_LABEL,
        label_divisor=PANOPTIC_LABEL_DIVISOR,
        **{key: value for key, value in optional.items() if value is not None},
        **metadata,
    )
