"""ADE20K-150 (SceneParsing, ``ADEChallengeData2016``): semantic and panoptic splits.

- ``ade20k_sem_seg_{train,val}`` are registered by detectron2 itself
  (``detectron2.data.datasets.builtin``); this module only adds their ``stuff_colors``.
- ``ade20k_panoptic_{train,val}``: the panoptic version made by
  ``datasets/prepare_ade20k_pan_seg.py`` from the SceneParsing semantic labels and the
  Places-Challenge instance annotations (100 "thing" classes). Category ids in the panoptic and
  instance JSONs are the 0-based SceneParsing ids (0 = wall ... 149 = flag), the convention of
  the panoptic JSONs MaskFormer was trained on, so files prepared for the original code load
  unchanged.
"""
import os

from detectron2.data import MetadataCatalog

from .register_common import panoptic_metadata_over_all_classes, register_panoptic_with_sem_seg

__all__ = [
    "ADE20K_150_CATEGORIES",
    "ADE20K_PANOPTIC_SPLITS",
    "get_ade20k_panoptic_metadata",
    "register_ade20k_panoptic",
    "register_all_ade20k",
]

# fmt: off
ADE20K_150_CATEGORIES = [
    {"id": 0, "isthing": 0, "color": [120, 120, 120], "name": "wall"},
    {"id": 1, "isthing": 0, "color": [180, 120, 120], "name": "building"},
    {"id": 2, "isthing": 0, "color": [6, 230, 230], "name": "sky"},
    {"id": 3, "isthing": 0, "color": [80, 50, 50], "name": "floor"},
    {"id": 4, "isthing": 0, "color": [4, 200, 3], "name": "tree"},
    {"id": 5, "isthing": 0, "color": [120, 120, 80], "name": "ceiling"},
    {"id": 6, "isthing": 0, "color": [140, 140, 140], "name": "road, route"},
    {"id": 7, "isthing": 1, "color": [204, 5, 255], "name": "bed"},
    {"id": 8, "isthing": 1, "color": [230, 230, 230], "name": "window "},
    {"id": 9, "isthing": 0, "color": [4, 250, 7], "name": "grass"},
    {"id": 10, "isthing": 1, "color": [224, 5, 255], "name": "cabinet"},
    {"id": 11, "isthing": 0, "color": [235, 255, 7], "name": "sidewalk, pavement"},
    {"id": 12, "isthing": 1, "color": [150, 5, 61], "name": "person"},
    {"id": 13, "isthing": 0, "color": [120, 120, 70], "name": "earth, ground"},
    {"id": 14, "isthing": 1, "color": [8, 255, 51], "name": "door"},
    {"id": 15, "isthing": 1, "color": [255, 6, 82], "name": "table"},
    {"id": 16, "isthing": 0, "color": [143, 255, 140], "name": "mountain, mount"},
    {"id": 17, "isthing": 0, "color": [204, 255, 4], "name": "plant"},
    {"id": 18, "isthing": 1, "color": [255, 51, 7], "name": "curtain"},
    {"id": 19, "isthing": 1, "color": [204, 70, 3], "name": "chair"},
    {"id": 20, "isthing": 1, "color": [0, 102, 200], "name": "car"},
    {"id": 21, "isthing": 0, "color": [61, 230, 250], "name": "water"},
    {"id": 22, "isthing": 1, "color": [255, 6, 51], "name": "painting, picture"},
    {"id": 23, "isthing": 1, "color": [11, 102, 255], "name": "sofa"},
    {"id": 24, "isthing": 1, "color": [255, 7, 71], "name": "shelf"},
    {"id": 25, "isthing": 0, "color": [255, 9, 224], "name": "house"},
    {"id": 26, "isthing": 0, "color": [9, 7, 230], "name": "sea"},
    {"id": 27, "isthing": 1, "color": [220, 220, 220], "name": "mirror"},
    {"id": 28, "isthing": 0, "color": [255, 9, 92], "name": "rug"},
    {"id": 29, "isthing": 0, "color": [112, 9, 255], "name": "field"},
    {"id": 30, "isthing": 1, "color": [8, 255, 214], "name": "armchair"},
    {"id": 31, "isthing": 1, "color": [7, 255, 224], "name": "seat"},
    {"id": 32, "isthing": 1, "color": [255, 184, 6], "name": "fence"},
    {"id": 33, "isthing": 1, "color": [10, 255, 71], "name": "desk"},
    {"id": 34, "isthing": 0, "color": [255, 41, 10], "name": "rock, stone"},
    {"id": 35, "isthing": 1, "color": [7, 255, 255], "name": "wardrobe, closet, press"},
    {"id": 36, "isthing": 1, "color": [224, 255, 8], "name": "lamp"},
    {"id": 37, "isthing": 1, "color": [102, 8, 255], "name": "tub"},
    {"id": 38, "isthing": 1, "color": [255, 61, 6], "name": "rail"},
    {"id": 39, "isthing": 1, "color": [255, 194, 7], "name": "cushion"},
    {"id": 40, "isthing": 0, "color": [255, 122, 8], "name": "base, pedestal, stand"},
    {"id": 41, "isthing": 1, "color": [0, 255, 20], "name": "box"},
    {"id": 42, "isthing": 1, "color": [255, 8, 41], "name": "column, pillar"},
    {"id": 43, "isthing": 1, "color": [255, 5, 153], "name": "signboard, sign"},
    {"id": 44, "isthing": 1, "color": [6, 51, 255], "name": "chest of drawers, chest, bureau, dresser"},
    {"id": 45, "isthing": 1, "color": [235, 12, 255], "name": "counter"},
    {"id": 46, "isthing": 0, "color": [160, 150, 20], "name": "sand"},
    {"id": 47, "isthing": 1, "color": [0, 163, 255], "name": "sink"},
    {"id": 48, "isthing": 0, "color": [140, 140, 140], "name": "skyscraper"},
    {"id": 49, "isthing": 1, "color": [250, 10, 15], "name": "fireplace"},
    {"id": 50, "isthing": 1, "color": [20, 255, 0], "name": "refrigerator, icebox"},
    {"id": 51, "isthing": 0, "color": [31, 255, 0], "name": "grandstand, covered stand"},
    {"id": 52, "isthing": 0, "color": [255, 31, 0], "name": "path"},
    {"id": 53, "isthing": 1, "color": [255, 224, 0], "name": "stairs"},
    {"id": 54, "isthing": 0, "color": [153, 255, 0], "name": "runway"},
    {"id": 55, "isthing": 1, "color": [0, 0, 255], "name": "case, display case, showcase, vitrine"},
    {"id": 56, "isthing": 1, "color": [255, 71, 0], "name": "pool table, billiard table, snooker table"},
    {"id": 57, "isthing": 1, "color": [0, 235, 255], "name": "pillow"},
    {"id": 58, "isthing": 1, "color": [0, 173, 255], "name": "screen door, screen"},
    {"id": 59, "isthing": 0, "color": [31, 0, 255], "name": "stairway, staircase"},
    {"id": 60, "isthing": 0, "color": [11, 200, 200], "name": "river"},
    {"id": 61, "isthing": 0, "color": [255, 82, 0], "name": "bridge, span"},
    {"id": 62, "isthing": 1, "color": [0, 255, 245], "name": "bookcase"},
    {"id": 63, "isthing": 0, "color": [0, 61, 255], "name": "blind, screen"},
    {"id": 64, "isthing": 1, "color": [0, 255, 112], "name": "coffee table"},
    {"id": 65, "isthing": 1, "color": [0, 255, 133], "name": "toilet, can, commode, crapper, pot, potty, stool, throne"},
    {"id": 66, "isthing": 1, "color": [255, 0, 0], "name": "flower"},
    {"id": 67, "isthing": 1, "color": [255, 163, 0], "name": "book"},
    {"id": 68, "isthing": 0, "color": [255, 102, 0], "name": "hill"},
    {"id": 69, "isthing": 1, "color": [194, 255, 0], "name": "bench"},
    {"id": 70, "isthing": 1, "color": [0, 143, 255], "name": "countertop"},
    {"id": 71, "isthing": 1, "color": [51, 255, 0], "name": "stove"},
    {"id": 72, "isthing": 1, "color": [0, 82, 255], "name": "palm, palm tree"},
    {"id": 73, "isthing": 1, "color": [0, 255, 41], "name": "kitchen island"},
    {"id": 74, "isthing": 1, "color": [0, 255, 173], "name": "computer"},
    {"id": 75, "isthing": 1, "color": [10, 0, 255], "name": "swivel chair"},
    {"id": 76, "isthing": 1, "color": [173, 255, 0], "name": "boat"},
    {"id": 77, "isthing": 0, "color": [0, 255, 153], "name": "bar"},
    {"id": 78, "isthing": 1, "color": [255, 92, 0], "name": "arcade machine"},
    {"id": 79, "isthing": 0, "color": [255, 0, 255], "name": "hovel, hut, hutch, shack, shanty"},
    {"id": 80, "isthing": 1, "color": [255, 0, 245], "name": "bus"},
    {"id": 81, "isthing": 1, "color": [255, 0, 102], "name": "towel"},
    {"id": 82, "isthing": 1, "color": [255, 173, 0], "name": "light"},
    {"id": 83, "isthing": 1, "color": [255, 0, 20], "name": "truck"},
    {"id": 84, "isthing": 0, "color": [255, 184, 184], "name": "tower"},
    {"id": 85, "isthing": 1, "color": [0, 31, 255], "name": "chandelier"},
    {"id": 86, "isthing": 1, "color": [0, 255, 61], "name": "awning, sunshade, sunblind"},
    {"id": 87, "isthing": 1, "color": [0, 71, 255], "name": "street lamp"},
    {"id": 88, "isthing": 1, "color": [255, 0, 204], "name": "booth"},
    {"id": 89, "isthing": 1, "color": [0, 255, 194], "name": "tv"},
    {"id": 90, "isthing": 1, "color": [0, 255, 82], "name": "plane"},
    {"id": 91, "isthing": 0, "color": [0, 10, 255], "name": "dirt track"},
    {"id": 92, "isthing": 1, "color": [0, 112, 255], "name": "clothes"},
    {"id": 93, "isthing": 1, "color": [51, 0, 255], "name": "pole"},
    {"id": 94, "isthing": 0, "color": [0, 194, 255], "name": "land, ground, soil"},
    {"id": 95, "isthing": 1, "color": [0, 122, 255], "name": "bannister, banister, balustrade, balusters, handrail"},
    {"id": 96, "isthing": 0, "color": [0, 255, 163], "name": "escalator, moving staircase, moving stairway"},
    {"id": 97, "isthing": 1, "color": [255, 153, 0], "name": "ottoman, pouf, pouffe, puff, hassock"},
    {"id": 98, "isthing": 1, "color": [0, 255, 10], "name": "bottle"},
    {"id": 99, "isthing": 0, "color": [255, 112, 0], "name": "buffet, counter, sideboard"},
    {"id": 100, "isthing": 0, "color": [143, 255, 0], "name": "poster, posting, placard, notice, bill, card"},
    {"id": 101, "isthing": 0, "color": [82, 0, 255], "name": "stage"},
    {"id": 102, "isthing": 1, "color": [163, 255, 0], "name": "van"},
    {"id": 103, "isthing": 1, "color": [255, 235, 0], "name": "ship"},
    {"id": 104, "isthing": 1, "color": [8, 184, 170], "name": "fountain"},
    {"id": 105, "isthing": 0, "color": [133, 0, 255], "name": "conveyer belt, conveyor belt, conveyer, conveyor, transporter"},
    {"id": 106, "isthing": 0, "color": [0, 255, 92], "name": "canopy"},
    {"id": 107, "isthing": 1, "color": [184, 0, 255], "name": "washer, automatic washer, washing machine"},
    {"id": 108, "isthing": 1, "color": [255, 0, 31], "name": "plaything, toy"},
    {"id": 109, "isthing": 0, "color": [0, 184, 255], "name": "pool"},
    {"id": 110, "isthing": 1, "color": [0, 214, 255], "name": "stool"},
    {"id": 111, "isthing": 1, "color": [255, 0, 112], "name": "barrel, cask"},
    {"id": 112, "isthing": 1, "color": [92, 255, 0], "name": "basket, handbasket"},
    {"id": 113, "isthing": 0, "color": [0, 224, 255], "name": "falls"},
    {"id": 114, "isthing": 0, "color": [112, 224, 255], "name": "tent"},
    {"id": 115, "isthing": 1, "color": [70, 184, 160], "name": "bag"},
    {"id": 116, "isthing": 1, "color": [163, 0, 255], "name": "minibike, motorbike"},
    {"id": 117, "isthing": 0, "color": [153, 0, 255], "name": "cradle"},
    {"id": 118, "isthing": 1, "color": [71, 255, 0], "name": "oven"},
    {"id": 119, "isthing": 1, "color": [255, 0, 163], "name": "ball"},
    {"id": 120, "isthing": 1, "color": [255, 204, 0], "name": "food, solid food"},
    {"id": 121, "isthing": 1, "color": [255, 0, 143], "name": "step, stair"},
    {"id": 122, "isthing": 0, "color": [0, 255, 235], "name": "tank, storage tank"},
    {"id": 123, "isthing": 1, "color": [133, 255, 0], "name": "trade name"},
    {"id": 124, "isthing": 1, "color": [255, 0, 235], "name": "microwave"},
    {"id": 125, "isthing": 1, "color": [245, 0, 255], "name": "pot"},
    {"id": 126, "isthing": 1, "color": [255, 0, 122], "name": "animal"},
    {"id": 127, "isthing": 1, "color": [255, 245, 0], "name": "bicycle"},
    {"id": 128, "isthing": 0, "color": [10, 190, 212], "name": "lake"},
    {"id": 129, "isthing": 1, "color": [214, 255, 0], "name": "dishwasher"},
    {"id": 130, "isthing": 1, "color": [0, 204, 255], "name": "screen"},
    {"id": 131, "isthing": 0, "color": [20, 0, 255], "name": "blanket, cover"},
    {"id": 132, "isthing": 1, "color": [255, 255, 0], "name": "sculpture"},
    {"id": 133, "isthing": 1, "color": [0, 153, 255], "name": "hood, exhaust hood"},
    {"id": 134, "isthing": 1, "color": [0, 41, 255], "name": "sconce"},
    {"id": 135, "isthing": 1, "color": [0, 255, 204], "name": "vase"},
    {"id": 136, "isthing": 1, "color": [41, 0, 255], "name": "traffic light"},
    {"id": 137, "isthing": 1, "color": [41, 255, 0], "name": "tray"},
    {"id": 138, "isthing": 1, "color": [173, 0, 255], "name": "trash can"},
    {"id": 139, "isthing": 1, "color": [0, 245, 255], "name": "fan"},
    {"id": 140, "isthing": 0, "color": [71, 0, 255], "name": "pier"},
    {"id": 141, "isthing": 0, "color": [122, 0, 255], "name": "crt screen"},
    {"id": 142, "isthing": 1, "color": [0, 255, 184], "name": "plate"},
    {"id": 143, "isthing": 1, "color": [0, 92, 255], "name": "monitor"},
    {"id": 144, "isthing": 1, "color": [184, 255, 0], "name": "bulletin board"},
    {"id": 145, "isthing": 0, "color": [0, 133, 255], "name": "shower"},
    {"id": 146, "isthing": 1, "color": [255, 214, 0], "name": "radiator"},
    {"id": 147, "isthing": 1, "color": [25, 194, 194], "name": "glass, drinking glass"},
    {"id": 148, "isthing": 1, "color": [102, 255, 0], "name": "clock"},
    {"id": 149, "isthing": 1, "color": [92, 0, 255], "name": "flag"},
]
# fmt: on

_ADE = "ADEChallengeData2016"
# name -> (image root, panoptic PNG root, panoptic JSON, semantic PNG root, instance JSON),
# relative to the datasets root.
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

_PREPARE_HINT = (
    "run `python datasets/prepare_ade20k_sem_seg.py` and then "
    "`python datasets/prepare_ade20k_pan_seg.py`"
)


def get_ade20k_panoptic_metadata():
    """
    Metadata of ADE20K panoptic, in detectron2's "standard panoptic" convention: contiguous ids
    run over all 150 categories, ``thing_classes`` and ``stuff_classes`` both list all 150 names
    (detectron2's visualizer indexes either by the contiguous id), the thing map holds the 100
    things and the stuff map every category (what ``SemSegEvaluator`` needs).
    """
    return panoptic_metadata_over_all_classes(ADE20K_150_CATEGORIES)


def register_ade20k_panoptic(
    name, metadata, image_root, panoptic_root, panoptic_json, sem_seg_root, instances_json
):
    """
    Register an ADE20K-style panoptic dataset under ``name``.

    Args:
        name (str): e.g. "ade20k_panoptic_train".
        metadata (dict): from :func:`get_ade20k_panoptic_metadata`.
        image_root, panoptic_root, panoptic_json, sem_seg_root (str): see
            :func:`register_common.load_panoptic_json`.
        instances_json (str): COCO instance JSON of the same images (``json_file`` for mask AP).
    """
    register_panoptic_with_sem_seg(
        name,
        metadata,
        image_root,
        panoptic_root,
        panoptic_json,
        sem_seg_root,
        instances_json,
        evaluator_type="ade20k_panoptic_seg",
        how_to_prepare=_PREPARE_HINT,
    )


def register_all_ade20k(root):
    """Add colours to detectron2's ``ade20k_sem_seg_{train,val}`` and register
    ``ade20k_panoptic_{train,val}`` under ``root``."""
    names = [c["name"] for c in ADE20K_150_CATEGORIES]
    colors = [c["color"] for c in ADE20K_150_CATEGORIES]
    for name in ["ade20k_sem_seg_train", "ade20k_sem_seg_val"]:
        meta = MetadataCatalog.get(name)
        if list(meta.stuff_classes) != names:
            raise RuntimeError(
                f"{name}: detectron2's stuff_classes differ from the 150 ADE20K classes the "
                "colours are listed for"
            )
        if not hasattr(meta, "stuff_colors"):
            meta.set(stuff_colors=colors[:])

    metadata = get_ade20k_panoptic_metadata()
    for name, paths in ADE20K_PANOPTIC_SPLITS.items():
        image_root, panoptic_root, panoptic_json, sem_seg_root, instances_json = (
            os.path.join(root, p) for p in paths
        )
        register_ade20k_panoptic(
            name, metadata, image_root, panoptic_root, panoptic_json, sem_seg_root, instances_json
        )
