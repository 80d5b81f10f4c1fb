"""Cityscapes semantic segmentation (19 training classes): ``cityscapes_fine_sem_seg_*``.

detectron2 registers these names itself (``detectron2.data.datasets.builtin``, labels from
``*_gtFine_labelTrainIds.png``, ignore 255, ``evaluator_type="cityscapes_sem_seg"``); this module
only adds the official Cityscapes colours, which detectron2's metadata lacks.
"""
from detectron2.data import MetadataCatalog

__all__ = ["CITYSCAPES_19_CATEGORIES", "CITYSCAPES_SEM_SEG_NAMES", "register_all_cityscapes"]

# (name, colour) in training-id order, colours from cityscapesScripts' labels.py.
# fmt: off
CITYSCAPES_19_CATEGORIES = [
    ("road", [128, 64, 128]), ("sidewalk", [244, 35, 232]), ("building", [70, 70, 70]),
    ("wall", [102, 102, 156]), ("fence", [190, 153, 153]), ("pole", [153, 153, 153]),
    ("traffic light", [250, 170, 30]), ("traffic sign", [220, 220, 0]),
    ("vegetation", [107, 142, 35]), ("terrain", [152, 251, 152]), ("sky", [70, 130, 180]),
    ("person", [220, 20, 60]), ("rider", [255, 0, 0]), ("car", [0, 0, 142]),
    ("truck", [0, 0, 70]), ("bus", [0, 60, 100]), ("train", [0, 80, 100]),
    ("motorcycle", [0, 0, 230]), ("bicycle", [119, 11, 32]),
]
# fmt: on

CITYSCAPES_SEM_SEG_NAMES = [f"cityscapes_fine_sem_seg_{s}" for s in ["train", "val", "test"]]


def register_all_cityscapes():
    """Add ``stuff_colors`` to detectron2's Cityscapes semantic datasets, after checking that
    detectron2's class order is the one the colours are listed in."""
    names = [name for name, _ in CITYSCAPES_19_CATEGORIES]
    colors = [color for _, color in CITYSCAPES_19_CATEGORIES]
    for dataset_name in CITYSCAPES_SEM_SEG_NAMES:
        meta = MetadataCatalog.get(dataset_name)
        if list(meta.stuff_classes) != names:
            raise RuntimeError(
                f"{dataset_name}: detectron2's stuff_classes {meta.stuff_classes} differ from "
                f"the expected Cityscapes order {names}"
            )
        if not hasattr(meta, "stuff_colors"):
            meta.set(stuff_colors=colors[:])
