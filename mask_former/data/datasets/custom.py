"""One-call registration of user datasets in the three formats MaskFormer trains on.

Each helper checks its arguments, builds the class metadata and registers the dataset through
the one registration layer (:mod:`.registration`), so that ``tools/train_net.py`` and the
evaluators it picks from ``evaluator_type`` work on the registered name:

- :func:`register_semantic_folder`: a folder of images and a folder of label PNGs
  (``evaluator_type="sem_seg"``; classes numbered in the given order).
- :func:`register_coco_instance_json`: a COCO instance-segmentation JSON
  (``evaluator_type="coco"``; contiguous ids by increasing category id).
- :func:`register_coco_panoptic_json`: COCO panoptic PNGs + JSON, optionally with semantic PNGs
  and an instance JSON for semantic and instance evaluation of the same model
  (``evaluator_type="coco_panoptic_seg"``; numbered things first, see
  :func:`panoptic_metadata_from_categories`).

Loading (``DatasetCatalog.get``) raises ``FileNotFoundError`` naming the missing path, and
``ValueError`` naming the file and the value when an annotation refers to an unknown category.
"""

from .metadata import build_metadata
from .registration import read_json, register_instances, register_panoptic, register_semantic, require_paths

__all__ = [
    "panoptic_metadata_from_categories",
    "register_semantic_folder",
    "register_coco_instance_json",
    "register_coco_panoptic_json",
]


def register_semantic_folder(
    name,
    image_root,
    sem_seg_root,
    classes,
    ignore_label=255,
    colors=None,
    image_ext=".jpg",
    gt_ext=".png",
):
    """
    Register a semantic segmentation dataset: ``image_root/x{image_ext}`` is labelled by
    ``sem_seg_root/x{gt_ext}``, a single-channel image whose pixel values are indices into
    ``classes`` (or ``ignore_label``).

    Args:
        name (str): dataset name, e.g. ``"my_dataset_train"``.
        classes (list[str]): class names; label value ``i`` is ``classes[i]``.
        ignore_label (int): label value excluded from training and evaluation.
        colors (list[list[int]] or None): one RGB color per class for visualization;
            None picks detectron2's palette.
        image_ext, gt_ext (str): file name endings of images and labels.

    Sets metadata ``stuff_classes``, ``stuff_colors``, ``ignore_label``, ``image_root``,
    ``sem_seg_root`` and ``evaluator_type="sem_seg"``. Nothing is read from disk until the
    dataset is loaded.
    """
    classes = list(classes)
    if not classes or not all(isinstance(c, str) for c in classes):
        raise ValueError(
            f"Dataset '{name}': classes must be a non-empty list of str, got {classes!r}"
        )
    if not (0 <= int(ignore_label) <= 255) or int(ignore_label) < len(classes):
        raise ValueError(
            f"Dataset '{name}': ignore_label={ignore_label} must be in [{len(classes)}, 255], "
            f"so that it is no class id of the {len(classes)} classes and fits in a uint8 PNG"
        )
    categories = [{"name": c} for c in classes]
    if colors is not None:
        colors = list(colors)
        if len(colors) != len(classes):
            raise ValueError(
                f"Dataset '{name}': got {len(colors)} colors for {len(classes)} classes"
            )
        categories = [dict(c, color=color) for c, color in zip(categories, colors)]
    try:
        metadata = build_metadata(categories, numbering="dataset_order")
    except ValueError as e:
        raise ValueError(f"Dataset '{name}': {e}") from e
    register_semantic(
        name,
        metadata,
        image_root,
        sem_seg_root,
        ignore_label=int(ignore_label),
        image_ext=image_ext,
        gt_ext=gt_ext,
    )


def register_coco_instance_json(name, json_file, image_root, thing_classes=None):
    """
    Register a dataset in COCO instance-segmentation JSON format (like detectron2's
    ``register_coco_instances``), with ``evaluator_type="coco"``.

    Category ids are mapped to contiguous ids in increasing id order when the dataset is
    loaded, which is also when ``thing_classes`` and ``thing_dataset_id_to_contiguous_id``
    enter the metadata (read from the JSON's ``categories``). Pass ``thing_classes`` (names in
    increasing category-id order) to have them in the metadata before loading, e.g. for the
    demo on a machine without the JSON.
    """
    metadata = {} if thing_classes is None else {"thing_classes": list(thing_classes)}
    register_instances(name, metadata, json_file, image_root)


def panoptic_metadata_from_categories(categories):
    """
    Metadata of a custom panoptic dataset from its COCO panoptic ``categories``:
    :func:`metadata.build_metadata` with ``numbering="things_first"``.

    Contiguous ids put the thing categories first (by increasing dataset id), then the stuff
    categories (by increasing dataset id): detectron2's COCOEvaluator needs the things at
    0..T-1, and this is the order ``load_coco_json`` gives the things of an instance JSON.

    Args:
        categories (list[dict]): each with "id" (int), "name" (str), "isthing" (0/1) and
            optionally "color" (RGB); missing colors come from detectron2's palette.

    Returns:
        dict: ``thing_classes``, ``thing_colors``, ``stuff_classes`` and ``stuff_colors`` (all
        classes, things first), ``thing_dataset_id_to_contiguous_id`` (things only) and
        ``stuff_dataset_id_to_contiguous_id`` (all categories -> 0..K-1).
    """
    return build_metadata(categories, numbering="things_first")


def _read_categories(panoptic_json):
    require_paths([panoptic_json])
    json_info = read_json(panoptic_json)
    if "categories" not in json_info:
        raise ValueError(f"{panoptic_json} has no 'categories' list")
    return json_info["categories"]


def register_coco_panoptic_json(
    name,
    image_root,
    panoptic_root,
    panoptic_json,
    sem_seg_root=None,
    instances_json=None,
    categories=None,
):
    """
    Register a COCO panoptic dataset with ``evaluator_type="coco_panoptic_seg"``.

    Metadata must be complete at registration, so unless ``categories`` is given this reads
    the "categories" of ``panoptic_json`` now (one file read; raises FileNotFoundError when it
    is missing). The images themselves are read lazily.

    Args:
        name (str): dataset name.
        image_root (str): folder of the images.
        panoptic_root (str): folder of the panoptic PNGs (segment ids encoded as RGB).
        panoptic_json (str): the COCO panoptic JSON.
        sem_seg_root (str or None): folder of semantic PNGs with contiguous ids (things first, see
            :func:`panoptic_metadata_from_categories`), needed for semantic evaluation.
        instances_json (str or None): COCO instance JSON of the things, needed for instance
            (mask AP) evaluation.
        categories (list[dict] or None): the categories, to skip reading them from the JSON.

    Metadata: everything :func:`panoptic_metadata_from_categories` returns, plus
    ``panoptic_root``, ``panoptic_json``, ``image_root``, ``sem_seg_root`` and ``json_file``
    (the latter two when given), ``ignore_label=255``, ``label_divisor=1000``.
    """
    source = "the categories given"
    if categories is None:
        categories, source = _read_categories(panoptic_json), f"the categories of {panoptic_json}"
    try:
        metadata = panoptic_metadata_from_categories(categories)
    except ValueError as e:
        raise ValueError(f"Dataset '{name}', {source}: {e}") from e
    register_panoptic(
        name,
        metadata,
        image_root,
        panoptic_root,
        panoptic_json,
        sem_seg_root,
        instances_json,
    )
