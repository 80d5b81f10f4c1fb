"""Mapper for COCO-format instance segmentation data: an image and per-object ``annotations``."""

from typing import List

import numpy as np
import pycocotools.mask as mask_util

from .base import MaskFormerDatasetMapperBase, check_label_values, register_mapper

__all__ = ["MaskFormerInstanceDatasetMapper", "segmentation_to_mask"]


def segmentation_to_mask(segmentation, height: int, width: int, source: str) -> np.ndarray:
    """
    Decode one COCO/detectron2 annotation "segmentation" into an H x W bool mask.

    Accepts a list of polygons ([[x0, y0, x1, y1, ...], ...], absolute pixel coordinates), a COCO
    RLE dict (compressed "counts" string or uncompressed list) or an H x W array.
    ``source`` names the annotation in error messages.
    """
    if isinstance(segmentation, list):
        polygons = [np.asarray(p, dtype=np.float64).ravel() for p in segmentation]
        for polygon in polygons:
            if polygon.size < 6 or polygon.size % 2:
                raise ValueError(
                    f"{source}: a polygon needs an even number (>= 6) of coordinates; "
                    f"got {polygon.size}"
                )
        if not polygons:
            return np.zeros((height, width), dtype=bool)
        rles = mask_util.frPyObjects([p.tolist() for p in polygons], height, width)
        return mask_util.decode(mask_util.merge(rles)).astype(bool)
    if isinstance(segmentation, dict):
        if "counts" not in segmentation or "size" not in segmentation:
            raise ValueError(
                f"{source}: an RLE segmentation needs 'counts' and 'size'; "
                f"got keys {sorted(segmentation)}"
            )
        if list(segmentation["size"]) != [height, width]:
            raise ValueError(
                f"{source}: RLE size {list(segmentation['size'])} (h, w) differs from the "
                f"image's [{height}, {width}]"
            )
        if isinstance(segmentation["counts"], list):  # uncompressed RLE
            segmentation = mask_util.frPyObjects(segmentation, height, width)
        return mask_util.decode(segmentation).astype(bool)
    if isinstance(segmentation, np.ndarray):
        if segmentation.shape != (height, width):
            raise ValueError(
                f"{source}: mask of shape {segmentation.shape} differs from the image's "
                f"({height}, {width})"
            )
        return segmentation.astype(bool)
    raise ValueError(
        f"{source}: 'segmentation' must be a list of polygons, an RLE dict or an H x W array; "
        f"got {type(segmentation).__name__}"
    )


@register_mapper("mask_former_instance")
class MaskFormerInstanceDatasetMapper(MaskFormerDatasetMapperBase):
    """
    Reads ``file_name`` and ``annotations`` (detectron2 format, contiguous ``category_id``,
    polygon or RLE ``segmentation``), decodes each non-crowd annotation into a mask at the
    original size, augments image and masks together (see :func:`build_train_augmentations`;
    for the crop's category-area check, pixels of no object are ignored and overlaps go to the
    later annotation) and pads to ``INPUT.SIZE_DIVISIBILITY``. Returns "instances" with
    ``gt_classes`` (K) and ``gt_masks`` (K x H x W bool, may overlap); masks left empty by the
    crop are dropped.
    """


    def category_map(self, classes: List[int], masks: List[np.ndarray], shape) -> np.ndarray:
        """H x W category of the last mask covering each pixel; ``ignore_label`` elsewhere."""
        dtype = np.uint8 if max([self.ignore_label] + classes) < 256 else np.int32
        categories = np.full(shape, self.ignore_label, dtype=dtype)
        for c, m in zip(classes, masks):
            categories[m] = c
        return categories

    def map_for_training(self, dataset_dict: dict) -> dict:
        image = self.read_image(dataset_dict)
        h, w = image.shape[:2]
        file_name = dataset_dict["file_name"]
        classes, masks = [], []
        for i, annotation in enumerate(dataset_dict.get("annotations", [])):
            if annotation.get("iscrowd", 0):
                continue
            source = f"annotation {i} of {file_name!r}"
            for key in ("category_id", "segmentation"):
                if key not in annotation:
                    raise KeyError(f"{source} has no {key!r}; keys {sorted(annotation)}")
            check_label_values(
                [annotation["category_id"]], self.num_classes, None, f"{source} (category_id)"
            )
            classes.append(int(annotation["category_id"]))
            masks.append(segmentation_to_mask(annotation["segmentation"], h, w, source))

        image, _, transforms = self.augment(image, self.category_map(classes, masks, (h, w)))
        masks = [transforms.apply_segmentation(m.astype(np.uint8)).astype(bool) for m in masks]
        kept = [i for i, m in enumerate(masks) if m.any()]
        return self.finish(
            dataset_dict, image, [classes[i] for i in kept], [masks[i] for i in kept]
        )
