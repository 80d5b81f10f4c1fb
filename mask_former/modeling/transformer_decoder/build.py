"""TRANSFORMER_DECODER_REGISTRY: the transformer decoders that turn N learned queries and image
features into N (class, mask embedding) pairs, chosen by MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME.

A head holds its transformer decoder as the attribute ``predictor``: that is the name under which
the published MaskFormer checkpoints store its weights (``sem_seg_head.predictor.*``)."""
from detectron2.utils.registry import Registry

from ...utils.registry import lookup

TRANSFORMER_DECODER_REGISTRY = Registry("TRANSFORMER_DECODER")
TRANSFORMER_DECODER_REGISTRY.__doc__ = """
Transformer decoders for MaskFormer heads. A registered class is ``@configurable`` with
``from_config(cls, cfg, in_channels, mask_classification)`` and its forward takes
``(x, mask_features)`` and returns a dict with "pred_masks" (and "pred_logits", "aux_outputs").
"""


def build_transformer_decoder(cfg, in_channels: int, mask_classification: bool = True):
    """Build the transformer decoder named by ``cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME``."""
    name = cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME
    cls = lookup(TRANSFORMER_DECODER_REGISTRY, name, "MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME")
    return cls(cfg, in_channels, mask_classification)
