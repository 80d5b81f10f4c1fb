"""Drawing one scene of the built-in synthetic dataset (numpy only, no files).

A scene shows two or three "stuff" regions (sky, grass, water) split by random wavy boundaries,
with one to ``max_instances`` textured "thing" shapes (circle, square, triangle, cross, ring) of
jittered class colours on top; later shapes occlude earlier ones, and shapes left with too small
a visible part are dropped. Labels are exact (no anti-aliasing). Everything random comes from the
``np.random.Generator`` passed in, so a seed fixes the scene.
"""
from dataclasses import dataclass
from typing import List

import numpy as np

from .categories import SYNTHETIC_CATEGORIES

__all__ = ["SyntheticScene", "synthesize_scene"]

# The class table gives the shapes and regions drawn, with their class-typical colours.
_THINGS = [c for c in SYNTHETIC_CATEGORIES if c["isthing"]]
_STUFF = [c for c in SYNTHETIC_CATEGORIES if not c["isthing"]]

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
