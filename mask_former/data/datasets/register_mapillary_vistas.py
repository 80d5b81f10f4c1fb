"""Mapillary Vistas v1.2 semantic segmentation with 65 classes:
``mapillary_vistas_sem_seg_{train,val}``.

The dataset's own ``labels/*.png`` are used as they are: values 0..64 are the 65 evaluated
classes below (in the order of the dataset's ``config.json``) and 65 is "unlabeled", hence
``ignore_label = 65``. No preparation is needed.
"""
from .register_common import register_sem_seg_splits

__all__ = [
    "MAPILLARY_VISTAS_65_CATEGORIES",
    "MAPILLARY_VISTAS_SEM_SEG_SPLITS",
    "MAPILLARY_VISTAS_IGNORE_LABEL",
    "get_mapillary_vistas_metadata",
    "register_all_mapillary_vistas",
]

MAPILLARY_VISTAS_IGNORE_LABEL = 65

# (readable name, dataset name, colour); the list index is the label value.
# fmt: off
MAPILLARY_VISTAS_65_CATEGORIES = [
    ("Bird", "animal--bird", [165, 42, 42]),
    ("Ground Animal", "animal--ground-animal", [0, 192, 0]),
    ("Curb", "construction--barrier--curb", [196, 196, 196]),
    ("Fence", "construction--barrier--fence", [190, 153, 153]),
    ("Guard Rail", "construction--barrier--guard-rail", [180, 165, 180]),
    ("Barrier", "construction--barrier--other-barrier", [90, 120, 150]),
    ("Wall", "construction--barrier--wall", [102, 102, 156]),
    ("Bike Lane", "construction--flat--bike-lane", [128, 64, 255]),
    ("Crosswalk - Plain", "construction--flat--crosswalk-plain", [140, 140, 200]),
    ("Curb Cut", "construction--flat--curb-cut", [170, 170, 170]),
    ("Parking", "construction--flat--parking", [250, 170, 160]),
    ("Pedestrian Area", "construction--flat--pedestrian-area", [96, 96, 96]),
    ("Rail Track", "construction--flat--rail-track", [230, 150, 140]),
    ("Road", "construction--flat--road", [128, 64, 128]),
    ("Service Lane", "construction--flat--service-lane", [110, 110, 110]),
    ("Sidewalk", "construction--flat--sidewalk", [244, 35, 232]),
    ("Bridge", "construction--structure--bridge", [150, 100, 100]),
    ("Building", "construction--structure--building", [70, 70, 70]),
    ("Tunnel", "construction--structure--tunnel", [150, 120, 90]),
    ("Person", "human--person", [220, 20, 60]),
    ("Bicyclist", "human--rider--bicyclist", [255, 0, 0]),
    ("Motorcyclist", "human--rider--motorcyclist", [255, 0, 100]),
    ("Other Rider", "human--rider--other-rider", [255, 0, 200]),
    ("Lane Marking - Crosswalk", "marking--crosswalk-zebra", [200, 128, 128]),
    ("Lane Marking - General", "marking--general", [255, 255, 255]),
    ("Mountain", "nature--mountain", [64, 170, 64]),
    ("Sand", "nature--sand", [230, 160, 50]),
    ("Sky", "nature--sky", [70, 130, 180]),
    ("Snow", "nature--snow", [190, 255, 255]),
    ("Terrain", "nature--terrain", [152, 251, 152]),
    ("Vegetation", "nature--vegetation", [107, 142, 35]),
    ("Water", "nature--water", [0, 170, 30]),
    ("Banner", "object--banner", [255, 255, 128]),
    ("Bench", "object--bench", [250, 0, 30]),
    ("Bike Rack", "object--bike-rack", [100, 140, 180]),
    ("Billboard", "object--billboard", [220, 220, 220]),
    ("Catch Basin", "object--catch-basin", [220, 128, 128]),
    ("CCTV Camera", "object--cctv-camera", [222, 40, 40]),
    ("Fire Hydrant", "object--fire-hydrant", [100, 170, 30]),
    ("Junction Box", "object--junction-box", [40, 40, 40]),
    ("Mailbox", "object--mailbox", [33, 33, 33]),
    ("Manhole", "object--manhole", [100, 128, 160]),
    ("Phone Booth", "object--phone-booth", [142, 0, 0]),
    ("Pothole", "object--pothole", [70, 100, 150]),
    ("Street Light", "object--street-light", [210, 170, 100]),
    ("Pole", "object--support--pole", [153, 153, 153]),
    ("Traffic Sign Frame", "object--support--traffic-sign-frame", [128, 128, 128]),
    ("Utility Pole", "object--support--utility-pole", [0, 0, 80]),
    ("Traffic Light", "object--traffic-light", [250, 170, 30]),
    ("Traffic Sign (Back)", "object--traffic-sign--back", [192, 192, 192]),
    ("Traffic Sign (Front)", "object--traffic-sign--front", [220, 220, 0]),
    ("Trash Can", "object--trash-can", [140, 140, 20]),
    ("Bicycle", "object--vehicle--bicycle", [119, 11, 32]),
    ("Boat", "object--vehicle--boat", [150, 0, 255]),
    ("Bus", "object--vehicle--bus", [0, 60, 100]),
    ("Car", "object--vehicle--car", [0, 0, 142]),
    ("Caravan", "object--vehicle--caravan", [0, 0, 90]),
    ("Motorcycle", "object--vehicle--motorcycle", [0, 0, 230]),
    ("On Rails", "object--vehicle--on-rails", [0, 80, 100]),
    ("Other Vehicle", "object--vehicle--other-vehicle", [128, 64, 64]),
    ("Trailer", "object--vehicle--trailer", [0, 0, 110]),
    ("Truck", "object--vehicle--truck", [0, 0, 70]),
    ("Wheeled Slow", "object--vehicle--wheeled-slow", [0, 0, 192]),
    ("Car Mount", "void--car-mount", [32, 32, 32]),
    ("Ego Vehicle", "void--ego-vehicle", [120, 10, 10]),
]
# fmt: on

# name -> (image root, label root), relative to the datasets root.
MAPILLARY_VISTAS_SEM_SEG_SPLITS = {
    f"mapillary_vistas_sem_seg_{split}": (
        f"mapillary_vistas/{dirname}/images",
        f"mapillary_vistas/{dirname}/labels",
    )
    for split, dirname in [("train", "training"), ("val", "validation")]
}


def get_mapillary_vistas_metadata():
    """``stuff_classes`` (65 readable names) and ``stuff_colors``."""
    return {
        "stuff_classes": [readable for readable, _, _ in MAPILLARY_VISTAS_65_CATEGORIES],
        "stuff_colors": [color for _, _, color in MAPILLARY_VISTAS_65_CATEGORIES],
    }


def register_all_mapillary_vistas(root):
    """Register ``mapillary_vistas_sem_seg_{train,val}`` under ``root``."""
    metadata = get_mapillary_vistas_metadata()
    register_sem_seg_splits(
        root,
        MAPILLARY_VISTAS_SEM_SEG_SPLITS,
        metadata,
        ignore_label=MAPILLARY_VISTAS_IGNORE_LABEL,
        gt_ext="png",
        image_ext="jpg",
        how_to_prepare="download Mapillary Vistas v1.2 (no conversion is needed)",
    )
