"""Helpers shared by the registrations of the standard datasets.

- :func:`datasets_root`: where the standard datasets live (``$DETECTRON2_DATASETS``).
- :func:`require_paths`: ``FileNotFoundError`` that names the missing path and the way to
  prepare it.
- :func:`load_sem_seg_checked`: detectron2's ``load_sem_seg`` behind that check.
- :func:`load_panoptic_json`: COCO-format panoptic annotations -> dataset dicts with
  ``pan_seg_file_name``, ``sem_seg_file_name`` and ``segments_info`` in contiguous ids.
- :func:`fixed_palette`: reproducible colours for datasets that publish no palette.

Nothing here touches the disk at import or registration time; only the loaders do.
"""
import logging
import os

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_sem_seg
from detectron2.utils.file_io import PathManager

__all__ = [
    "datasets_root",
    "require_paths",
    "load_sem_seg_checked",
    "load_panoptic_json",
    "fixed_palette",
]

logger = logging.getLogger(__name__)

README = "datasets/README.md"


def datasets_root():
    """The folder holding the standard datasets: ``$DETECTRON2_DATASETS``, default ``datasets``
    (relative to the working directory), as in detectron2's own builtin registration."""
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def require_paths(dataset_name, paths, how_to_prepare=None):
    """
    Raise ``FileNotFoundError`` for the first path in ``paths`` that does not exist.

    Args:
        dataset_name (str): registered name, quoted in the message.
        paths (list[str]): files or directories the loader needs.
        how_to_prepare (str or None): e.g. "run `python datasets/prepare_ade20k_sem_seg.py`".
    """
    for path in paths:
        if not PathManager.exists(path):
            hint = f" To create it, {how_to_prepare}." if how_to_prepare else ""
            raise FileNotFoundError(
                f"Dataset '{dataset_name}' needs '{path}', which does not exist.{hint} "
                f"See {README} for the expected layout; standard datasets are looked up under "
                f"$DETECTRON2_DATASETS (now '{datasets_root()}')."
            )


def load_sem_seg_checked(
    dataset_name, gt_root, image_root, gt_ext="png", image_ext="jpg", how_to_prepare=None
):
    """detectron2's ``load_sem_seg(gt_root, image_root, gt_ext, image_ext)`` after checking that
    both folders exist. Returns dicts with ``file_name`` and ``sem_seg_file_name``."""
    require_paths(dataset_name, [image_root, gt_root], how_to_prepare)
    return load_sem_seg(gt_root, image_root, gt_ext=gt_ext, image_ext=image_ext)


def register_sem_seg_splits(root, splits, metadata, **kwargs):
    """:func:`register_sem_seg_checked` for each ``name -> (image dir, label dir)`` of ``splits``,
    the directories relative to ``root``; ``kwargs`` as for that function."""
    for name, (image_dir, gt_dir) in splits.items():
        register_sem_seg_checked(
            name, os.path.join(root, image_dir), os.path.join(root, gt_dir), metadata, **kwargs
        )


def panoptic_metadata_over_all_classes(categories):
    """Metadata of a panoptic dataset whose contiguous ids run over all ``categories`` (dicts with
    id, name, color, isthing) in the given order: ``thing_classes`` and ``stuff_classes`` both list
    every name (detectron2's visualizer indexes either by contiguous id), the thing map holds the
    things and the stuff map every category (what ``SemSegEvaluator`` needs)."""
    names = [c["name"] for c in categories]
    colors = [c["color"] for c in categories]
    return {
        "thing_classes": names,
        "thing_colors": colors,
        "stuff_classes": names,
        "stuff_colors": colors,
        "thing_dataset_id_to_contiguous_id": {
            c["id"]: i for i, c in enumerate(categories) if c["isthing"]
        },
        "stuff_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(categories)},
    }


def register_sem_seg_checked(
    name, image_root, gt_root, metadata, *, ignore_label, gt_ext="png", image_ext="jpg",
    how_to_prepare=None,
):
    """Register a semantic segmentation dataset of images + label maps of the same names,
    loaded with :func:`load_sem_seg_checked`; ``metadata`` holds the class names and colours."""
    DatasetCatalog.register(
        name,
        lambda: load_sem_seg_checked(name, gt_root, image_root, gt_ext, image_ext, how_to_prepare),
    )
    MetadataCatalog.get(name).set(
        image_root=image_root,
        sem_seg_root=gt_root,
        evaluator_type="sem_seg",
        ignore_label=ignore_label,
        **metadata,
    )


def load_panoptic_json(
    dataset_name,
    json_file,
    image_root,
    panoptic_root,
    sem_seg_root,
    metadata,
    image_ext=".jpg",
    how_to_prepare=None,
):
    """
    Load a panoptic dataset in COCO panoptic format.

    Args:
        dataset_name (str): registered name, used in error messages.
        json_file (str): COCO panoptic JSON (``images``, ``annotations`` with ``segments_info``,
            ``categories``).
        image_root (str): folder of the images named by the JSON's ``images`` entries (or, without
            them, ``X`` + ``image_ext`` for the annotation ``X.png``).
        panoptic_root (str): folder of the panoptic PNGs (segment id = R + 256 G + 256^2 B).
        sem_seg_root (str): folder of the semantic PNGs (contiguous ids, 255 = void), one per
            panoptic PNG under the same file name.
        metadata (dict): needs ``stuff_dataset_id_to_contiguous_id`` (every category, things
            included) and ``thing_dataset_id_to_contiguous_id`` (things only).
        image_ext (str): extension of the images when the JSON has no ``images`` list.
        how_to_prepare (str or None): hint for the missing-file error.

    Returns:
        list[dict]: one per image, with ``file_name``, ``image_id``, ``pan_seg_file_name``,
        ``sem_seg_file_name`` and ``segments_info`` (each segment's ``category_id`` is contiguous
        in [0, #categories) and ``isthing`` is set).
    """
    from .custom import load_coco_panoptic_json

    require_paths(
        dataset_name, [json_file, image_root, panoptic_root, sem_seg_root], how_to_prepare
    )
    dataset_dicts = load_coco_panoptic_json(
        json_file, image_root, panoptic_root, metadata, sem_seg_dir=sem_seg_root, image_ext=image_ext
    )
    if not dataset_dicts:
        raise ValueError(f"{json_file} has no annotations (dataset '{dataset_name}')")
    # Checking every file would stat 100k+ paths; the first record catches a wrong layout.
    first = dataset_dicts[0]
    require_paths(
        dataset_name,
        [first["file_name"], first["pan_seg_file_name"], first["sem_seg_file_name"]],
        how_to_prepare,
    )
    logger.info(f"Loaded {len(dataset_dicts)} images with panoptic annotations from {json_file}")
    return dataset_dicts


def fixed_palette(num_colors, seed):
    """
    ``num_colors`` RGB colours (lists of 3 ints in [0, 255]) drawn from a fixed seed, for the
    datasets that publish no palette. Only visualization uses them; numpy's legacy
    ``RandomState`` keeps them the same across numpy versions.
    """
    rng = np.random.RandomState(seed)
    return rng.randint(0, 256, size=(num_colors, 3)).tolist()


def register_panoptic_with_sem_seg(
    name,
    metadata,
    image_root,
    panoptic_root,
    panoptic_json,
    sem_seg_root,
    instances_json,
    *,
    evaluator_type,
    how_to_prepare=None,
):
    """
    Register a COCO-format panoptic dataset whose dicts also carry ``sem_seg_file_name`` and
    whose metadata names the instance JSON, so one model is scored on PQ, mIoU and mask AP.
    A registration of the same name (e.g. detectron2's own) is replaced.

    Args:
        name (str): the dataset name.
        metadata (dict): class names, colours and the thing/stuff id maps.
        image_root, panoptic_root, panoptic_json, sem_seg_root (str): see
            :func:`load_panoptic_json`.
        instances_json (str): COCO instance JSON of the same images (``json_file``, for mask AP).
        evaluator_type (str): e.g. "coco_panoptic_seg".
        how_to_prepare (str or None): hint for the missing-file error.
    """
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(
        name,
        lambda: load_panoptic_json(
            name,
            panoptic_json,
            image_root,
            panoptic_root,
            sem_seg_root,
            metadata,
            image_ext=".jpg",
            how_to_prepare=how_to_prepare,
        ),
    )
    MetadataCatalog.get(name).set(
        image_root=image_root,
        panoptic_root=panoptic_root,
        panoptic_json=panoptic_json,
        sem_seg_root=sem_seg_root,
        json_file=instances_json,
        evaluator_type=evaluator_type,
        ignore_label=255,
        label_divisor=1000,
        **metadata,
    )
