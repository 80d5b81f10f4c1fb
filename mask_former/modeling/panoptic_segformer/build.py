"""Registries of Panoptic SegFormer's swappable parts, chosen by name in MODEL.PANOPTIC_SEGFORMER."""
from detectron2.utils.registry import Registry

from ...utils.registry import lookup

PSF_ENCODER_REGISTRY = Registry("PSF_ENCODER")
PSF_ENCODER_REGISTRY.__doc__ = """
Encoders of Panoptic SegFormer: backbone features -> multi-level tokens. A registered class is
``@configurable`` with ``from_config(cls, cfg, input_shape)``, declares ``num_levels`` and
``hidden_dim``, and its forward takes ``(features, image_padding_mask)`` and returns a
``mask_former.layers.MultiLevelTokens`` (encoded tokens, positional encodings, padding mask,
level layout).
"""

PSF_MASK_DECODER_REGISTRY = Registry("PSF_MASK_DECODER")
PSF_MASK_DECODER_REGISTRY.__doc__ = """
Mask decoders of Panoptic SegFormer: (thing queries, stuff queries, encoder tokens) -> per layer,
class logits and mask logits of every query. A registered class is ``@configurable`` with
``from_config(cls, cfg, num_thing_classes)``; see ``AttentionMaskDecoder.forward`` for the outputs.
Inference reads the last layer's outputs only: a forward that takes ``all_layers`` is called with
``all_layers=False`` there and may skip the other layers' outputs.
"""


def build_psf_encoder(cfg, input_shape):
    """The encoder named by ``MODEL.PANOPTIC_SEGFORMER.ENCODER_NAME``."""
    name = cfg.MODEL.PANOPTIC_SEGFORMER.ENCODER_NAME
    return lookup(PSF_ENCODER_REGISTRY, name, "MODEL.PANOPTIC_SEGFORMER.ENCODER_NAME")(cfg, input_shape)


def build_psf_mask_decoder(cfg, num_thing_classes: int):
    """The mask decoder named by ``MODEL.PANOPTIC_SEGFORMER.MASK_DECODER_NAME``."""
    name = cfg.MODEL.PANOPTIC_SEGFORMER.MASK_DECODER_NAME
    cls = lookup(PSF_MASK_DECODER_REGISTRY, name, "MODEL.PANOPTIC_SEGFORMER.MASK_DECODER_NAME")
    return cls(cfg, num_thing_classes)
