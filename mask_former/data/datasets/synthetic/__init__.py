"""The built-in synthetic scene dataset: class table, scene drawing, generator and registration.

Every image shows two or three "stuff" regions (sky, grass, water) split by random wavy
boundaries, with one to ``max_instances`` textured "thing" shapes (circle, square, triangle,
cross, ring) of jittered class colours on top; later shapes occlude earlier ones, and shapes
left with too small a visible part are dropped. Labels are exact (no anti-aliasing), so the
three annotation formats written agree pixel for pixel:

    <root>/synthetic/
        images/{train,val}/000001.png          RGB images
        panoptic_{train,val}/000001.png        COCO panoptic PNGs (segment id as RGB)
        panoptic_{train,val}.json              COCO panoptic JSON
        semantic_{train,val}/000001.png        uint8 contiguous class ids (things first)
        instances_{train,val}.json             COCO instance JSON (things, RLE masks)
        generation_complete.json               marker with the generation parameters

- :mod:`.categories`: the classes (``classes/synthetic.json``) and their numbering;
- :mod:`.scenes`: :func:`synthesize_scene` draws one image and its labels;
- :mod:`.generator`: :func:`generate_synthetic_dataset` writes the files
  (``python datasets/prepare_synthetic.py``);
- :mod:`.register`: :func:`register_synthetic_split` registers ``synthetic_panoptic_{split}``,
  ``synthetic_sem_seg_{split}`` and ``synthetic_instance_{split}``; importing ``mask_former``
  does so for train and val under ``$DETECTRON2_DATASETS`` (default ``datasets``), without
  touching disk.
"""
from .categories import NUM_CLASSES, SYNTHETIC_CATEGORIES, SYNTHETIC_METADATA
from .generator import MARKER_FILE, generate_synthetic_dataset, split_paths
from .register import register_all_synthetic, register_synthetic_split
from .scenes import SyntheticScene, synthesize_scene

__all__ = [
    "SYNTHETIC_CATEGORIES",
    "SYNTHETIC_METADATA",
    "NUM_CLASSES",
    "MARKER_FILE",
    "SyntheticScene",
    "synthesize_scene",
    "split_paths",
    "generate_synthetic_dataset",
    "register_synthetic_split",
    "register_all_synthetic",
]
