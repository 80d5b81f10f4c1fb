"""Registration of the standard datasets the model-zoo configs name.

Importing this module registers, under ``$DETECTRON2_DATASETS`` (default ``datasets``):

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

Registration reads no file: the metadata comes from constants and ``DatasetCatalog.get`` does
the loading, raising ``FileNotFoundError`` (naming the path and the preparation command) when
the data is missing. ``datasets/README.md`` gives the layouts and converters.
"""
import detectron2.data.datasets  # noqa: F401  (detectron2's builtin registrations come first)

from .register_ade20k import register_all_ade20k
from .register_ade20k_full import register_all_ade20k_full
from .register_cityscapes import register_all_cityscapes
from .register_coco_panoptic import register_all_coco_panoptic
from .register_coco_stuff_10k import register_all_coco_stuff_10k
from .register_common import datasets_root
from .register_mapillary_vistas import register_all_mapillary_vistas

__all__ = ["STANDARD_DATASET_NAMES", "register_all_standard"]

# Every name registered or completed here, for tools and tests that iterate over them.
STANDARD_DATASET_NAMES = [
    "ade20k_sem_seg_train",
    "ade20k_sem_seg_val",
    "ade20k_panoptic_train",
    "ade20k_panoptic_val",
    "ade20k_full_sem_seg_train",
    "ade20k_full_sem_seg_val",
    "coco_2017_train_stuff_10k_sem_seg",
    "coco_2017_test_stuff_10k_sem_seg",
    "mapillary_vistas_sem_seg_train",
    "mapillary_vistas_sem_seg_val",
    "coco_2017_train_panoptic",
    "coco_2017_val_panoptic",
    "cityscapes_fine_sem_seg_train",
    "cityscapes_fine_sem_seg_val",
    "cityscapes_fine_sem_seg_test",
]


def register_all_standard(root):
    """Register (or complete detectron2's registration of) every standard dataset under ``root``.
    Call once per process; importing this module already does so with ``$DETECTRON2_DATASETS``."""
    register_all_ade20k(root)
    register_all_ade20k_full(root)
    register_all_coco_stuff_10k(root)
    register_all_mapillary_vistas(root)
    register_all_coco_panoptic(root)
    register_all_cityscapes()


register_all_standard(datasets_root())
