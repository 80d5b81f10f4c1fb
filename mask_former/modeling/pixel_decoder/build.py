"""PIXEL_DECODER_REGISTRY: modules that turn backbone features into per-pixel embeddings,
chosen by MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME."""
from detectron2.utils.registry import Registry

from ...utils.registry import lookup

PIXEL_DECODER_REGISTRY = Registry("PIXEL_DECODER")
PIXEL_DECODER_REGISTRY.__doc__ = """
Pixel decoders for MaskFormer heads. A registered class is ``@configurable`` with
``from_config(cls, cfg, input_shape)``, has a ``mask_dim`` attribute and a method
``forward_features(features) -> (mask_features, transformer_encoder_features)``.
"""


def build_pixel_decoder(cfg, input_shape):
    """Build the pixel decoder named by ``cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME``.

    Args:
        input_shape: dict of backbone feature name -> ShapeSpec.
    """
    name = cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME
    cls = lookup(PIXEL_DECODER_REGISTRY, name, "MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME")
    model = cls(cfg, input_shape)
    if not callable(getattr(model, "forward_features", None)):
        raise ValueError(
            f"Pixel decoder {name} must define forward_features(features) -> "
            "(mask_features, transformer_encoder_features)"
        )
    return model
