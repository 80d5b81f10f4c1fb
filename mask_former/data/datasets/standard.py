"""Registration of the standard datasets the model-zoo configs name.

:func:`register_all_standard` registers, under the datasets root (``$DETECTRON2_DATASETS``,
default ``datasets``):

=====================================================  ========  =============================
names                                                   classes   evaluator_type
=====================================================  ========  =============================
ade20k_sem_seg_{train,val} (detectron2; + colours)      150       sem_seg
ade20k_panoptic_{train,val}                             150       ade20k_panoptic_seg
ade20k_full_sem_seg_{train,val}                         847       sem_seg
coco_2017_{train,test}_stuff_10k_sem_seg                171       sem_seg
mapillary_vistas_sem_seg_{train,val}                    65        sem_seg
coco_2017_{train,val}_panoptic (replaces detectron2's)  133       coco_panoptic_seg
cityscapes_fine_sem_seg_* (detectron2; + colours)       19        cityscapes_sem_seg
=====================================================  ========  =============================

The classes come from the tables in ``classes/*.json`` (COCO panoptic: detectron2's
``COCO_CATEGORIES``), and every standard dataset is numbered in dataset order (contiguous id i is
the table's i-th class, which is how the converters in ``datasets/`` write the label maps).
Registration reads no dataset file: loading does, raising ``FileNotFoundError`` that names the
missing path and the preparation command. ``datasets/README.md`` gives the layouts.
"""
import functools
import os
from typing import Dict, NamedTuple, Tuple

import detectron2.data.datasets  # noqa: F401  (detectron2's builtin registrations come first)
from detectron2.data import MetadataCatalog
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

from .class_tables import load_class_table
from .metadata import build_metadata
from .registration import register_panoptic, register_semantic

__all__ = [
    "STANDARD_DATASET_NAMES",
    "SemanticDataset",
    "SEMANTIC_DATASETS",
    "DETECTRON2_SEMANTIC_DATASETS",
    "ADE20K_PANOPTIC_SPLITS",
    "COCO_PANOPTIC_SPLITS",
    "PANOPTIC_DATASETS",
    "get_ade20k_panoptic_metadata",
    "get_coco_panoptic_metadata",
    "register_ade20k_panoptic",
    "register_coco_panoptic_with_sem_seg",
    "register_all_standard",
]

_LAYOUT = "see datasets/README.md for the layout expected under $DETECTRON2_DATASETS"


def _how_to_prepare(what):
    return f"{what} ({_LAYOUT})"


# ---------------------------------------------------------------- semantic datasets


class SemanticDataset(NamedTuple):
    """A standard semantic segmentation dataset registered here."""

    table: str  # its class table, classes/<table>.json; the table's ignore_label is the void value
    numbering: str  # how its classes get contiguous ids (see metadata.build_metadata)
    label_ext: str  # ending of its label files (the images are .jpg)
    how_to_prepare: str  # hint of the missing-file error
    splits: Dict[str, Tuple[str, str]]  # name -> (image dir, label dir) under the datasets root


SEMANTIC_DATASETS = [
    # 16-bit TIFF labels: 847 classes do not fit in 8 bits
    SemanticDataset(
        table="ade20k_full_847",
        numbering="dataset_order",
        label_ext="tif",
        how_to_prepare="run `python datasets/prepare_ade20k_full_sem_seg.py`",
        splits={
            f"ade20k_full_sem_seg_{split}": (
                f"ADE20K_2021_17_01/images_detectron2/{dirname}",
                f"ADE20K_2021_17_01/annotations_detectron2/{dirname}",
            )
            for split, dirname in [("train", "training"), ("val", "validation")]
        },
    ),
    SemanticDataset(
        table="coco_stuff_171",
        numbering="dataset_order",
        label_ext="png",
        how_to_prepare="run `python datasets/prepare_coco_stuff_10k_sem_seg.py`",
        splits={
            f"coco_2017_{split}_stuff_10k_sem_seg": (
                f"coco/coco_stuff_10k/images_detectron2/{split}",
                f"coco/coco_stuff_10k/annotations_detectron2/{split}",
            )
            for split in ["train", "test"]
        },
    ),
    # the dataset's own labels/*.png
    SemanticDataset(
        table="mapillary_vistas_65",
        numbering="dataset_order",
        label_ext="png",
        how_to_prepare="download Mapillary Vistas v1.2; it needs no conversion",
        splits={
            f"mapillary_vistas_sem_seg_{split}": (
                f"mapillary_vistas/{dirname}/images",
                f"mapillary_vistas/{dirname}/labels",
            )
            for split, dirname in [("train", "training"), ("val", "validation")]
        },
    ),
]

# Semantic datasets detectron2 registers itself, to which only colours are added:
# (class table, numbering, names).
DETECTRON2_SEMANTIC_DATASETS = [
    ("ade20k_150", "dataset_order", ["ade20k_sem_seg_train", "ade20k_sem_seg_val"]),
    (
        "cityscapes_19",
        "dataset_order",
        [f"cityscapes_fine_sem_seg_{s}" for s in ["train", "val", "test"]],
    ),
]


def _add_colors(dataset_names, metadata):
    """Add ``stuff_colors`` to detectron2's registration of ``dataset_names``, after checking
    that detectron2's ``stuff_classes`` are the classes the colours are listed for."""
    for dataset_name in dataset_names:
        meta = MetadataCatalog.get(dataset_name)
        if list(meta.stuff_classes) != metadata["stuff_classes"]:
            raise RuntimeError(
                f"{dataset_name}: detectron2's stuff_classes {meta.stuff_classes} differ from "
                f"the classes the colours are listed for {metadata['stuff_classes']}"
            )
        if not hasattr(meta, "stuff_colors"):
            meta.set(stuff_colors=[list(color) for color in metadata["stuff_colors"]])


# ---------------------------------------------------------------- panoptic datasets


def get_ade20k_panoptic_metadata():
    """
    Metadata of ADE20K-150 panoptic, numbered in dataset order: contiguous id = SceneParsing id
    (0 wall ... 149 flag), the category id of the panoptic JSONs. ``thing_classes`` and
    ``stuff_classes`` both list all 150 names, the thing map holds the 100 things and the stuff
    map every category (what ``SemSegEvaluator`` needs).
    """
    return build_metadata(load_class_table("ade20k_150").categories, numbering="dataset_order")


def get_coco_panoptic_metadata():
    """
    Metadata of COCO panoptic (detectron2's 133 ``COCO_CATEGORIES``), numbered in dataset order,
    i.e. by increasing COCO id, which puts the 80 things first. ``thing_classes`` and
    ``stuff_classes`` both list all 133 names, the thing map holds the things and the stuff map
    all categories (so ``SemSegEvaluator`` can map every contiguous id back to a COCO id).
    """
    if [c["id"] for c in COCO_CATEGORIES] != sorted(c["id"] for c in COCO_CATEGORIES):
        raise RuntimeError("detectron2's COCO_CATEGORIES are expected in increasing id order")
    return build_metadata(COCO_CATEGORIES, numbering="dataset_order")


# The registration of one split of each standard panoptic dataset: the one panoptic registration,
# ``registration.register_panoptic(name, metadata, image_root, panoptic_root, panoptic_json,
# sem_seg_root, instances_json)``, with the dataset's evaluator, how to prepare it, .jpg images
# for annotations the JSON lists no image for, and replacing a registration of the same name
# (detectron2's own coco_2017_*_panoptic).

#: ADE20K-150 panoptic, made by ``datasets/prepare_ade20k_pan_seg.py``.
register_ade20k_panoptic = functools.partial(
    register_panoptic,
    evaluator_type="ade20k_panoptic_seg",
    image_ext=".jpg",
    replace=True,
    how_to_prepare=_how_to_prepare(
        "run `python datasets/prepare_ade20k_sem_seg.py` and then "
        "`python datasets/prepare_ade20k_pan_seg.py`"
    ),
)

#: COCO panoptic with the semantic PNGs of ``datasets/prepare_coco_panoptic_sem_seg.py``.
register_coco_panoptic_with_sem_seg = functools.partial(
    register_panoptic,
    evaluator_type="coco_panoptic_seg",
    image_ext=".jpg",
    replace=True,
    how_to_prepare=_how_to_prepare(
        "download COCO 2017 images and panoptic annotations and run "
        "`python datasets/prepare_coco_panoptic_sem_seg.py`"
    ),
)

# name -> (image root, panoptic PNG root, panoptic JSON, semantic PNG root, instance JSON),
# relative to the datasets root.
_ADE = "ADEChallengeData2016"
ADE20K_PANOPTIC_SPLITS = {
    f"ade20k_panoptic_{split}": (
        f"{_ADE}/images/{dirname}",
        f"{_ADE}/ade20k_panoptic_{split}",
        f"{_ADE}/ade20k_panoptic_{split}.json",
        f"{_ADE}/annotations_detectron2/{dirname}",
        f"{_ADE}/ade20k_instance_{split}.json",
    )
    for split, dirname in [("train", "training"), ("val", "validation")]
}
COCO_PANOPTIC_SPLITS = {
    f"coco_2017_{split}_panoptic": (
        f"coco/{split}2017",
        f"coco/panoptic_{split}2017",
        f"coco/annotations/panoptic_{split}2017.json",
        f"coco/panoptic_semseg_{split}2017",
        f"coco/annotations/instances_{split}2017.json",
    )
    for split in ["train", "val"]
}

# (metadata, registration of one split, splits)
PANOPTIC_DATASETS = [
    (get_ade20k_panoptic_metadata, register_ade20k_panoptic, ADE20K_PANOPTIC_SPLITS),
    (get_coco_panoptic_metadata, register_coco_panoptic_with_sem_seg, COCO_PANOPTIC_SPLITS),
]


# Every name registered or completed here, for tools and tests that iterate over them.
STANDARD_DATASET_NAMES = (
    [name for _, _, names in DETECTRON2_SEMANTIC_DATASETS for name in names]
    + [name for dataset in SEMANTIC_DATASETS for name in dataset.splits]
    + [name for _, _, splits in PANOPTIC_DATASETS for name in splits]
)


# ---------------------------------------------------------------- all


def register_all_standard(root):
    """Register (or complete detectron2's registration of) every standard dataset under ``root``.
    Importing ``mask_former`` already does so with ``$DETECTRON2_DATASETS``."""
    for table_name, numbering, dataset_names in DETECTRON2_SEMANTIC_DATASETS:
        metadata = build_metadata(load_class_table(table_name).categories, numbering=numbering)
        _add_colors(dataset_names, metadata)

    for dataset in SEMANTIC_DATASETS:
        table = load_class_table(dataset.table)
        metadata = build_metadata(table.categories, numbering=dataset.numbering)
        for name, (image_dir, gt_dir) in dataset.splits.items():
            register_semantic(
                name,
                metadata,
                os.path.join(root, image_dir),
                os.path.join(root, gt_dir),
                ignore_label=table.ignore_label,
                image_ext="jpg",
                gt_ext=dataset.label_ext,
                how_to_prepare=_how_to_prepare(dataset.how_to_prepare),
            )

    for get_metadata, register, splits in PANOPTIC_DATASETS:
        metadata = get_metadata()
        for name, paths in splits.items():
            register(name, metadata, *(os.path.join(root, p) for p in paths))
