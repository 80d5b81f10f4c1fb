"""Panoptic SegFormer's parts: the encoder, the location decoder (with its optional query selection
among the encoder's proposals and denoising queries), the mask decoder and the criterion. The
meta-architecture is ``modeling/meta_arch/panoptic_segformer.py``."""
from .build import PSF_ENCODER_REGISTRY, PSF_MASK_DECODER_REGISTRY, build_psf_encoder, build_psf_mask_decoder
from .criterion import BoxMaskMatcher, PanopticSegFormerCriterion, focal_class_cost
from .denoising import DenoisingBatch, DenoisingQueries
from .encoder import DeformableEncoder, sine_position_encoding
from .location_decoder import LocationDecoder
from .mask_decoder import AttentionMaskDecoder
from .query_selection import EncoderProposals

__all__ = [
    "PSF_ENCODER_REGISTRY",
    "PSF_MASK_DECODER_REGISTRY",
    "build_psf_encoder",
    "build_psf_mask_decoder",
    "BoxMaskMatcher",
    "PanopticSegFormerCriterion",
    "focal_class_cost",
    "DeformableEncoder",
    "sine_position_encoding",
    "LocationDecoder",
    "AttentionMaskDecoder",
    "EncoderProposals",
    "DenoisingBatch",
    "DenoisingQueries",
]
