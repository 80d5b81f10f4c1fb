"""Augmentations shared by the dataset mappers, and the builders that read them from a config.

- :class:`ColorAugSSDTransform` / :class:`RandomColorAugSSD`: SSD's photometric distortion;
- :class:`RandomChoiceAugmentation`: apply one of several augmentation lists (DETR's
  "resize, or resize-crop-resize");
- :class:`LabelAugInput` and :func:`transform_label_map`: transform integer label maps of any
  dtype (uint16 class ids, int32 panoptic ids) exactly as detectron2 transforms uint8 ones;
- ``build_*_augmentations(cfg)``: the training / inference pipelines named by ``cfg.INPUT``.
"""

from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np
from detectron2.data import transforms as T

__all__ = [
    "ColorAugSSDTransform",
    "RandomColorAugSSD",
    "RandomChoiceAugmentation",
    "LabelAugInput",
    "transform_label_map",
    "padding_to_multiple",
    "build_random_flip",
    "build_train_augmentations",
    "build_detr_train_augmentations",
    "build_test_augmentations",
]


# --------------------------------------------------------------------------- photometric


def _scale_and_shift(values: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """``clip(values * alpha + beta, 0, 255)`` truncated to uint8."""
    return np.clip(values.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


class ColorAugSSDTransform(T.Transform):
    """
    SSD's photometric distortion with fixed parameters (sampled by :class:`RandomColorAugSSD`):
    brightness shift, then contrast scaling either first or last, with saturation scaling and hue
    rotation in between (both in OpenCV's uint8 HSV, hue in [0, 180)). A parameter set to None
    skips that step. Geometry is unchanged, so segmentations and coordinates pass through.
    """

    def __init__(
        self,
        img_format: str,
        brightness_delta: Optional[float] = None,
        contrast_alpha: Optional[float] = None,
        saturation_alpha: Optional[float] = None,
        hue_delta: Optional[int] = None,
        contrast_first: bool = True,
    ):
        """
        Args:
            img_format: "RGB" or "BGR", the channel order of the images this will see.
            brightness_delta: added to every channel.
            contrast_alpha: every channel is multiplied by it.
            saturation_alpha: the HSV saturation channel is multiplied by it.
            hue_delta: added to the HSV hue channel, modulo 180.
            contrast_first: contrast before (True) or after (False) saturation and hue.
        """
        super().__init__()
        if img_format not in ("RGB", "BGR"):
            raise ValueError(
                f"ColorAugSSDTransform: img_format must be 'RGB' or 'BGR', got {img_format!r}"
            )
        self._set_attributes(locals())

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        """
        Args:
            img: H x W x 3 uint8 in ``img_format``.
        Returns:
            H x W x 3 uint8 in ``img_format``.
        """
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(
                "ColorAugSSDTransform expects an H x W x 3 uint8 image; "
                f"got {img.dtype} {img.shape}"
            )
        if self.brightness_delta is not None:
            img = _scale_and_shift(img, beta=self.brightness_delta)
        if self.contrast_first and self.contrast_alpha is not None:
            img = _scale_and_shift(img, alpha=self.contrast_alpha)
        if self.saturation_alpha is not None or self.hue_delta is not None:
            to_hsv, from_hsv = (
                (cv2.COLOR_RGB2HSV, cv2.COLOR_HSV2RGB)
                if self.img_format == "RGB"
                else (cv2.COLOR_BGR2HSV, cv2.COLOR_HSV2BGR)
            )
            hsv = cv2.cvtColor(np.ascontiguousarray(img), to_hsv)
            if self.saturation_alpha is not None:
                hsv[:, :, 1] = _scale_and_shift(hsv[:, :, 1], alpha=self.saturation_alpha)
            if self.hue_delta is not None:
                hsv[:, :, 0] = (hsv[:, :, 0].astype(np.int32) + self.hue_delta) % 180
            img = cv2.cvtColor(hsv, from_hsv)
        if not self.contrast_first and self.contrast_alpha is not None:
            img = _scale_and_shift(img, alpha=self.contrast_alpha)
        return img

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        return coords

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return segmentation


class RandomColorAugSSD(T.Augmentation):
    """
    Sample SSD's photometric distortion: each of brightness, contrast, saturation and hue is
    applied with probability 0.5, and contrast goes first or last with probability 0.5.
    """

    def __init__(
        self,
        img_format: str,
        brightness_delta: float = 32,
        contrast_range: Tuple[float, float] = (0.5, 1.5),
        saturation_range: Tuple[float, float] = (0.5, 1.5),
        hue_delta: int = 18,
    ):
        """
        Args:
            img_format: "RGB" or "BGR".
            brightness_delta: brightness shift is uniform in [-brightness_delta, brightness_delta].
            contrast_range, saturation_range: (low, high) of the uniform scale factors.
            hue_delta: hue shift is a uniform integer in [-hue_delta, hue_delta] (of 180).
        """
        super().__init__()
        if img_format not in ("RGB", "BGR"):
            raise ValueError(
                f"RandomColorAugSSD: img_format must be 'RGB' or 'BGR', got {img_format!r}"
            )
        self._init(locals())

    def get_transform(self, image) -> ColorAugSSDTransform:
        def maybe(sample):
            return sample() if np.random.randint(2) else None

        return ColorAugSSDTransform(
            self.img_format,
            brightness_delta=maybe(
                lambda: np.random.uniform(-self.brightness_delta, self.brightness_delta)
            ),
            contrast_alpha=maybe(lambda: np.random.uniform(*self.contrast_range)),
            saturation_alpha=maybe(lambda: np.random.uniform(*self.saturation_range)),
            hue_delta=maybe(lambda: int(np.random.randint(-self.hue_delta, self.hue_delta + 1))),
            contrast_first=bool(np.random.randint(2)),
        )


# --------------------------------------------------------------------------- choice


class RandomChoiceAugmentation(T.Augmentation):
    """Apply one of several augmentation lists, the i-th with probability ``probs[i]``."""

    def __init__(
        self, choices: Sequence[Sequence[T.Augmentation]], probs: Optional[Sequence[float]] = None
    ):
        """
        Args:
            choices: the candidate augmentation lists.
            probs: their probabilities (summing to 1); uniform when None.
        """
        super().__init__()
        if len(choices) == 0:
            raise ValueError("RandomChoiceAugmentation needs at least one choice")
        if probs is None:
            probs = [1.0 / len(choices)] * len(choices)
        if len(probs) != len(choices) or not np.isclose(sum(probs), 1.0) or min(probs) < 0:
            raise ValueError(
                f"RandomChoiceAugmentation: probs {list(probs)} must be {len(choices)} "
                "non-negative numbers summing to 1"
            )
        self.choices = [T.AugmentationList(list(c)) for c in choices]
        self.probs = list(probs)

    def __call__(self, aug_input) -> T.Transform:
        index = np.random.choice(len(self.choices), p=self.probs)
        return self.choices[index](aug_input)

    def __repr__(self):
        return f"RandomChoiceAugmentation(choices={self.choices}, probs={self.probs})"


# --------------------------------------------------------------------------- label maps


def transform_label_map(transform: T.Transform, label: np.ndarray) -> np.ndarray:
    """
    Apply ``transform.apply_segmentation`` to an integer label map of any dtype.

    detectron2 resizes uint8 maps with PIL's nearest neighbour but other dtypes with torch's,
    which samples different source pixels than the image interpolation does. Labels in
    [0, 2**24) are therefore split into three uint8 planes, transformed as one uint8 image
    (every plane samples the same source pixels) and reassembled.

    Args:
        transform: a Transform or TransformList.
        label: H x W integer array with values in [0, 2**24).
    Returns:
        H' x W' array of the same dtype.
    """
    if label.dtype == np.uint8:
        return transform.apply_segmentation(label)
    if not np.issubdtype(label.dtype, np.integer):
        raise ValueError(f"label maps must hold integers; got dtype {label.dtype}")
    if label.size and (label.min() < 0 or label.max() >= 2**24):
        raise ValueError(
            f"label values must lie in [0, 2**24); got range [{label.min()}, {label.max()}]"
        )
    wide = label.astype(np.int64)
    planes = np.stack([(wide >> 16) & 255, (wide >> 8) & 255, wide & 255], axis=-1).astype(np.uint8)
    planes = transform.apply_segmentation(planes).astype(np.int64)
    return ((planes[..., 0] << 16) | (planes[..., 1] << 8) | planes[..., 2]).astype(label.dtype)


class LabelAugInput(T.AugInput):
    """
    ``T.AugInput`` whose ``sem_seg`` may be any integer dtype (see :func:`transform_label_map`),
    so category-aware augmentations can see uint16 class ids or ids beyond 255.
    """

    def transform(self, tfm: T.Transform) -> None:
        self.image = tfm.apply_image(self.image)
        if self.boxes is not None:
            self.boxes = tfm.apply_box(self.boxes)
        if self.sem_seg is not None:
            self.sem_seg = transform_label_map(tfm, self.sem_seg)


def padding_to_multiple(height: int, width: int, divisibility: int) -> Tuple[int, int]:
    """Rows and columns to add at the bottom and right to make both sides multiples of
    ``divisibility`` (none when ``divisibility <= 0``)."""
    if divisibility <= 0:
        return 0, 0
    return (-height) % divisibility, (-width) % divisibility


# --------------------------------------------------------------------------- builders


def build_random_flip(cfg) -> Optional[T.RandomFlip]:
    """``T.RandomFlip`` for ``cfg.INPUT.RANDOM_FLIP`` ("none", "horizontal" or "vertical")."""
    mode = cfg.INPUT.RANDOM_FLIP
    if mode == "none":
        return None
    if mode not in ("horizontal", "vertical"):
        raise ValueError(f"INPUT.RANDOM_FLIP={mode!r}; expected 'none', 'horizontal' or 'vertical'")
    return T.RandomFlip(horizontal=mode == "horizontal", vertical=mode == "vertical")


def _train_resize(cfg) -> T.ResizeShortestEdge:
    return T.ResizeShortestEdge(
        cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
    )


def build_train_augmentations(cfg, ignore_label: int) -> List[T.Augmentation]:
    """
    MaskFormer's training pipeline: ResizeShortestEdge(MIN_SIZE_TRAIN, MAX_SIZE_TRAIN), then when
    ``INPUT.CROP.ENABLED`` a crop of ``INPUT.CROP.{TYPE,SIZE}`` re-drawn (up to 10 times) until no
    category covers more than ``INPUT.CROP.SINGLE_CATEGORY_MAX_AREA`` of its non-ignored pixels,
    then SSD color distortion when ``INPUT.COLOR_AUG_SSD``, then ``INPUT.RANDOM_FLIP``.

    The crop reads the category map from the AugInput's ``sem_seg`` (needed only when the max
    area is below 1), with ``ignore_label`` pixels left out of the count.
    """
    augs: List[T.Augmentation] = [_train_resize(cfg)]
    if cfg.INPUT.CROP.ENABLED:
        augs.append(
            T.RandomCrop_CategoryAreaConstraint(
                cfg.INPUT.CROP.TYPE,
                cfg.INPUT.CROP.SIZE,
                cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA,
                ignore_label,
            )
        )
    if cfg.INPUT.COLOR_AUG_SSD:
        augs.append(RandomColorAugSSD(cfg.INPUT.FORMAT))
    flip = build_random_flip(cfg)
    if flip is not None:
        augs.append(flip)
    return augs


def build_detr_train_augmentations(cfg) -> List[T.Augmentation]:
    """
    DETR's training pipeline (used by the COCO panoptic configs): ``INPUT.RANDOM_FLIP``, then with
    probability 0.5 each either ResizeShortestEdge(MIN_SIZE_TRAIN, MAX_SIZE_TRAIN) or
    ResizeShortestEdge([400, 500, 600]) -> RandomCrop(INPUT.CROP.{TYPE,SIZE}) ->
    ResizeShortestEdge(MIN_SIZE_TRAIN, MAX_SIZE_TRAIN). Without ``INPUT.CROP.ENABLED`` only the
    first branch exists. (The COCO configs use CROP.TYPE "absolute_range", SIZE (384, 600).)
    """
    augs: List[T.Augmentation] = []
    flip = build_random_flip(cfg)
    if flip is not None:
        augs.append(flip)
    if cfg.INPUT.CROP.ENABLED:
        resize_crop_resize = [
            T.ResizeShortestEdge([400, 500, 600], sample_style="choice"),
            T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE),
            _train_resize(cfg),
        ]
        augs.append(RandomChoiceAugmentation([[_train_resize(cfg)], resize_crop_resize]))
    else:
        augs.append(_train_resize(cfg))
    return augs


def build_test_augmentations(cfg) -> List[T.Augmentation]:
    """ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST); nothing when MIN_SIZE_TEST is 0."""
    if cfg.INPUT.MIN_SIZE_TEST == 0:
        return []
    return [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice")]
