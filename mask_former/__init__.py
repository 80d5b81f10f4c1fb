"""MaskFormer for detectron2. Importing this package registers its meta-architecture, heads, pixel
decoders, query decoders, backbones, dataset mappers and datasets."""
from . import data  # noqa: F401  (registers dataset mappers and datasets)
from . import modeling  # noqa: F401  (registers backbones, heads, pixel and query decoders)
from .config import add_mask_former_config
from .maskformer_model import MaskFormer

__all__ = ["add_mask_former_config", "MaskFormer"]
