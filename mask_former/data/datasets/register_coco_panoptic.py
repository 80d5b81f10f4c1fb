"""COCO panoptic (133 categories) with the semantic PNGs its semantic evaluation needs:
``coco_2017_{train,val}_panoptic``.

detectron2 registers these two names too (``detectron2.data.datasets.builtin``), with dicts that
have no ``sem_seg_file_name`` and a stuff map limited to the 53 stuff categories. The model-zoo
configs use these names, so this module replaces detectron2's registration of them (the
"_separated" and "_stuffonly" variants are left as they are). Dicts carry ``pan_seg_file_name``,
``segments_info`` with contiguous ids over all 133 categories (things first: COCO ids already
order them so) and ``sem_seg_file_name`` under ``coco/panoptic_semseg_{train,val}2017``, made by
``datasets/prepare_coco_panoptic_sem_seg.py``.
"""
import os

from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

from .register_common import panoptic_metadata_over_all_classes, register_panoptic_with_sem_seg

__all__ = [
    "COCO_PANOPTIC_SPLITS",
    "get_coco_panoptic_metadata",
    "register_coco_panoptic_with_sem_seg",
    "register_all_coco_panoptic",
]

# name -> (image root, panoptic PNG root, panoptic JSON, semantic PNG root, instance JSON),
# relative to the datasets root.
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

_PREPARE_HINT = (
    "download COCO 2017 images and panoptic annotations and run "
    "`python datasets/prepare_coco_panoptic_sem_seg.py`"
)


def get_coco_panoptic_metadata():
    """
    Metadata in detectron2's "standard panoptic" convention: ``thing_classes`` and
    ``stuff_classes`` both list all 133 names in contiguous-id order, the thing map holds the 80
    things and the stuff map all 133 categories (so ``SemSegEvaluator`` can map every contiguous
    id back to a COCO id).
    """
    if [c["id"] for c in COCO_CATEGORIES] != sorted(c["id"] for c in COCO_CATEGORIES):
        raise RuntimeError("detectron2's COCO_CATEGORIES are expected in increasing id order")
    return panoptic_metadata_over_all_classes(COCO_CATEGORIES)


def register_coco_panoptic_with_sem_seg(
    name, metadata, image_root, panoptic_root, panoptic_json, sem_seg_root, instances_json
):
    """
    Register a COCO panoptic dataset whose dicts also carry ``sem_seg_file_name``. A name that
    is already registered (detectron2's own ``coco_2017_*_panoptic``) is replaced.

    Args:
        name (str): e.g. "coco_2017_train_panoptic".
        metadata (dict): from :func:`get_coco_panoptic_metadata`.
        image_root, panoptic_root, panoptic_json, sem_seg_root (str): see
            :func:`register_common.load_panoptic_json`.
        instances_json (str): COCO instance JSON of the same images (``json_file``, for mask AP).
    """
    register_panoptic_with_sem_seg(
        name,
        metadata,
        image_root,
        panoptic_root,
        panoptic_json,
        sem_seg_root,
        instances_json,
        evaluator_type="coco_panoptic_seg",
        how_to_prepare=_PREPARE_HINT,
    )


def register_all_coco_panoptic(root):
    """(Re-)register ``coco_2017_{train,val}_panoptic`` under ``root``."""
    metadata = get_coco_panoptic_metadata()
    for name, paths in COCO_PANOPTIC_SPLITS.items():
        image_root, panoptic_root, panoptic_json, sem_seg_root, instances_json = (
            os.path.join(root, p) for p in paths
        )
        register_coco_panoptic_with_sem_seg(
            name, metadata, image_root, panoptic_root, panoptic_json, sem_seg_root, instances_json
        )
