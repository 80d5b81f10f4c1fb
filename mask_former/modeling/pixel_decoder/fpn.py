"""FPN-style pixel decoders: a top-down pathway with lateral connections that ends in stride-4
per-pixel embeddings ("mask features")."""
from typing import Dict, Optional, Tuple

import fvcore.nn.weight_init as weight_init
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from torch import Tensor, nn
from torch.nn import functional as F

from ..transformer_decoder.position_encoding import PositionEmbeddingSine
from ..transformer_decoder.transformer import Transformer
from .build import PIXEL_DECODER_REGISTRY


def _sorted_features(input_shape: Dict[str, ShapeSpec], in_features) -> Dict[str, ShapeSpec]:
    missing = [f for f in in_features if f not in input_shape]
    if missing:
        raise KeyError(
            f"MODEL.SEM_SEG_HEAD.IN_FEATURES names {missing}, which the backbone does not output "
            f"(it outputs {sorted(input_shape)})"
        )
    shapes = {k: input_shape[k] for k in in_features}
    return dict(sorted(shapes.items(), key=lambda kv: kv[1].stride))


@PIXEL_DECODER_REGISTRY.register()
class BasePixelDecoder(nn.Module):
    """FPN with GroupNorm: from the coarsest feature down to the finest, each level adds a 1x1
    lateral projection (``adapter_i``) to the upsampled coarser output and refines it with a 3x3
    conv (``layer_i``); a final 3x3 conv (``mask_features``) gives the per-pixel embeddings at the
    finest stride (4 for ResNet/Swin res2).

    Declared for the heads: ``mask_dim`` (channels of ``mask_features``) and
    ``transformer_encoder_channels`` (channels of the second output of ``forward_features``; None
    since this decoder has no encoder)."""

    transformer_encoder_channels: Optional[int] = None

    @configurable
    def __init__(self, input_shape: Dict[str, ShapeSpec], *, conv_dim: int, mask_dim: int,
                 norm: Optional[str] = None):
        """
        Args:
            input_shape: backbone features this decoder uses, name -> ShapeSpec.
            conv_dim: channels of the intermediate FPN features.
            mask_dim: channels of the output per-pixel embeddings.
            norm: normalization of the FPN convs ("GN" in MaskFormer).
        """
        super().__init__()
        if mask_dim < 1:
            raise ValueError(f"MODEL.SEM_SEG_HEAD.MASK_DIM must be >= 1, got {mask_dim}")
        shapes = list(input_shape.items())  # fine to coarse
        self.in_features = [name for name, _ in shapes]
        self.mask_dim = mask_dim
        use_bias = norm == ""
        lateral_convs, output_convs = [], []
        for idx, (_, shape) in enumerate(shapes):
            if idx == len(shapes) - 1:
                lateral_conv = None
                output_conv = self._build_output_conv(
                    self._coarsest_input_channels(shape, conv_dim), conv_dim, use_bias, norm
                )
            else:
                lateral_conv = Conv2d(shape.channels, conv_dim, kernel_size=1, bias=use_bias,
                                      norm=get_norm(norm, conv_dim))
                weight_init.c2_xavier_fill(lateral_conv)
                self.add_module(f"adapter_{idx + 1}", lateral_conv)
                output_conv = self._build_output_conv(conv_dim, conv_dim, use_bias, norm)
            self.add_module(f"layer_{idx + 1}", output_conv)
            lateral_convs.append(lateral_conv)
            output_convs.append(output_conv)
        # Processed coarse to fine in forward.
        self.lateral_convs = lateral_convs[::-1]
        self.output_convs = output_convs[::-1]
        self.mask_features = Conv2d(conv_dim, mask_dim, kernel_size=3, stride=1, padding=1)
        weight_init.c2_xavier_fill(self.mask_features)

    @staticmethod
    def _coarsest_input_channels(shape: ShapeSpec, conv_dim: int) -> int:
        """Channels entering the coarsest level's output conv: the backbone feature's here."""
        return shape.channels

    @staticmethod
    def _build_output_conv(in_channels, conv_dim, use_bias, norm):
        conv = Conv2d(in_channels, conv_dim, kernel_size=3, stride=1, padding=1, bias=use_bias,
                      norm=get_norm(norm, conv_dim), activation=F.relu)
        weight_init.c2_xavier_fill(conv)
        return conv

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        head = cfg.MODEL.SEM_SEG_HEAD
        return {
            "input_shape": _sorted_features(input_shape, head.IN_FEATURES),
            "conv_dim": head.CONVS_DIM,
            "mask_dim": head.MASK_DIM,
            "norm": head.NORM,
        }

    def _top_down(self, features: Dict[str, Tensor], top: Optional[Tensor] = None) -> Tensor:
        """Run the top-down pathway; ``top`` replaces the coarsest feature's output if given."""
        y = None
        for idx, name in enumerate(self.in_features[::-1]):
            x = features[name]
            if idx == 0:
                y = self.output_convs[0](x if top is None else top)
            else:
                lateral = self.lateral_convs[idx](x)
                y = lateral + F.interpolate(y, size=lateral.shape[-2:], mode="nearest")
                y = self.output_convs[idx](y)
        return self.mask_features(y)

    def forward_features(self, features: Dict[str, Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
        """
        Args:
            features: backbone outputs, name -> B x C x H_s x W_s.
        Returns:
            mask_features: B x mask_dim x H_4 x W_4 (the finest input stride).
            transformer_encoder_features: None (this decoder has no transformer encoder).
        """
        return self._top_down(features), None

    def forward(self, features, targets=None):
        raise NotImplementedError("Use forward_features(); a pixel decoder is not called directly")


@PIXEL_DECODER_REGISTRY.register()
class TransformerEncoderPixelDecoder(BasePixelDecoder):
    """``BasePixelDecoder`` whose coarsest feature first goes through a DETR transformer encoder
    (``input_proj`` 1x1 conv, sine positional encoding, ``transformer.encoder``). The encoded
    feature is also returned, so the transformer decoder can attend to it
    (MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE = "transformer_encoder")."""

    @configurable
    def __init__(self, input_shape: Dict[str, ShapeSpec], *, transformer_dropout: float,
                 transformer_nheads: int, transformer_dim_feedforward: int,
                 transformer_enc_layers: int, transformer_pre_norm: bool, conv_dim: int,
                 mask_dim: int, norm: Optional[str] = None):
        super().__init__(input_shape, conv_dim=conv_dim, mask_dim=mask_dim, norm=norm)
        if transformer_enc_layers < 1:
            raise ValueError(
                "TransformerEncoderPixelDecoder needs MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS >= 1, "
                f"got {transformer_enc_layers}; use BasePixelDecoder for none"
            )
        coarsest = list(input_shape.values())[-1]
        self.input_proj = Conv2d(coarsest.channels, conv_dim, kernel_size=1)
        weight_init.c2_xavier_fill(self.input_proj)
        self.transformer = Transformer(
            d_model=conv_dim,
            dropout=transformer_dropout,
            nhead=transformer_nheads,
            dim_feedforward=transformer_dim_feedforward,
            num_encoder_layers=transformer_enc_layers,
            num_decoder_layers=0,
            normalize_before=transformer_pre_norm,
        )
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)
        self.transformer_encoder_channels = conv_dim

    @staticmethod
    def _coarsest_input_channels(shape: ShapeSpec, conv_dim: int) -> int:
        """The coarsest level starts from the encoder's conv_dim channels."""
        return conv_dim

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        ret = super().from_config(cfg, input_shape)
        mf = cfg.MODEL.MASK_FORMER
        ret.update(
            transformer_dropout=mf.DROPOUT,
            transformer_nheads=mf.NHEADS,
            transformer_dim_feedforward=mf.DIM_FEEDFORWARD,
            transformer_enc_layers=cfg.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS,
            transformer_pre_norm=mf.PRE_NORM,
        )
        return ret

    def forward_features(self, features: Dict[str, Tensor]) -> Tuple[Tensor, Tensor]:
        """
        Returns:
            mask_features: B x mask_dim x H_4 x W_4.
            transformer_encoder_features: B x conv_dim x H_32 x W_32, the encoded coarsest feature.
        """
        coarsest = self.input_proj(features[self.in_features[-1]])
        encoded = self.transformer.encode(coarsest, None, self.pe_layer(coarsest))
        return self._top_down(features, top=encoded), encoded
