"""COCO-Stuff-10K v1.0 with 171 classes: ``coco_2017_{train,test}_stuff_10k_sem_seg``.

The 171 classes are the 80 COCO things (COCO ids 1..90 with gaps) followed by the 91 COCO-Stuff
stuff classes (ids 92..182), in id order; training id ``i`` is the ``i``-th of them. Labels are
PNGs made by ``datasets/prepare_coco_stuff_10k_sem_seg.py`` (void = 255).
"""
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

from .register_common import fixed_palette, register_sem_seg_splits

__all__ = [
    "COCO_STUFF_171_CATEGORIES",
    "COCO_STUFF_10K_SEM_SEG_SPLITS",
    "get_coco_stuff_10k_metadata",
    "register_all_coco_stuff_10k",
]

# fmt: off
_COCO_STUFF_STUFF_CLASSES = [
    (92, "banner"), (93, "blanket"), (94, "branch"), (95, "bridge"), (96, "building-other"),
    (97, "bush"), (98, "cabinet"), (99, "cage"), (100, "cardboard"), (101, "carpet"),
    (102, "ceiling-other"), (103, "ceiling-tile"), (104, "cloth"), (105, "clothes"),
    (106, "clouds"), (107, "counter"), (108, "cupboard"), (109, "curtain"), (110, "desk-stuff"),
    (111, "dirt"), (112, "door-stuff"), (113, "fence"), (114, "floor-marble"),
    (115, "floor-other"), (116, "floor-stone"), (117, "floor-tile"), (118, "floor-wood"),
    (119, "flower"), (120, "fog"), (121, "food-other"), (122, "fruit"),
    (123, "furniture-other"), (124, "grass"), (125, "gravel"), (126, "ground-other"),
    (127, "hill"), (128, "house"), (129, "leaves"), (130, "light"), (131, "mat"),
    (132, "metal"), (133, "mirror-stuff"), (134, "moss"), (135, "mountain"), (136, "mud"),
    (137, "napkin"), (138, "net"), (139, "paper"), (140, "pavement"), (141, "pillow"),
    (142, "plant-other"), (143, "plastic"), (144, "platform"), (145, "playingfield"),
    (146, "railing"), (147, "railroad"), (148, "river"), (149, "road"), (150, "rock"),
    (151, "roof"), (152, "rug"), (153, "salad"), (154, "sand"), (155, "sea"), (156, "shelf"),
    (157, "sky-other"), (158, "skyscraper"), (159, "snow"), (160, "solid-other"),
    (161, "stairs"), (162, "stone"), (163, "straw"), (164, "structural-other"),
    (165, "table"), (166, "tent"), (167, "textile-other"), (168, "towel"), (169, "tree"),
    (170, "vegetable"), (171, "wall-brick"), (172, "wall-concrete"), (173, "wall-other"),
    (174, "wall-panel"), (175, "wall-stone"), (176, "wall-tile"), (177, "wall-wood"),
    (178, "water-other"), (179, "waterdrops"), (180, "window-blind"), (181, "window-other"),
    (182, "wood"),
]
# fmt: on


def _build_categories():
    # COCO-Stuff publishes no palette: reuse detectron2's COCO panoptic colour where a category
    # has the same id there (all things, some stuff), fixed random colours elsewhere.
    panoptic_colors = {c["id"]: c["color"] for c in COCO_CATEGORIES}
    fallback = fixed_palette(len(_COCO_STUFF_STUFF_CLASSES), seed=171)
    things = [
        {"id": c["id"], "name": c["name"], "isthing": 1, "color": c["color"]}
        for c in COCO_CATEGORIES
        if c["isthing"]
    ]
    stuff = [
        {"id": i, "name": name, "isthing": 0, "color": panoptic_colors.get(i, fallback[k])}
        for k, (i, name) in enumerate(_COCO_STUFF_STUFF_CLASSES)
    ]
    return things + stuff


COCO_STUFF_171_CATEGORIES = _build_categories()

_ROOT = "coco/coco_stuff_10k"
# name -> (image root, label root), relative to the datasets root.
COCO_STUFF_10K_SEM_SEG_SPLITS = {
    f"coco_2017_{split}_stuff_10k_sem_seg": (
        f"{_ROOT}/images_detectron2/{split}",
        f"{_ROOT}/annotations_detectron2/{split}",
    )
    for split in ["train", "test"]
}


def get_coco_stuff_10k_metadata():
    """``stuff_classes``/``stuff_colors`` (171) and ``stuff_dataset_id_to_contiguous_id``
    (COCO id -> training id)."""
    return {
        "stuff_classes": [c["name"] for c in COCO_STUFF_171_CATEGORIES],
        "stuff_colors": [c["color"] for c in COCO_STUFF_171_CATEGORIES],
        "stuff_dataset_id_to_contiguous_id": {
            c["id"]: i for i, c in enumerate(COCO_STUFF_171_CATEGORIES)
        },
    }


def register_all_coco_stuff_10k(root):
    """Register ``coco_2017_{train,test}_stuff_10k_sem_seg`` under ``root``."""
    metadata = get_coco_stuff_10k_metadata()
    register_sem_seg_splits(
        root,
        COCO_STUFF_10K_SEM_SEG_SPLITS,
        metadata,
        ignore_label=255,
        gt_ext="png",
        image_ext="jpg",
        how_to_prepare="run `python datasets/prepare_coco_stuff_10k_sem_seg.py`",
    )
