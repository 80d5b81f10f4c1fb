"""TRANSFORMER_DECODER_REGISTRY: the query decoders ("predictors") that turn image features into
(class, mask embedding) pairs, chosen by MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME."""
from detectron2.utils.registry import Registry

from ...utils.registry import lookup

TRANSFORMER_DECODER_REGISTRY = Registry("TRANSFORMER_MODULE")
TRANSFORMER_DECODER_REGISTRY.__doc__ = """
Query decoders for MaskFormer heads. A registered class is ``@configurable`` with
``from_config(cls, cfg, in_channels, mask_classification)`` and its forward takes
``(x, mask_features)`` and returns a dict with "pred_masks" (and "pred_logits", "aux_outputs").
"""


def build_transformer_decoder(cfg, in_channels: int, mask_classification: bool = True):
    """Build the query decoder named by ``cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME``."""
    name = cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME
    cls = lookup(TRANSFORMER_DECODER_REGISTRY, name, "MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME")
    return cls(cfg, in_channels, mask_classification)
