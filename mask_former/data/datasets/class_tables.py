"""Class tables of the standard datasets and of the built-in one, kept as JSON data files.

``classes/<name>.json`` (beside this module, installed with the package) holds one dataset's
classes in the dataset's own order::

    {
      "description": "where the classes, ids and colours come from",
      "ignore_label": 255,            # optional: the void value of its semantic label maps
      "categories": [
        {"id": 0, "name": "wall", "isthing": 0, "color": [120, 120, 120]},
        ...
      ]
    }

A category needs ``name``; ``id`` (the dataset's category id), ``isthing`` (0/1) and ``color``
(RGB) are optional, each present in all categories of a table or in none, and other keys (e.g.
Mapillary's ``dataset_name``) are kept as they are. How categories become contiguous ids is not
in the file: each registration states it (``numbering`` of :func:`metadata.build_metadata`).

The registrations and the converters ``datasets/prepare_*.py`` read the same files.
"""
import json
import os
from dataclasses import dataclass
from typing import List, Optional

from .metadata import check_categories

__all__ = ["CLASS_TABLE_DIR", "ClassTable", "available_class_tables", "load_class_table"]

CLASS_TABLE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "classes")


@dataclass(frozen=True)
class ClassTable:
    """
    One dataset's classes.

    Attributes:
        name (str): the table's name, i.e. its file name without ``.json``.
        description (str): where the classes, ids and colours come from.
        categories (list[dict]): in the dataset's order (see the module docstring).
        ignore_label (int or None): the void value of the dataset's semantic label maps.
    """

    name: str
    description: str
    categories: List[dict]
    ignore_label: Optional[int] = None

    @property
    def names(self):
        """The category names, in table order."""
        return [c["name"] for c in self.categories]


def available_class_tables():
    """Names of the tables in :data:`CLASS_TABLE_DIR`, sorted."""
    return sorted(f[: -len(".json")] for f in os.listdir(CLASS_TABLE_DIR) if f.endswith(".json"))


def load_class_table(name):
    """
    Read ``classes/<name>.json``.

    Args:
        name (str): e.g. "ade20k_150".

    Returns:
        ClassTable: with fresh lists and dicts, so the caller may modify them.

    Raises:
        FileNotFoundError: no such table (the message lists the available ones).
        ValueError: the file is not a valid class table; the message names the file and the
            offending key or value.
    """
    path = os.path.join(CLASS_TABLE_DIR, f"{name}.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"No class table '{name}': {path} does not exist "
            f"(available: {', '.join(available_class_tables())})"
        )
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("categories"), list):
        raise ValueError(f"{path} must be a JSON object with a 'categories' list")
    unknown = sorted(set(data) - {"description", "ignore_label", "categories"})
    if unknown:
        raise ValueError(
            f"{path} has unknown key(s) {unknown} (expected description, ignore_label, categories)"
        )
    ignore_label = data.get("ignore_label")
    if ignore_label is not None and (not isinstance(ignore_label, int) or ignore_label < 0):
        raise ValueError(f"{path}: ignore_label must be an integer >= 0, got {ignore_label!r}")
    try:
        check_categories(data["categories"])
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    return ClassTable(
        name=name,
        description=data.get("description", ""),
        categories=data["categories"],
        ignore_label=ignore_label,
    )
