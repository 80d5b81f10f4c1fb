"""Panoptic mapper with DETR's augmentation, used by the COCO panoptic configs."""

from detectron2.config import configurable

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

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        augmentations,
        image_format: str,
        num_classes: int,
        ignore_label: int,
        size_divisibility: int = -1,
    ):
        """Arguments as in :class:`MaskFormerPanopticDatasetMapper`."""
        super().__init__(
            is_train,
            augmentations=augmentations,
            image_format=image_format,
            num_classes=num_classes,
            ignore_label=ignore_label,
            size_divisibility=size_divisibility,
        )

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        ret = cls.base_config(cfg, is_train)
        if is_train:
            ret["augmentations"] = build_detr_train_augmentations(cfg)
        return ret
