"""PIXEL_DECODER_REGISTRY: modules that turn backbone features into per-pixel embeddings,
chosen by MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME."""
from detectron2.utils.registry import Registry

from ...utils.registry import lookup

PIXEL_DECODER_REGISTRY = Registry("PIXEL_DECODER")
PIXEL_DECODER_REGISTRY.__doc__ = """
Pixel decoders for MaskFormer heads. A registered class is ``@configurable`` with
``from_config(cls, cfg, input_shape)``, a method
``forward_features(features) -> (mask_features, transformer_encoder_features)`` and two attributes
the heads read:

* ``mask_dim``: channels of ``mask_features`` (the per-pixel embeddings);
* ``transformer_encoder_channels``: channels of ``transformer_encoder_features``, or None when the
  decoder returns none (then MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE cannot be
  "transformer_encoder").
"""
REQUIRED_ATTRIBUTES = ("mask_dim", "transformer_encoder_channels")


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
    missing = [attr for attr in REQUIRED_ATTRIBUTES if not hasattr(model, attr)]
    if missing:
        raise ValueError(
            f"Pixel decoder {name} must declare the attribute(s) {', '.join(missing)} "
            "(see PIXEL_DECODER_REGISTRY's documentation)"
        )
    return model
