"""The built-in synthetic scene dataset: generator and registration.

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

Registered at import (``<root>`` = ``$DETECTRON2_DATASETS``, default ``datasets``), without
touching disk: ``synthetic_panoptic_{split}``, ``synthetic_sem_seg_{split}`` and
``synthetic_instance_{split}`` for split in train, val. Generate the files with
``python datasets/prepare_synthetic.py``.
"""

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import List

import numpy as np
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from .custom import load_coco_panoptic_json, load_semantic_folder, panoptic_metadata_from_categories

__all__ = [
    "SYNTHETIC_CATEGORIES",
    "NUM_CLASSES",
    "SyntheticScene",
    "synthesize_scene",
    "generate_synthetic_dataset",
    "register_synthetic_split",
    "register_all_synthetic",
]

# Things first (contiguous ids 0..4), then stuff (5..7). "color" is both the class-typical
# rendering colour and the visualization colour.
SYNTHETIC_CATEGORIES = [
    {"id": 1, "name": "circle", "isthing": 1, "color": [220, 40, 40]},
    {"id": 2, "name": "square", "isthing": 1, "color": [235, 205, 35]},
    {"id": 3, "name": "triangle", "isthing": 1, "color": [130, 50, 200]},
    {"id": 4, "name": "cross", "isthing": 1, "color": [35, 35, 35]},
    {"id": 5, "name": "ring", "isthing": 1, "color": [240, 240, 240]},
    {"id": 101, "name": "sky", "isthing": 0, "color": [120, 180, 235]},
    {"id": 102, "name": "grass", "isthing": 0, "color": [70, 150, 60]},
    {"id": 103, "name": "water", "isthing": 0, "color": [30, 70, 140]},
]
NUM_CLASSES = len(SYNTHETIC_CATEGORIES)

_PANOPTIC_META = panoptic_metadata_from_categories(SYNTHETIC_CATEGORIES)
_THINGS = [c for c in SYNTHETIC_CATEGORIES if c["isthing"]]
_STUFF = [c for c in SYNTHETIC_CATEGORIES if not c["isthing"]]

# bump when the generated content changes, so that old copies get regenerated
_FORMAT_VERSION = 1
MARKER_FILE = "generation_complete.json"
_SPLIT_CODES = {"train": 0, "val": 1}
_HINT = "run `python datasets/prepare_synthetic.py` to generate it (see datasets/README.md)"

# Geometry, in pixels of a 128 x 128 image (scaled linearly with the image size).
_REFERENCE_SIZE = 128
_OBJECT_DIAMETER_RANGE = (12.0, 45.0)
_MIN_VISIBLE_AREA = 30.0  # scaled with the image area
_MIN_VISIBLE_FRACTION = 0.25  # of the shape's own area; less visible shapes are dropped
_MIN_STUFF_BAND_FRACTION = 0.2  # of the image area, before things are drawn
_MIN_STUFF_VISIBLE_FRACTION = 0.03  # of the image area, for >= 2 stuff classes per image
_TOUCH_PROBABILITY = 0.4  # chance that a shape is placed against an earlier one


@dataclass
class SyntheticScene:
    """
    One generated image and its labels.

    Attributes:
        image (np.ndarray): H x W x 3 uint8 RGB.
        segment_ids (np.ndarray): H x W int32 panoptic segment ids (every pixel labelled).
        segments (list[dict]): per segment "id", "category_id" (dataset id), "isthing" and
            "mask" (H x W bool, the visible pixels); stuff first, then things bottom to top.
    """

    image: np.ndarray
    segment_ids: np.ndarray
    segments: List[dict]


def _pixel_grid(size):
    """x, y coordinates of pixel centers, each H x W float64."""
    coords = np.arange(size, dtype=np.float64) + 0.5
    return np.meshgrid(coords, coords)  # xs vary along columns, ys along rows


def _shape_mask(name, grid, cx, cy, radius, angle, inner_ratio):
    """H x W bool mask of a shape of circumradius ``radius`` centered at (cx, cy)."""
    xs, ys = grid
    dx, dy = xs - cx, ys - cy
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    if name == "circle":
        return dx * dx + dy * dy <= radius * radius
    if name == "ring":
        dist2 = dx * dx + dy * dy
        return (dist2 <= radius * radius) & (dist2 > (inner_ratio * radius) ** 2)
    if name == "square":
        half = radius / np.sqrt(2.0)
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    if name == "triangle":
        # equilateral: inside all three edges at distance radius / 2 (the inradius)
        mask = np.ones(xs.shape, dtype=bool)
        for k in range(3):
            phi = angle + k * 2.0 * np.pi / 3.0
            mask &= dx * np.cos(phi) + dy * np.sin(phi) <= radius / 2.0
        return mask
    if name == "cross":
        half_width = 0.3 * radius
        half_length = np.sqrt(radius * radius - half_width * half_width)
        bar_u = (np.abs(u) <= half_length) & (np.abs(v) <= half_width)
        bar_v = (np.abs(v) <= half_length) & (np.abs(u) <= half_width)
        return bar_u | bar_v
    raise ValueError(f"Unknown synthetic shape '{name}'")


def _jittered_color(rng, rgb):
    """Class-typical colour with per-channel and brightness jitter, float64 (3,)."""
    color = np.asarray(rgb, dtype=np.float64) + rng.normal(0.0, 10.0, 3)
    return color * rng.uniform(0.85, 1.15)


def _stripes(rng, grid, period, amplitude):
    """H x W sinusoidal stripes in a random direction."""
    xs, ys = grid
    theta = rng.uniform(0.0, np.pi)
    phase = rng.uniform(0.0, 2.0 * np.pi)
    return amplitude * np.sin(
        2.0 * np.pi * (xs * np.cos(theta) + ys * np.sin(theta)) / period + phase
    )


def _stuff_texture(rng, name, grid, scale):
    """H x W x 3 float64 image of a stuff class filling the whole frame."""
    xs, ys = grid
    size = xs.shape[0]
    color = _jittered_color(rng, next(c["color"] for c in _STUFF if c["name"] == name))
    if name == "sky":
        theta = rng.uniform(0.0, 2.0 * np.pi)
        luminance = 25.0 * (xs * np.cos(theta) + ys * np.sin(theta)) / size
        luminance = luminance + rng.normal(0.0, 4.0, xs.shape)
    elif name == "grass":
        luminance = _stripes(rng, grid, max(2.0, rng.uniform(3.0, 6.0) * scale), 10.0)
        luminance = luminance + rng.normal(0.0, 16.0, xs.shape)
    elif name == "water":
        luminance = _stripes(rng, grid, max(2.0, rng.uniform(6.0, 12.0) * scale), 20.0)
        luminance = luminance + rng.normal(0.0, 5.0, xs.shape)
    else:
        raise ValueError(f"Unknown synthetic stuff class '{name}'")
    return color + luminance[..., None] + rng.normal(0.0, 3.0, xs.shape + (3,))


def _thing_texture(rng, rgb, grid, cx, cy, radius):
    """H x W x 3 float64 image of a thing's surface: jittered colour, shading and noise."""
    xs, ys = grid
    theta = rng.uniform(0.0, 2.0 * np.pi)
    shading = 20.0 * ((xs - cx) * np.cos(theta) + (ys - cy) * np.sin(theta)) / max(radius, 1.0)
    luminance = np.clip(shading, -20.0, 20.0) + rng.normal(0.0, 8.0, xs.shape)
    return _jittered_color(rng, rgb) + luminance[..., None] + rng.normal(0.0, 4.0, xs.shape + (3,))


def _stuff_layout(rng, grid, num_regions):
    """H x W int region index in [0, num_regions): bands split by wavy boundaries."""
    xs, ys = grid
    size = xs.shape[0]
    theta = rng.uniform(0.0, np.pi)
    along = (xs - size / 2) * np.cos(theta) + (ys - size / 2) * np.sin(theta)
    across = -(xs - size / 2) * np.sin(theta) + (ys - size / 2) * np.cos(theta)
    amplitude = rng.uniform(0.0, 0.08) * size
    wavelength = rng.uniform(0.3, 1.0) * size
    field = along + amplitude * np.sin(
        2.0 * np.pi * across / wavelength + rng.uniform(0, 2 * np.pi)
    )
    free = 1.0 - num_regions * _MIN_STUFF_BAND_FRACTION
    fractions = _MIN_STUFF_BAND_FRACTION + free * rng.dirichlet(np.full(num_regions, 2.0))
    cuts = np.quantile(field, np.cumsum(fractions)[:-1])
    return np.searchsorted(cuts, field)


def _sample_things(rng, grid, size, max_instances):
    """Shape parameters and full masks of 1..max_instances things, bottom to top."""
    scale = size / _REFERENCE_SIZE
    things = []
    for _ in range(int(rng.integers(1, max_instances + 1))):
        category = _THINGS[int(rng.integers(len(_THINGS)))]
        radius = rng.uniform(*_OBJECT_DIAMETER_RANGE) * scale / 2.0
        if things and rng.uniform() < _TOUCH_PROBABILITY:
            anchor = things[int(rng.integers(len(things)))]
            direction = rng.uniform(0.0, 2.0 * np.pi)
            distance = (anchor["radius"] + radius) * rng.uniform(0.55, 1.0)
            cx = anchor["cx"] + distance * np.cos(direction)
            cy = anchor["cy"] + distance * np.sin(direction)
        else:
            cx, cy = rng.uniform(radius, size - radius, 2)
        cx, cy = float(np.clip(cx, radius, size - radius)), float(
            np.clip(cy, radius, size - radius)
        )
        angle, inner_ratio = rng.uniform(0.0, 2.0 * np.pi), rng.uniform(0.45, 0.6)
        mask = _shape_mask(category["name"], grid, cx, cy, radius, angle, inner_ratio)
        things.append(dict(category=category, cx=cx, cy=cy, radius=radius, mask=mask))
    return things


def synthesize_scene(rng, image_size=128, max_instances=6):
    """
    Draw one scene.

    Args:
        rng (np.random.Generator): the only source of randomness.
        image_size (int): height and width in pixels.
        max_instances (int): things drawn per image before occluded ones are dropped (>= 1).

    Returns:
        SyntheticScene: with >= 2 stuff segments of visible area >= 3% of the image and
        >= 1 thing, each visible thing of area >= 30 px (at 128 x 128) and >= 25% of its shape.
    """
    if image_size < 16 or max_instances < 1:
        raise ValueError(
            f"Need image_size >= 16 and max_instances >= 1, got {image_size}, {max_instances}"
        )
    grid = _pixel_grid(image_size)
    scale = image_size / _REFERENCE_SIZE
    min_area = max(4.0, _MIN_VISIBLE_AREA * scale * scale)
    min_stuff_area = _MIN_STUFF_VISIBLE_FRACTION * image_size * image_size
    while True:
        num_regions = int(rng.integers(2, len(_STUFF) + 1))
        region_stuff = [_STUFF[i] for i in rng.permutation(len(_STUFF))[:num_regions]]
        regions = _stuff_layout(rng, grid, num_regions)
        things = _sample_things(rng, grid, image_size, max_instances)

        # top to bottom: dropping a shape only uncovers shapes below it
        covered = np.zeros(regions.shape, dtype=bool)
        kept = []
        for thing in reversed(things):
            visible = thing["mask"] & ~covered
            area = int(visible.sum())
            if area >= min_area and area >= _MIN_VISIBLE_FRACTION * thing["mask"].sum():
                covered |= thing["mask"]
                kept.append(dict(thing, visible=visible))
        kept.reverse()
        stuff_visible = [(regions == i) & ~covered for i in range(num_regions)]
        if kept and sum(int(m.sum()) >= min_stuff_area for m in stuff_visible) >= 2:
            break

    image = np.zeros(regions.shape + (3,), dtype=np.float64)
    segment_ids = np.zeros(regions.shape, dtype=np.int32)
    segments = []
    stuff_order = sorted(range(num_regions), key=lambda i: region_stuff[i]["id"])
    for i in stuff_order:
        region = regions == i
        image[region] = _stuff_texture(rng, region_stuff[i]["name"], grid, scale)[region]
        if stuff_visible[i].any():
            segments.append(dict(category=region_stuff[i], mask=stuff_visible[i]))
    for thing in kept:
        texture = _thing_texture(
            rng, thing["category"]["color"], grid, thing["cx"], thing["cy"], thing["radius"]
        )
        image[thing["mask"]] = texture[thing["mask"]]
        segments.append(dict(category=thing["category"], mask=thing["visible"]))

    scene_segments = []
    for segment_id, segment in enumerate(segments, start=1):
        segment_ids[segment["mask"]] = segment_id
        category = segment["category"]
        scene_segments.append(
            dict(
                id=segment_id,
                category_id=category["id"],
                isthing=bool(category["isthing"]),
                mask=segment["mask"],
            )
        )
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return SyntheticScene(image=image, segment_ids=segment_ids, segments=scene_segments)


# ------------------------------------------------------------------------------ writing


def _mask_bbox(mask):
    """[x, y, w, h] (ints) of the pixels of a non-empty H x W bool mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def _split_paths(dataset_dir, split):
    return {
        "image_root": os.path.join(dataset_dir, "images", split),
        "panoptic_root": os.path.join(dataset_dir, f"panoptic_{split}"),
        "panoptic_json": os.path.join(dataset_dir, f"panoptic_{split}.json"),
        "sem_seg_root": os.path.join(dataset_dir, f"semantic_{split}"),
        "instances_json": os.path.join(dataset_dir, f"instances_{split}.json"),
    }


def _write_split(dataset_dir, split, num_images, image_size, seed, max_instances, progress):
    # imported here so that registering (at import) needs neither
    from panopticapi.utils import id2rgb
    from pycocotools import mask as mask_util

    paths = _split_paths(dataset_dir, split)
    for key in ("image_root", "panoptic_root", "sem_seg_root"):
        os.makedirs(paths[key], exist_ok=True)
    contiguous = _PANOPTIC_META["stuff_dataset_id_to_contiguous_id"]
    images, panoptic_anns, instance_anns = [], [], []

    indices = range(num_images)
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc=f"synthetic {split}", unit="img")
    for index in indices:
        # one stream per image: an image does not depend on the number of images in any split
        rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
        scene = synthesize_scene(rng, image_size, max_instances)
        image_id = index + 1
        file_name = f"{image_id:06d}.png"
        semantic = np.zeros(scene.segment_ids.shape, dtype=np.uint8)
        segments_info = []
        for segment in scene.segments:
            semantic[segment["mask"]] = contiguous[segment["category_id"]]
            area, bbox = int(segment["mask"].sum()), _mask_bbox(segment["mask"])
            segments_info.append(
                dict(
                    id=segment["id"],
                    category_id=segment["category_id"],
                    area=area,
                    bbox=bbox,
                    iscrowd=0,
                )
            )
            if segment["isthing"]:
                rle = mask_util.encode(np.asfortranarray(segment["mask"].astype(np.uint8)))
                instance_anns.append(
                    dict(
                        id=len(instance_anns) + 1,
                        image_id=image_id,
                        category_id=segment["category_id"],
                        segmentation={"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                        area=area,
                        bbox=bbox,
                        iscrowd=0,
                    )
                )
        Image.fromarray(scene.image).save(os.path.join(paths["image_root"], file_name))
        Image.fromarray(id2rgb(scene.segment_ids)).save(
            os.path.join(paths["panoptic_root"], file_name)
        )
        Image.fromarray(semantic).save(os.path.join(paths["sem_seg_root"], file_name))
        images.append(dict(id=image_id, file_name=file_name, height=image_size, width=image_size))
        panoptic_anns.append(
            dict(image_id=image_id, file_name=file_name, segments_info=segments_info)
        )

    info = {
        "description": f"MaskFormer synthetic scenes, {split} split",
        "version": str(_FORMAT_VERSION),
    }
    categories = [
        dict(c, supercategory="thing" if c["isthing"] else "stuff") for c in SYNTHETIC_CATEGORIES
    ]
    panoptic = dict(
        info=info, licenses=[], images=images, annotations=panoptic_anns, categories=categories
    )
    instances = dict(
        info=info,
        licenses=[],
        images=images,
        annotations=instance_anns,
        categories=[c for c in categories if c["isthing"]],
    )
    with open(paths["panoptic_json"], "w") as f:
        json.dump(panoptic, f)
    with open(paths["instances_json"], "w") as f:
        json.dump(instances, f)


def _read_marker(dataset_dir):
    try:
        with open(os.path.join(dataset_dir, MARKER_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def generate_synthetic_dataset(
    root=None, num_train=400, num_val=50, image_size=128, seed=0, max_instances=6, progress=False
):
    """
    Write the synthetic dataset under ``<root>/synthetic`` (see the module docstring).

    Deterministic for given parameters, and idempotent: returns at once when the dataset was
    already generated with the same parameters, and replaces a copy generated with other
    parameters. Files are written to a temporary folder next to it and moved into place when
    complete, so readers never see a partial dataset. In distributed jobs, call it from one
    process and synchronize (``detectron2.utils.comm.synchronize``) before loading.

    Args:
        root (str or None): datasets root; None means ``$DETECTRON2_DATASETS`` or "datasets".
        num_train, num_val (int): images per split.
        image_size (int): height and width of the square images.
        seed (int): the random seed.
        max_instances (int): things drawn per image before dropping hidden ones.
        progress (bool): show a tqdm progress bar.

    Returns:
        str: the dataset folder ``<root>/synthetic``.
    """
    if root is None:
        root = os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))
    for key, value, minimum in (
        ("num_train", num_train, 0),
        ("num_val", num_val, 0),
        ("seed", seed, 0),
        ("image_size", image_size, 16),
        ("max_instances", max_instances, 1),
    ):
        if not isinstance(value, (int, np.integer)) or value < minimum:
            raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r}")
    params = dict(
        format_version=_FORMAT_VERSION,
        num_train=int(num_train),
        num_val=int(num_val),
        image_size=int(image_size),
        seed=int(seed),
        max_instances=int(max_instances),
    )
    dataset_dir = os.path.join(root, "synthetic")
    if _read_marker(dataset_dir) == params:
        return dataset_dir

    os.makedirs(root, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=".synthetic-", dir=root)
    try:
        for split, num_images in (("train", params["num_train"]), ("val", params["num_val"])):
            _write_split(tmp_dir, split, num_images, image_size, seed, max_instances, progress)
        with open(os.path.join(tmp_dir, MARKER_FILE), "w") as f:
            json.dump(params, f, indent=2)
        if _read_marker(dataset_dir) == params:  # another process finished first
            return dataset_dir
        if os.path.isdir(dataset_dir):
            shutil.rmtree(dataset_dir)
        os.rename(tmp_dir, dataset_dir)
    finally:
        if os.path.isdir(tmp_dir):
            shutil.rmtree(tmp_dir)
    return dataset_dir


# ------------------------------------------------------------------------------ registration


def _require_generated(*paths):
    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(f"Synthetic dataset file {path} not found; {_HINT}")


def _load_panoptic(paths):
    _require_generated(
        paths["panoptic_json"], paths["image_root"], paths["panoptic_root"], paths["sem_seg_root"]
    )
    return load_coco_panoptic_json(
        paths["panoptic_json"],
        paths["image_root"],
        paths["panoptic_root"],
        _PANOPTIC_META,
        paths["sem_seg_root"],
    )


def _load_sem_seg(paths):
    _require_generated(paths["image_root"], paths["sem_seg_root"])
    return load_semantic_folder(
        paths["image_root"], paths["sem_seg_root"], image_ext=".png", gt_ext=".png"
    )


def _load_instances(paths, name):
    _require_generated(paths["instances_json"], paths["image_root"])
    return load_coco_json(paths["instances_json"], paths["image_root"], name)


def register_synthetic_split(dataset_dir, split, prefix="synthetic"):
    """
    Register ``{prefix}_panoptic_{split}``, ``{prefix}_sem_seg_{split}`` and
    ``{prefix}_instance_{split}`` for the files of ``split`` under ``dataset_dir``
    (``<root>/synthetic``). Reads nothing from disk.
    """
    paths = _split_paths(dataset_dir, split)
    stuff_meta = dict(
        stuff_classes=_PANOPTIC_META["stuff_classes"],
        stuff_colors=_PANOPTIC_META["stuff_colors"],
        ignore_label=255,
    )
    thing_meta = dict(
        thing_classes=_PANOPTIC_META["thing_classes"],
        thing_colors=_PANOPTIC_META["thing_colors"],
        thing_dataset_id_to_contiguous_id=_PANOPTIC_META["thing_dataset_id_to_contiguous_id"],
    )

    name = f"{prefix}_panoptic_{split}"
    DatasetCatalog.register(name, lambda: _load_panoptic(paths))
    MetadataCatalog.get(name).set(
        panoptic_root=paths["panoptic_root"],
        panoptic_json=paths["panoptic_json"],
        image_root=paths["image_root"],
        sem_seg_root=paths["sem_seg_root"],
        json_file=paths["instances_json"],
        label_divisor=1000,
        evaluator_type="coco_panoptic_seg",
        stuff_dataset_id_to_contiguous_id=_PANOPTIC_META["stuff_dataset_id_to_contiguous_id"],
        **stuff_meta,
        **thing_meta,
    )

    name = f"{prefix}_sem_seg_{split}"
    DatasetCatalog.register(name, lambda: _load_sem_seg(paths))
    MetadataCatalog.get(name).set(
        image_root=paths["image_root"],
        sem_seg_root=paths["sem_seg_root"],
        evaluator_type="sem_seg",
        **stuff_meta,
    )

    name = f"{prefix}_instance_{split}"
    DatasetCatalog.register(name, lambda name=name: _load_instances(paths, name))
    MetadataCatalog.get(name).set(
        json_file=paths["instances_json"],
        image_root=paths["image_root"],
        evaluator_type="coco",
        **thing_meta,
    )


def register_all_synthetic(root):
    """Register the train and val splits of ``<root>/synthetic`` under their standard names."""
    dataset_dir = os.path.join(root, "synthetic")
    for split in _SPLIT_CODES:
        register_synthetic_split(dataset_dir, split)


register_all_synthetic(os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")))
