"""MaskFormer for detectron2. Importing this package registers its meta-architecture, heads, pixel
decoders, transformer decoders, backbones, dataset mappers and datasets."""
from . import (
    data,  # noqa: F401  (registers dataset mappers and datasets)
    model_zoo,  # noqa: F401  (the packaged configs: mask_former.model_zoo.get_config_file)
    modeling,  # noqa: F401  (registers meta-architectures, backbones, heads and decoders)
)
from .config import add_mask_former_config
from .demo import Predictor
from .modeling import MaskFormer, PanopticSegFormer

__all__ = ["add_mask_former_config", "MaskFormer", "PanopticSegFormer", "Predictor"]
