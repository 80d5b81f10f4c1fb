"""Class metadata of a dataset from its categories: one builder, one palette.

A model predicts contiguous class ids 0..K-1; a dataset names its categories with its own ids.
The *numbering* says which category gets which contiguous id, and every registration passes it
explicitly to :func:`build_metadata`:

- ``"dataset_order"``: contiguous id i is the i-th category as the dataset lists them (the
  standard datasets, whose label maps are already written that way, and custom semantic data).
  When the categories say which are things, ``thing_classes``/``thing_colors`` list *all*
  categories too, so that detectron2's visualizer can index them by contiguous id (detectron2's
  "standard panoptic" convention; things need not come first).
- ``"things_first"``: the things by increasing id, then the stuff by increasing id (custom
  panoptic data and the built-in synthetic dataset). Things get 0..T-1, the numbering
  detectron2's ``load_coco_json`` gives the same things in an instance JSON, so one model is
  scored on PQ, mIoU and mask AP; ``thing_classes``/``thing_colors`` list the things only.
"""
import numbers

from detectron2.utils.colormap import colormap

__all__ = ["NUMBERINGS", "palette", "check_categories", "build_metadata"]

NUMBERINGS = ("dataset_order", "things_first")


def palette(num_colors):
    """
    ``num_colors`` RGB colours (lists of 3 ints in [0, 255]) for classes that come without one:
    detectron2's fixed palette, repeated when there are more classes than colours.
    """
    colors = colormap(rgb=True, maximum=255).astype(int).tolist()
    return [colors[i % len(colors)] for i in range(num_colors)]


def _color_as_ints(color, category):
    """``color`` as a list of 3 Python ints, or ValueError naming the category."""
    try:
        values = [int(v) for v in color]
        ok = len(values) == 3 and all(v == c and 0 <= v <= 255 for v, c in zip(values, color))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(
            f"color {color!r} of category '{category.get('name')}' is not 3 integers in [0, 255]"
        )
    return values


def check_categories(categories, numbering=None):
    """
    Raise ``ValueError`` unless ``categories`` is a usable list of category dicts: each with a
    str ``name``; ``id`` (int, unique), ``isthing`` (0/1 or bool) and ``color`` (3 ints in
    [0, 255]) each in all categories or in none. ``numbering="things_first"`` also needs ``id``
    and ``isthing``. The message names the category and the key or value at fault.
    """
    if not isinstance(categories, (list, tuple)) or not categories:
        raise ValueError(f"Need a non-empty list of categories, got {categories!r}")
    required = ("id", "name", "isthing") if numbering == "things_first" else ("name",)
    for category in categories:
        if not isinstance(category, dict):
            raise ValueError(f"A category must be a dict, got {category!r}")
        for key in required:
            if key not in category:
                needs = f"numbering='{numbering}' needs" if numbering else "needs"
                raise ValueError(
                    f"Category {category!r} has no '{key}' ({needs} {', '.join(required)})"
                )
        if not isinstance(category["name"], str):
            raise ValueError(f"Category {category!r}: 'name' must be a str")
        if "id" in category and (
            not isinstance(category["id"], numbers.Integral) or isinstance(category["id"], bool)
        ):
            raise ValueError(f"Category {category!r}: 'id' must be an integer")
        if "isthing" in category and category["isthing"] not in (0, 1):
            raise ValueError(f"Category {category!r}: 'isthing' must be 0 or 1")
        if "color" in category:
            _color_as_ints(category["color"], category)
    for key in ("id", "isthing"):
        having = [key in c for c in categories]
        if any(having) and not all(having):
            missing = categories[having.index(False)]
            raise ValueError(f"Category {missing!r} has no '{key}', which other categories have")
    if "id" in categories[0]:
        seen = set()
        for category in categories:
            if category["id"] in seen:
                raise ValueError(f"Category id {category['id']} appears twice in the categories")
            seen.add(category["id"])


def build_metadata(categories, numbering):
    """
    The class part of a dataset's metadata.

    Args:
        categories (list[dict]): ``name`` and optionally ``id``, ``isthing``, ``color`` (see
            :func:`check_categories`); a category without a colour gets one from
            :func:`palette` (by contiguous id).
        numbering (str): ``"dataset_order"`` or ``"things_first"`` (see the module docstring).

    Returns:
        dict: ``stuff_classes`` and ``stuff_colors``: every category, by contiguous id
        (detectron2's convention for semantic segmentation); ``stuff_dataset_id_to_contiguous_id``
        (every category) when the categories have ids; and when they have ``isthing``:
        ``thing_classes``, ``thing_colors`` and ``thing_dataset_id_to_contiguous_id`` (things
        only, with their contiguous ids).
    """
    if numbering not in NUMBERINGS:
        raise ValueError(f"numbering must be one of {NUMBERINGS}, got {numbering!r}")
    check_categories(categories, numbering)
    if numbering == "things_first":
        things = sorted((c for c in categories if c["isthing"]), key=lambda c: c["id"])
        stuff = sorted((c for c in categories if not c["isthing"]), key=lambda c: c["id"])
        ordered = things + stuff
    else:
        ordered = list(categories)
    default_colors = palette(len(ordered))
    names = [c["name"] for c in ordered]
    colors = [
        _color_as_ints(c["color"], c) if "color" in c else default_colors[i]
        for i, c in enumerate(ordered)
    ]
    metadata = {"stuff_classes": names, "stuff_colors": colors}
    if "id" in ordered[0]:
        metadata["stuff_dataset_id_to_contiguous_id"] = {c["id"]: i for i, c in enumerate(ordered)}
    if "isthing" in ordered[0]:
        if numbering == "things_first":
            num_things = sum(1 for c in ordered if c["isthing"])
            metadata["thing_classes"] = names[:num_things]
            metadata["thing_colors"] = colors[:num_things]
        else:
            metadata["thing_classes"] = list(names)
            metadata["thing_colors"] = [list(color) for color in colors]
        metadata["thing_dataset_id_to_contiguous_id"] = {
            c["id"]: i for i, c in enumerate(ordered) if c["isthing"]
        }
    return metadata
