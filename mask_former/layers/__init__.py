"""Generic building blocks below ``modeling``: they import nothing from the rest of mask_former."""
from .context_switch import ContextSwitch
from .deformable_transformer import (
    DeformableTransformerEncoder,
    DeformableTransformerEncoderLayer,
    MultiLevelTokens,
    MultiScaleDeformableEncoder,
    flatten_levels,
    split_levels,
    valid_ratios_of_mask,
)
from .fused_linear import LINEAR_ACTIVATIONS, linear
from .inference_kernels import inference_kernels, inference_kernels_enabled
from .ms_deform_attn import MSDeformAttn, ms_deform_attn
from .point_sampling import BilinearPoints, interleaved_rows, raster_order
from .winograd_conv import is_winograd_conv, winograd_conv2d

__all__ = [
    "BilinearPoints",
    "ContextSwitch",
    "DeformableTransformerEncoder",
    "DeformableTransformerEncoderLayer",
    "LINEAR_ACTIVATIONS",
    "MSDeformAttn",
    "MultiLevelTokens",
    "MultiScaleDeformableEncoder",
    "flatten_levels",
    "inference_kernels",
    "inference_kernels_enabled",
    "interleaved_rows",
    "is_winograd_conv",
    "linear",
    "ms_deform_attn",
    "raster_order",
    "split_levels",
    "valid_ratios_of_mask",
    "winograd_conv2d",
]
