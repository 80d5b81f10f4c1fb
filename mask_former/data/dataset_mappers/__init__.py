"""Dataset mappers, one per input format, chosen by ``INPUT.DATASET_MAPPER_NAME``.

Importing this package registers "mask_former_semantic", "mask_former_panoptic",
"mask_former_instance" and "detr_panoptic" in ``DATASET_MAPPER_REGISTRY``.
"""

from .build import DATASET_MAPPER_REGISTRY, build_dataset_mapper
from .augmentations import ColorAugSSDTransform, RandomChoiceAugmentation, RandomColorAugSSD
from .image_io import ImageReadError
from .mask_former_semantic_dataset_mapper import MaskFormerSemanticDatasetMapper
from .mask_former_panoptic_dataset_mapper import MaskFormerPanopticDatasetMapper
from .mask_former_instance_dataset_mapper import MaskFormerInstanceDatasetMapper
from .detr_panoptic_dataset_mapper import DETRPanopticDatasetMapper

__all__ = [
    "DATASET_MAPPER_REGISTRY",
    "build_dataset_mapper",
    "ColorAugSSDTransform",
    "RandomColorAugSSD",
    "RandomChoiceAugmentation",
    "ImageReadError",
    "MaskFormerSemanticDatasetMapper",
    "MaskFormerPanopticDatasetMapper",
    "MaskFormerInstanceDatasetMapper",
    "DETRPanopticDatasetMapper",
]
