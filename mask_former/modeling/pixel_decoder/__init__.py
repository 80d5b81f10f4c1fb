from .build import PIXEL_DECODER_REGISTRY, build_pixel_decoder
from .fpn import BasePixelDecoder, TransformerEncoderPixelDecoder
from .msdeformattn import MSDeformAttnPixelDecoder
