"""Dataset mappers, one per input format, chosen by ``INPUT.DATASET_MAPPER_NAME``.

Importing this package registers "mask_former_semantic", "mask_former_panoptic",
"mask_former_instance" and "detr_panoptic" in ``DATASET_MAPPER_REGISTRY``.
"""

from .augmentations import ColorAugSSDTransform, RandomChoiceAugmentation, RandomColorAugSSD
from .base import (
    NoReadableSampleError,
    StopWhenNothingReadable,
    check_num_classes,
    read_semantic_label,
)
from .build import DATASET_MAPPER_REGISTRY, build_dataset_mapper
from .detr_panoptic_dataset_mapper import DETRPanopticDatasetMapper
from .image_io import ImageReadError, read_image
from .mask_former_instance_dataset_mapper import MaskFormerInstanceDatasetMapper
from .mask_former_panoptic_dataset_mapper import MaskFormerPanopticDatasetMapper
from .mask_former_semantic_dataset_mapper import MaskFormerSemanticDatasetMapper

__all__ = [
    "DATASET_MAPPER_REGISTRY",
    "build_dataset_mapper",
    "ColorAugSSDTransform",
    "RandomColorAugSSD",
    "RandomChoiceAugmentation",
    "ImageReadError",
    "read_image",
    "read_semantic_label",
    "check_num_classes",
    "NoReadableSampleError",
    "StopWhenNothingReadable",
    "MaskFormerSemanticDatasetMapper",
    "MaskFormerPanopticDatasetMapper",
    "MaskFormerInstanceDatasetMapper",
    "DETRPanopticDatasetMapper",
]
