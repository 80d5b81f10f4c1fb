"""Checkpoints: saving and loading (atomic writes, the published key layout) and conversion of
HuggingFace MaskFormer checkpoints."""
from .checkpointer import MaskFormerCheckpointer, check_weights_available
from .published_layout import remap_published_keys

__all__ = ["MaskFormerCheckpointer", "check_weights_available", "remap_published_keys"]
