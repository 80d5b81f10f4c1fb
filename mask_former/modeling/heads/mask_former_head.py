"""MaskFormer's segmentation head: pixel decoder + transformer decoder."""
from typing import Dict

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from torch import Tensor, nn

from ..pixel_decoder import build_pixel_decoder
from ..transformer_decoder import build_transformer_decoder

TRANSFORMER_ENCODER_FEATURE = "transformer_encoder"


def check_num_classes(num_classes: int) -> int:
    if num_classes < 1:
        raise ValueError(f"MODEL.SEM_SEG_HEAD.NUM_CLASSES must be >= 1, got {num_classes}")
    return num_classes


def transformer_in_channels(in_feature: str, pixel_decoder: nn.Module,
                            input_shape: Dict[str, ShapeSpec]) -> int:
    """Channels of the feature the transformer decoder attends to: the pixel decoder's encoded
    feature (its declared ``transformer_encoder_channels``) or a backbone feature."""
    if in_feature == TRANSFORMER_ENCODER_FEATURE:
        channels = pixel_decoder.transformer_encoder_channels
        if channels is None:
            raise ValueError(
                f"MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE={TRANSFORMER_ENCODER_FEATURE!r} needs a "
                "pixel decoder with a transformer encoder (e.g. TransformerEncoderPixelDecoder), but "
                f"{type(pixel_decoder).__name__} has none (transformer_encoder_channels is None)"
            )
        return channels
    if in_feature in input_shape:
        return input_shape[in_feature].channels
    raise KeyError(
        f"MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE={in_feature!r} is neither "
        f"{TRANSFORMER_ENCODER_FEATURE!r} nor a backbone feature ({sorted(input_shape)})"
    )


def run_pixel_and_transformer_decoders(pixel_decoder: nn.Module, predictor: nn.Module,
                                       transformer_in_feature: str, features: Dict[str, Tensor]):
    """The pixel decoder on the backbone features, then the transformer decoder on the feature
    named by ``transformer_in_feature`` with the per-pixel embeddings."""
    mask_features, encoder_features = pixel_decoder.forward_features(features)
    if transformer_in_feature == TRANSFORMER_ENCODER_FEATURE:
        query_input = encoder_features
    else:
        query_input = features[transformer_in_feature]
    return predictor(query_input, mask_features)


@SEM_SEG_HEADS_REGISTRY.register()
class MaskFormerHead(nn.Module):
    """Runs the pixel decoder on the backbone features and the transformer decoder on the feature
    named by MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE (a backbone feature, or "transformer_encoder"
    for the pixel decoder's encoded coarsest feature)."""

    @configurable
    def __init__(self, *, num_classes: int, pixel_decoder: nn.Module, transformer_predictor: nn.Module,
                 transformer_in_feature: str):
        """
        Args:
            num_classes: K.
            pixel_decoder: makes per-pixel embeddings (see PIXEL_DECODER_REGISTRY).
            transformer_predictor: the transformer decoder (see TRANSFORMER_DECODER_REGISTRY), kept
                as ``self.predictor`` (the published checkpoints' name).
            transformer_in_feature: what the transformer decoder attends to.
        """
        super().__init__()
        self.num_classes = check_num_classes(num_classes)
        self.pixel_decoder = pixel_decoder
        self.predictor = transformer_predictor
        self.transformer_in_feature = transformer_in_feature

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        in_feature = cfg.MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE
        pixel_decoder = build_pixel_decoder(cfg, input_shape)
        in_channels = transformer_in_channels(in_feature, pixel_decoder, input_shape)
        return {
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "pixel_decoder": pixel_decoder,
            "transformer_predictor": build_transformer_decoder(cfg, in_channels, mask_classification=True),
            "transformer_in_feature": in_feature,
        }

    def forward(self, features: Dict[str, Tensor]) -> Dict[str, object]:
        """
        Args:
            features: backbone outputs, name -> B x C x H_s x W_s.
        Returns:
            the transformer decoder's outputs: "pred_logits" B x Q x (K+1), "pred_masks"
            B x Q x H_4 x W_4 and, in training with deep supervision, "aux_outputs".
        """
        return run_pixel_and_transformer_decoders(
            self.pixel_decoder, self.predictor, self.transformer_in_feature, features
        )
