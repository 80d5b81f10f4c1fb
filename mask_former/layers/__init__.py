"""Generic building blocks below ``modeling``: they import nothing from the rest of mask_former."""
from .deformable_transformer import (
    DeformableTransformerEncoder,
    DeformableTransformerEncoderLayer,
    MultiLevelTokens,
    MultiScaleDeformableEncoder,
    flatten_levels,
    split_levels,
    valid_ratios_of_mask,
)
from .ms_deform_attn import MSDeformAttn, ms_deform_attn

__all__ = [
    "DeformableTransformerEncoder",
    "DeformableTransformerEncoderLayer",
    "MSDeformAttn",
    "MultiLevelTokens",
    "MultiScaleDeformableEncoder",
    "flatten_levels",
    "ms_deform_attn",
    "split_levels",
    "valid_ratios_of_mask",
]
