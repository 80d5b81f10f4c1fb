"""Mapper for COCO-format panoptic data: an image, an RGB-encoded segment-id PNG and
``segments_info``."""

from typing import List, Tuple

import numpy as np
from panopticapi.utils import rgb2id

from .base import MaskFormerDatasetMapperBase, check_label_values, check_same_size, register_mapper
from .image_io import read_panoptic_png

__all__ = ["MaskFormerPanopticDatasetMapper"]

# segment id of unlabelled pixels in COCO panoptic PNGs
VOID_ID = 0


@register_mapper("mask_former_panoptic")
class MaskFormerPanopticDatasetMapper(MaskFormerDatasetMapperBase):
    """
    Reads ``file_name``, ``pan_seg_file_name`` and ``segments_info`` ([{"id", "category_id"
    (contiguous), "iscrowd", ...}]), augments (see :func:`build_train_augmentations`; the crop's
    category-area check sees the category map of the non-crowd segments), pads to
    ``INPUT.SIZE_DIVISIBILITY`` and returns "instances" with one mask per non-crowd segment still
    visible after augmentation: ``gt_classes`` (K) and ``gt_masks`` (K x H x W bool, disjoint).
    Void pixels, crowd segments and padding belong to no mask.
    """


    def read_panoptic(
        self, dataset_dict: dict, image: np.ndarray
    ) -> Tuple[np.ndarray, np.ndarray, List[dict]]:
        """Read and check the panoptic PNG.

        Returns:
            the PNG (H x W x 3 uint8), its segment ids (H x W int32), the non-crowd segments.
        """
        for key in ("pan_seg_file_name", "segments_info"):
            if key not in dataset_dict:
                raise KeyError(
                    f"{type(self).__name__} needs {key!r} in dataset dicts; "
                    f"{dataset_dict['file_name']!r} has keys {sorted(dataset_dict)}"
                )
        pan_file = dataset_dict["pan_seg_file_name"]
        pan_rgb = read_panoptic_png(pan_file)
        check_same_size(image, pan_rgb, dataset_dict["file_name"], pan_file)
        segments = dataset_dict["segments_info"]

        check_label_values(
            [s["category_id"] for s in segments],
            self.num_classes,
            None,
            f"segments_info of {pan_file!r} (category_id)",
        )
        pan_ids = rgb2id(pan_rgb)
        listed = {s["id"] for s in segments} | {VOID_ID}
        unlisted = sorted(set(np.unique(pan_ids).tolist()) - listed)
        if unlisted:
            raise ValueError(
                f"{pan_file!r}: segment id(s) {unlisted[:10]} appear in the PNG but not in "
                f"segments_info (only id {VOID_ID} may be unlisted: it marks void pixels)"
            )
        return pan_rgb, pan_ids, [s for s in segments if not s.get("iscrowd", 0)]

    def category_map(self, pan_ids: np.ndarray, segments: List[dict]) -> np.ndarray:
        """H x W category ids of ``segments``; ``ignore_label`` elsewhere."""
        dtype = (
            np.uint8
            if max([self.ignore_label] + [s["category_id"] for s in segments]) < 256
            else np.int32
        )
        categories = np.full(pan_ids.shape, self.ignore_label, dtype=dtype)
        for segment in segments:
            categories[pan_ids == segment["id"]] = segment["category_id"]
        return categories

    def map_for_training(self, dataset_dict: dict) -> dict:
        image = self.read_image(dataset_dict)
        pan_rgb, pan_ids, segments = self.read_panoptic(dataset_dict, image)

        image, _, transforms = self.augment(image, self.category_map(pan_ids, segments))
        pan_ids = rgb2id(transforms.apply_segmentation(pan_rgb))

        classes, masks = [], []
        for segment in segments:
            mask = pan_ids == segment["id"]
            if mask.any():
                classes.append(int(segment["category_id"]))
                masks.append(mask)
        return self.finish(dataset_dict, image, classes, masks)
