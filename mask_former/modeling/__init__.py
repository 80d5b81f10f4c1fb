from .backbone import D2SwinTransformer
from .heads import MaskFormerHead, PerPixelBaselineHead, PerPixelBaselinePlusHead
from .meta_arch import MaskFormer, PanopticSegFormer
from .pixel_decoder import PIXEL_DECODER_REGISTRY, build_pixel_decoder
from .transformer_decoder import TRANSFORMER_DECODER_REGISTRY, build_transformer_decoder
