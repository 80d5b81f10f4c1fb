"""What every MaskFormer dataset mapper shares: config reading, inference-mode mapping, skipping
unreadable samples in training, label checks and the target ``Instances``."""

import copy
import logging
from typing import Iterable, List, Optional

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import Instances

from .augmentations import (
    LabelAugInput,
    build_test_augmentations,
    build_train_augmentations,
    padding_to_multiple,
)
from .build import DATASET_MAPPER_REGISTRY
from .image_io import SUPPORTED_IMAGE_FORMATS, ImageReadError, read_image, read_label_map

__all__ = [
    "MaskFormerDatasetMapperBase",
    "register_mapper",
    "resolve_ignore_label",
    "check_num_classes",
    "check_label_values",
    "check_same_size",
    "read_semantic_label",
    "NoReadableSampleError",
    "StopWhenNothingReadable",
    "make_instances",
    "image_to_tensor",
    "pad_bottom_right",
]

logger = logging.getLogger(__name__)

# dataset-dict keys that describe ground truth; mappers consume them
_TARGET_KEYS = ("annotations", "sem_seg_file_name", "pan_seg_file_name", "segments_info")


def register_mapper(name: str):
    """Class decorator: register a mapper in DATASET_MAPPER_REGISTRY under ``name`` (the value of
    INPUT.DATASET_MAPPER_NAME), not under its class name."""

    def deco(cls):
        DATASET_MAPPER_REGISTRY._do_register(name, cls)
        return cls

    return deco


def resolve_ignore_label(cfg, dataset_names: Iterable[str]) -> int:
    """
    ``cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE``, checked against the ``ignore_label`` of each
    dataset's metadata (where set): the two must agree, since label files are written with the
    one and losses and evaluators use the other.
    """
    ignore_label = cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
    registered = set(MetadataCatalog.list())
    for name in dataset_names:
        if name not in registered:
            continue
        dataset_ignore = getattr(MetadataCatalog.get(name), "ignore_label", None)
        if dataset_ignore is not None and dataset_ignore != ignore_label:
            raise ValueError(
                f"dataset {name!r} has ignore_label={dataset_ignore} but "
                f"MODEL.SEM_SEG_HEAD.IGNORE_VALUE={ignore_label}; set them equal"
            )
    return ignore_label


def check_num_classes(cfg, dataset_names: Iterable[str], key: str) -> None:
    """
    Raise ValueError when ``cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES`` disagrees with the class
    metadata of a dataset of ``dataset_names`` (``key`` says where they come from, e.g.
    "DATASETS.TEST"): a dataset that names its classes in ``stuff_classes`` (semantic and
    panoptic data: all classes, by contiguous id) must have exactly NUM_CLASSES of them; an
    instance dataset (``thing_classes`` only) must not have a thing id the model cannot predict.
    Datasets without class metadata (not loaded yet, or unregistered) are not checked.
    """
    num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    registered = set(MetadataCatalog.list())
    for name in dataset_names:
        if name not in registered:
            continue
        metadata = MetadataCatalog.get(name)
        stuff_classes = metadata.get("stuff_classes", None)
        if stuff_classes is not None:
            if len(stuff_classes) != num_classes:
                raise ValueError(
                    f"MODEL.SEM_SEG_HEAD.NUM_CLASSES={num_classes} but dataset {name!r} ({key}) "
                    f"has {len(stuff_classes)} classes (its metadata stuff_classes); set "
                    f"MODEL.SEM_SEG_HEAD.NUM_CLASSES {len(stuff_classes)}, or use a dataset with "
                    f"the model's classes"
                )
            continue
        thing_classes = metadata.get("thing_classes", None)
        if thing_classes is None:
            continue
        id_map = metadata.get("thing_dataset_id_to_contiguous_id", None)
        needed = max(id_map.values()) + 1 if id_map else len(thing_classes)
        if needed > num_classes:
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.NUM_CLASSES={num_classes} but dataset {name!r} ({key}) has "
                f"thing classes up to contiguous id {needed - 1} ({len(thing_classes)} "
                f"thing_classes in its metadata); set MODEL.SEM_SEG_HEAD.NUM_CLASSES {needed}"
            )


def check_label_values(
    values: np.ndarray,
    num_classes: int,
    ignore_label: Optional[int],
    source: str,
    classes_from: str = "MODEL.SEM_SEG_HEAD.NUM_CLASSES",
) -> None:
    """Raise ValueError naming ``source`` if any of ``values`` is neither a class id in
    [0, num_classes) nor ``ignore_label`` (None: no ignore value is allowed). ``classes_from``
    says where ``num_classes`` comes from."""
    values = np.unique(np.asarray(values))
    bad = values[(values < 0) | (values >= num_classes)]
    if ignore_label is not None:
        bad = bad[bad != ignore_label]
    if bad.size:
        shown = ", ".join(str(v) for v in bad[:10]) + (", ..." if bad.size > 10 else "")
        allowed = f" nor the ignore value {ignore_label}" if ignore_label is not None else ""
        hint = ""
        if bad.tolist() == [num_classes] and 0 not in values:
            hint = (
                f"; the classes look numbered 1..{num_classes}: class ids start at 0 "
                f"(0..{num_classes - 1}), unlabelled pixels take the ignore value"
            )
        raise ValueError(
            f"{source}: label value(s) {shown} are neither a class id in [0, {num_classes}) "
            f"({classes_from}){allowed}{hint}"
        )


def read_semantic_label(
    label_file: str,
    image_file: str,
    image_size,
    num_classes: int,
    ignore_label: Optional[int],
    classes_from: str = "MODEL.SEM_SEG_HEAD.NUM_CLASSES",
) -> np.ndarray:
    """
    Read the semantic label map ``label_file`` of image ``image_file`` and check it as training
    and evaluation both need: one channel of integers (:func:`read_label_map`), the image's
    ``image_size`` (H, W), values that are class ids in [0, num_classes) or ``ignore_label``.

    Returns:
        np.ndarray: H x W integer class ids.

    Raises:
        ImageReadError: the file is missing, truncated or undecodable.
        ValueError: naming ``label_file``, for any failed check.
    """
    label = read_label_map(label_file)
    _check_same_hw(image_size, label.shape[:2], image_file, label_file)
    check_label_values(label, num_classes, ignore_label, repr(label_file), classes_from)
    return label


def pad_bottom_right(array: np.ndarray, pad_h: int, pad_w: int, value) -> np.ndarray:
    """Pad the first two (H, W) axes of ``array`` at the bottom and right with ``value``."""
    if pad_h == 0 and pad_w == 0:
        return array
    pad = [(0, pad_h), (0, pad_w)] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, pad, mode="constant", constant_values=value)


def make_instances(image_size, classes: List[int], masks: List[np.ndarray]) -> Instances:
    """
    Args:
        image_size: (H, W).
        classes: K contiguous class ids.
        masks: K boolean H x W arrays.
    Returns:
        Instances with ``gt_classes`` (int64, K) and ``gt_masks`` (bool, K x H x W).
    """
    h, w = image_size
    instances = Instances((h, w))
    instances.gt_classes = torch.tensor(classes, dtype=torch.int64)
    if masks:
        instances.gt_masks = torch.from_numpy(np.ascontiguousarray(np.stack(masks)).astype(bool))
    else:
        instances.gt_masks = torch.zeros((0, h, w), dtype=torch.bool)
    return instances


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """H x W x 3 uint8 -> 3 x H x W uint8 tensor."""
    return torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))


class MaskFormerDatasetMapperBase:
    """
    Shared mapping logic. Subclasses implement :meth:`map_for_training`; inference mode (resize
    the image, no targets: evaluators read ground truth from the files) is common.

    In training, a missing, truncated or undecodable image or label file is logged (naming the
    file that failed, then its sample's image) and the sample skipped (``None``, so detectron2's
    dataloader draws another); ``num_skipped`` counts them and ``last_skip_reason`` says why the
    last one was skipped. A dataset of which no sample can be read is stopped by
    :class:`StopWhenNothingReadable`. In inference the error propagates. Data bugs (wrong label
    values, sizes) always raise.
    """

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        augmentations: List,
        image_format: str,
        num_classes: int,
        ignore_label: int,
        size_divisibility: int = -1,
    ):
        """
        Args:
            is_train: training (targets, augmentation) or inference (resize only, no targets).
            augmentations: list of ``T.Augmentation`` / ``T.Transform``.
            image_format: "RGB" or "BGR".
            num_classes: class / category ids must be < num_classes.
            ignore_label: label of unlabelled (void, crowd) pixels, also used for padding labels.
            size_divisibility: pad height and width to a multiple of this (when > 0).
        """
        if image_format not in SUPPORTED_IMAGE_FORMATS:
            raise ValueError(
                f"INPUT.FORMAT={image_format!r} is not supported by {type(self).__name__}; "
                f"expected one of {SUPPORTED_IMAGE_FORMATS}"
            )
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.num_classes = num_classes
        self.ignore_label = ignore_label
        self.size_divisibility = size_divisibility
        self.num_skipped = 0
        self.last_skip_reason: Optional[str] = None
        mode = "training" if is_train else "inference"
        logger.info(f"{type(self).__name__} augmentations used in {mode}: {augmentations}")

    @staticmethod
    def base_config(cfg, is_train: bool) -> dict:
        """The constructor arguments every mapper reads from ``cfg``. "augmentations" is the
        inference pipeline; subclasses replace it in training."""
        dataset_names = cfg.DATASETS.TRAIN if is_train else cfg.DATASETS.TEST
        return {
            "is_train": is_train,
            "augmentations": build_test_augmentations(cfg),
            "image_format": cfg.INPUT.FORMAT,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "ignore_label": resolve_ignore_label(cfg, dataset_names),
            "size_divisibility": cfg.INPUT.SIZE_DIVISIBILITY,
        }

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        ret = cls.base_config(cfg, is_train)
        if is_train:
            ret["augmentations"] = cls.train_augmentations(cfg, ret["ignore_label"])
        return ret

    @staticmethod
    def train_augmentations(cfg, ignore_label: int) -> List:
        """Training augmentation (resize, category-area-constrained crop, colour, flip)."""
        return build_train_augmentations(cfg, ignore_label)

    def __call__(self, dataset_dict: dict) -> Optional[dict]:
        """
        Args:
            dataset_dict: one sample in detectron2's dataset format (not modified).
        Returns:
            dict with "image" (3 x H x W uint8 in INPUT.FORMAT), "height", "width", "file_name",
            "image_id" and, in training, "instances" (plus "sem_seg" from the semantic mapper);
            None when a training sample's files cannot be read.
        """
        dataset_dict = copy.deepcopy(dataset_dict)
        if not self.is_train:
            return self.map_for_inference(dataset_dict)
        try:
            return self.map_for_training(dataset_dict)
        except ImageReadError as e:
            self.num_skipped += 1
            self.last_skip_reason = _describe_read_error(e, dataset_dict)
            logger.warning(
                f"{type(self).__name__}: skipping sample: {self.last_skip_reason}; "
                f"{self.num_skipped} sample(s) skipped so far"
            )
            return None

    def read_image(self, dataset_dict: dict) -> np.ndarray:
        """Read ``dataset_dict["file_name"]`` (H x W x 3 uint8), check it against the dict's
        height/width and fill them in when absent."""
        if "file_name" not in dataset_dict:
            raise KeyError(f"dataset dict has no 'file_name'; keys: {sorted(dataset_dict)}")
        image = read_image(dataset_dict["file_name"], self.image_format)
        utils.check_image_size(dataset_dict, image)
        dataset_dict.setdefault("height", image.shape[0])
        dataset_dict.setdefault("width", image.shape[1])
        return image

    def map_for_inference(self, dataset_dict: dict) -> dict:
        image = self.read_image(dataset_dict)
        aug_input = T.AugInput(image)
        self.augmentations(aug_input)
        for key in _TARGET_KEYS:
            dataset_dict.pop(key, None)
        dataset_dict["image"] = image_to_tensor(aug_input.image)
        return dataset_dict

    def map_for_training(self, dataset_dict: dict) -> dict:
        raise NotImplementedError

    def augment(self, image: np.ndarray, category_map: Optional[np.ndarray]):
        """Run the augmentations on an image and (optionally) its H x W category map.

        Returns:
            (image, category_map, transforms)
        """
        aug_input = LabelAugInput(image, sem_seg=category_map)
        transforms = self.augmentations(aug_input)
        return aug_input.image, aug_input.sem_seg, transforms

    def padding(self, image: np.ndarray):
        """(pad_h, pad_w) making ``image`` a multiple of ``size_divisibility``."""
        return padding_to_multiple(image.shape[0], image.shape[1], self.size_divisibility)

    def finish(self, dataset_dict: dict, image: np.ndarray, classes, masks) -> dict:
        """Pad image (value 128) and masks (False) to ``size_divisibility``; fill the output."""
        pad_h, pad_w = self.padding(image)
        image = pad_bottom_right(image, pad_h, pad_w, 128)
        masks = [pad_bottom_right(m, pad_h, pad_w, False) for m in masks]
        for key in _TARGET_KEYS:
            dataset_dict.pop(key, None)
        dataset_dict["image"] = image_to_tensor(image)
        dataset_dict["instances"] = make_instances(image.shape[:2], classes, masks)
        return dataset_dict


_FILE_ROLES = (
    ("file_name", "the image"),
    ("sem_seg_file_name", "the semantic label"),
    ("pan_seg_file_name", "the panoptic PNG"),
)


def _describe_read_error(error: ImageReadError, dataset_dict: dict) -> str:
    """"cannot read 'FILE' (the semantic label of image 'IMAGE', image_id ID): WHY"."""
    failed = getattr(error, "file_name", None)
    image = dataset_dict.get("file_name")
    role = next((r for k, r in _FILE_ROLES if failed is not None and dataset_dict.get(k) == failed),
                "a file")
    of_image = "" if role == "the image" else f" of image {image!r}"
    where = f"{role}{of_image}, image_id {dataset_dict.get('image_id')!r}"
    if failed is None:
        return f"{error} ({where})"
    return f"cannot read {failed!r} ({where}): {error.reason}"


class NoReadableSampleError(RuntimeError):
    """No sample of a training dataset could be read: every one was skipped."""


class StopWhenNothingReadable:
    """
    Wraps a training mapper (any callable returning None for a sample it skips) for detectron2's
    map-style ``MapDataset``, which replaces a skipped sample by another one never skipped so
    far and fails with "Sample larger than population" once every sample was skipped. This
    raises :class:`NoReadableSampleError` first: when as many samples were skipped as the
    dataset holds without any being read, naming the datasets and the first skipped files. A
    few bad files among good ones are still skipped one by one (the wrapped mapper logs them).
    """

    def __init__(self, mapper, num_samples: int, dataset_names: Iterable[str], max_listed: int = 5):
        """
        Args:
            mapper: the training mapper.
            num_samples: how many samples the dataset holds.
            dataset_names: the datasets, for the message (e.g. ``cfg.DATASETS.TRAIN``).
            max_listed: how many skipped samples the message names.
        """
        self.mapper = mapper
        self.num_samples = num_samples
        self.dataset_names = tuple(dataset_names)
        self.max_listed = max_listed
        self.num_read = 0
        self.num_failed = 0
        self.failures: List[str] = []

    def __call__(self, dataset_dict: dict):
        result = self.mapper(dataset_dict)
        if result is not None:
            self.num_read += 1
            return result
        self.num_failed += 1
        if len(self.failures) < self.max_listed:
            reason = getattr(self.mapper, "last_skip_reason", None)
            self.failures.append(reason or f"{dataset_dict.get('file_name')!r} was skipped")
        if self.num_read == 0 and self.num_failed >= self.num_samples:
            listed = "\n  ".join(self.failures)
            more = self.num_samples - len(self.failures)
            raise NoReadableSampleError(
                f"No training sample of {', '.join(map(repr, self.dataset_names))} (DATASETS.TRAIN) "
                f"could be read: all {self.num_samples} were skipped. The first "
                f"{len(self.failures)}:\n  {listed}" + (f"\n  ... and {more} more" if more > 0 else "")
                + "\nCheck that the files exist and are complete (and DETECTRON2_DATASETS)."
            )
        return None

    def __getattr__(self, name):  # num_skipped, is_train, ... of the wrapped mapper
        if name == "mapper":
            raise AttributeError(name)
        return getattr(self.mapper, name)


def check_same_size(image: np.ndarray, label: np.ndarray, image_file: str, label_file: str) -> None:
    """Raise ValueError when a label map's H x W differs from its image's."""
    _check_same_hw(image.shape[:2], label.shape[:2], image_file, label_file)


def _check_same_hw(image_hw, label_hw, image_file: str, label_file: str) -> None:
    if tuple(image_hw) != tuple(label_hw):
        raise ValueError(
            f"label {label_file!r} is {label_hw[1]}x{label_hw[0]} (WxH) but image "
            f"{image_file!r} is {image_hw[1]}x{image_hw[0]}"
        )
