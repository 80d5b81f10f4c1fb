"""MaskFormer for detectron2. Importing this package registers its meta-architecture, heads, pixel
decoders, transformer decoders, backbones, dataset mappers and datasets."""
import os

# PyTorch's CPU allocator backs large tensors (>= 2 MB) with transparent huge pages when
# THP_MEM_ALLOC_ENABLE=1. Inference and post-processing make many short-lived tensors of 10-100 MB
# whose first touch otherwise costs a page fault per 4 KB (measured: a 100 MB copy 47 ms into a
# new tensor, 7 ms into an existing one; post-processing at 512x512 0.5-0.6x, R50 inference
# 0.7-0.9x with it). torch reads the variable at its first allocation of 2 MB or more, so
# importing mask_former before making large tensors is enough; set it to 0 beforehand to keep
# torch's default.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from . import (  # noqa: E402
    data,  # noqa: F401  (registers dataset mappers and datasets)
    model_zoo,  # noqa: F401  (the packaged configs: mask_former.model_zoo.get_config_file)
    modeling,  # noqa: F401  (registers meta-architectures, backbones, heads and decoders)
)
from .config import add_mask_former_config  # noqa: E402
from .demo import Predictor  # noqa: E402
from .modeling import MaskFormer, PanopticSegFormer  # noqa: E402

__all__ = ["add_mask_former_config", "MaskFormer", "PanopticSegFormer", "Predictor"]
