"""MaskFormer's segmentation head: pixel decoder + query decoder."""
import logging
from typing import Dict

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from torch import Tensor, nn

from ..pixel_decoder import build_pixel_decoder
from ..transformer_decoder import build_transformer_decoder


def check_num_classes(num_classes: int) -> int:
    if num_classes < 1:
        raise ValueError(f"MODEL.SEM_SEG_HEAD.NUM_CLASSES must be >= 1, got {num_classes}")
    return num_classes


def remap_flat_pixel_decoder_keys(state_dict, prefix: str, submodules=("predictor.", "pixel_decoder.")):
    """Published MaskFormer checkpoints keep the pixel decoder's weights directly under the head
    (``sem_seg_head.adapter_1.weight``); here they live in ``sem_seg_head.pixel_decoder``. Move
    every head key that belongs to no known submodule under ``pixel_decoder.`` (in place)."""
    moved = 0
    for key in list(state_dict.keys()):
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        if any(rest.startswith(s) for s in submodules):
            continue
        state_dict[prefix + "pixel_decoder." + rest] = state_dict.pop(key)
        moved += 1
    if moved:
        logging.getLogger(__name__).info(
            f"Moved {moved} pixel-decoder weights of a published checkpoint under {prefix}pixel_decoder."
        )


@SEM_SEG_HEADS_REGISTRY.register()
class MaskFormerHead(nn.Module):
    """Runs the pixel decoder on the backbone features and the query decoder on the feature named
    by MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE (a backbone feature, or "transformer_encoder" for
    the pixel decoder's encoded coarsest feature)."""

    @configurable
    def __init__(self, *, num_classes: int, pixel_decoder: nn.Module, transformer_predictor: nn.Module,
                 transformer_in_feature: str, loss_weight: float = 1.0, ignore_value: int = -1):
        """
        Args:
            num_classes: K.
            pixel_decoder: makes per-pixel embeddings (see PIXEL_DECODER_REGISTRY).
            transformer_predictor: the query decoder (see TRANSFORMER_DECODER_REGISTRY).
            transformer_in_feature: what the query decoder attends to.
            loss_weight, ignore_value: kept for config compatibility with detectron2's heads.
        """
        super().__init__()
        self.num_classes = check_num_classes(num_classes)
        self.pixel_decoder = pixel_decoder
        self.predictor = transformer_predictor
        self.transformer_in_feature = transformer_in_feature
        self.loss_weight = loss_weight
        self.ignore_value = ignore_value

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        in_feature = cfg.MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE
        if in_feature == "transformer_encoder":
            if cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME == "BasePixelDecoder":
                raise ValueError(
                    "MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE='transformer_encoder' needs a pixel "
                    "decoder with a transformer encoder (e.g. TransformerEncoderPixelDecoder), but "
                    "MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME='BasePixelDecoder'"
                )
            in_channels = cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM
        elif in_feature in input_shape:
            in_channels = input_shape[in_feature].channels
        else:
            raise KeyError(
                f"MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE={in_feature!r} is neither "
                f"'transformer_encoder' nor a backbone feature ({sorted(input_shape)})"
            )
        return {
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "pixel_decoder": build_pixel_decoder(cfg, input_shape),
            "transformer_predictor": build_transformer_decoder(cfg, in_channels, mask_classification=True),
            "transformer_in_feature": in_feature,
            "loss_weight": cfg.MODEL.SEM_SEG_HEAD.LOSS_WEIGHT,
            "ignore_value": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
        }

    def forward(self, features: Dict[str, Tensor]) -> Dict[str, object]:
        """
        Args:
            features: backbone outputs, name -> B x C x H_s x W_s.
        Returns:
            the query decoder's outputs: "pred_logits" B x Q x (K+1), "pred_masks" B x Q x H_4 x W_4
            and, in training with deep supervision, "aux_outputs".
        """
        mask_features, encoder_features = self.pixel_decoder.forward_features(features)
        if self.transformer_in_feature == "transformer_encoder":
            query_input = encoder_features
        else:
            query_input = features[self.transformer_in_feature]
        return self.predictor(query_input, mask_features)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        remap_flat_pixel_decoder_keys(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
