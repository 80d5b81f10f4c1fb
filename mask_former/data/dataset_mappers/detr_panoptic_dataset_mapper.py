"""Panoptic mapper with DETR's augmentation, used by the COCO panoptic configs."""

from .augmentations import build_detr_train_augmentations
from .base import register_mapper
from .mask_former_panoptic_dataset_mapper import MaskFormerPanopticDatasetMapper

__all__ = ["DETRPanopticDatasetMapper"]


@register_mapper("detr_panoptic")
class DETRPanopticDatasetMapper(MaskFormerPanopticDatasetMapper):
    """
    Same inputs and targets as :class:`MaskFormerPanopticDatasetMapper`, with DETR's training
    augmentation (see :func:`build_detr_train_augmentations`): random flip, then either a plain
    resize or resize -> random crop -> resize. The configs leave ``INPUT.SIZE_DIVISIBILITY`` at -1,
    so nothing is padded (the model pads its batch); a positive value is honoured.
    """

    @staticmethod
    def train_augmentations(cfg, ignore_label: int):
        return build_detr_train_augmentations(cfg)
