"""Pixel decoder with a multi-scale deformable-attention encoder (Deformable DETR's encoder, as in
Mask2Former and Panoptic SegFormer) in place of the FPN's coarse levels."""
from typing import Dict, List, Optional, Tuple

import fvcore.nn.weight_init as weight_init
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from torch import Tensor, nn
from torch.nn import functional as F

from ...layers import MultiScaleDeformableEncoder
from ..transformer_decoder.position_encoding import PositionEmbeddingSine
from .build import PIXEL_DECODER_REGISTRY

GROUP_NORM_GROUPS = 32


@PIXEL_DECODER_REGISTRY.register()
class MSDeformAttnPixelDecoder(nn.Module):
    """Deformable encoder over several backbone levels, then an FPN step to the finer ones.

    1. Each encoder feature (default res3, res4, res5: strides 8, 16, 32) is projected to
       ``conv_dim`` channels by a 1x1 conv + GroupNorm(32) (``input_proj.i``).
    2. A ``MultiScaleDeformableEncoder`` (``transformer``: sine positional encoding plus a learned
       level embedding, multi-scale deformable self-attention over all levels' tokens) encodes them.
    3. From the finest encoded map, every finer input feature (default res2, stride 4) is added
       FPN-style: 1x1 lateral conv (``adapter_i``) plus the upsampled map, then a 3x3 conv
       (``layer_i``), both with ``norm``.
    4. A 3x3 conv (``mask_features``) gives the per-pixel embeddings.

    Declared for the heads: ``mask_dim`` (channels of ``mask_features``) and
    ``transformer_encoder_channels`` (``conv_dim``: the second output of ``forward_features`` is
    the encoded coarsest map).
    """

    @configurable
    def __init__(self, input_shape: Dict[str, ShapeSpec], *, transformer_in_features: List[str],
                 conv_dim: int, mask_dim: int, norm: Optional[str], transformer_enc_layers: int,
                 transformer_nheads: int, transformer_n_points: int, transformer_dim_feedforward: int,
                 transformer_dropout: float):
        """
        Args:
            input_shape: backbone features this decoder uses, name -> ShapeSpec; must include
                ``transformer_in_features``. Those finer than the finest of them get the FPN step.
            transformer_in_features: features the deformable encoder works on, one level each.
            conv_dim: channels of the encoder and of the FPN step; a multiple of 32 (GroupNorm).
            mask_dim: channels of the output per-pixel embeddings.
            norm: normalization of the FPN convs ("GN" in MaskFormer).
            transformer_enc_layers: encoder layers (>= 1).
            transformer_nheads, transformer_n_points: heads and sampling points per head and
                level of the deformable attention.
            transformer_dim_feedforward: hidden channels of the encoder's feed-forward networks.
            transformer_dropout: dropout in the encoder layers.
        """
        super().__init__()
        if mask_dim < 1:
            raise ValueError(f"MODEL.SEM_SEG_HEAD.MASK_DIM must be >= 1, got {mask_dim}")
        if transformer_enc_layers < 1:
            raise ValueError(
                "MSDeformAttnPixelDecoder needs MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS >= 1, got "
                f"{transformer_enc_layers}; use BasePixelDecoder for no encoder"
            )
        if conv_dim % GROUP_NORM_GROUPS != 0:
            raise ValueError(
                f"MSDeformAttnPixelDecoder: MODEL.SEM_SEG_HEAD.CONVS_DIM={conv_dim} must be a multiple "
                f"of {GROUP_NORM_GROUPS} (GroupNorm groups of the input projections)"
            )
        if conv_dim % transformer_nheads != 0:
            raise ValueError(
                f"MSDeformAttnPixelDecoder: MODEL.SEM_SEG_HEAD.CONVS_DIM={conv_dim} must be divisible by "
                f"MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS={transformer_nheads}"
            )
        missing = [f for f in transformer_in_features if f not in input_shape]
        if missing or not transformer_in_features:
            raise KeyError(
                "MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES="
                f"{list(transformer_in_features)} must be a non-empty subset of the decoder's input "
                f"features (MODEL.SEM_SEG_HEAD.IN_FEATURES: {sorted(input_shape)})"
            )
        by_stride = sorted(input_shape.items(), key=lambda kv: kv[1].stride)
        encoder_shapes = [(n, s) for n, s in by_stride if n in transformer_in_features]  # fine to coarse
        finest_encoded = encoder_shapes[0][1].stride
        fpn_shapes = [(n, s) for n, s in by_stride if s.stride < finest_encoded]  # fine to coarse

        self.transformer_in_features = [n for n, _ in encoder_shapes]
        self.mask_dim = mask_dim
        self.transformer_encoder_channels = conv_dim

        self.input_proj = nn.ModuleList()
        for _, shape in encoder_shapes:
            proj = nn.Sequential(nn.Conv2d(shape.channels, conv_dim, kernel_size=1),
                                 nn.GroupNorm(GROUP_NORM_GROUPS, conv_dim))
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)
            self.input_proj.append(proj)
        self.transformer = MultiScaleDeformableEncoder(
            num_levels=len(encoder_shapes), num_layers=transformer_enc_layers, d_model=conv_dim,
            n_heads=transformer_nheads, n_points=transformer_n_points,
            d_ffn=transformer_dim_feedforward, dropout=transformer_dropout,
        )
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)

        use_bias = norm == ""
        self.fpn_features = [n for n, _ in fpn_shapes]
        lateral_convs, output_convs = [], []
        for idx, (_, shape) in enumerate(fpn_shapes):
            lateral = Conv2d(shape.channels, conv_dim, kernel_size=1, bias=use_bias,
                             norm=get_norm(norm, conv_dim))
            output = Conv2d(conv_dim, conv_dim, kernel_size=3, stride=1, padding=1, bias=use_bias,
                            norm=get_norm(norm, conv_dim), activation=F.relu)
            weight_init.c2_xavier_fill(lateral)
            weight_init.c2_xavier_fill(output)
            self.add_module(f"adapter_{idx + 1}", lateral)
            self.add_module(f"layer_{idx + 1}", output)
            lateral_convs.append(lateral)
            output_convs.append(output)
        # Processed coarse to fine in forward.
        self.lateral_convs = lateral_convs[::-1]
        self.output_convs = output_convs[::-1]

        self.mask_features = Conv2d(conv_dim, mask_dim, kernel_size=3, stride=1, padding=1)
        weight_init.c2_xavier_fill(self.mask_features)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        head = cfg.MODEL.SEM_SEG_HEAD
        missing = [f for f in head.IN_FEATURES if f not in input_shape]
        if missing:
            raise KeyError(
                f"MODEL.SEM_SEG_HEAD.IN_FEATURES names {missing}, which the backbone does not output "
                f"(it outputs {sorted(input_shape)})"
            )
        return {
            "input_shape": {k: input_shape[k] for k in head.IN_FEATURES},
            "transformer_in_features": list(head.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES),
            "conv_dim": head.CONVS_DIM,
            "mask_dim": head.MASK_DIM,
            "norm": head.NORM,
            "transformer_enc_layers": head.TRANSFORMER_ENC_LAYERS,
            "transformer_nheads": head.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS,
            "transformer_n_points": head.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS,
            "transformer_dim_feedforward": head.DEFORMABLE_TRANSFORMER_ENCODER_DIM_FEEDFORWARD,
            "transformer_dropout": cfg.MODEL.MASK_FORMER.DROPOUT,
        }

    def forward_features(self, features: Dict[str, Tensor]) -> Tuple[Tensor, Tensor]:
        """
        Args:
            features: backbone outputs, name -> B x C x H_s x W_s.
        Returns:
            mask_features: B x mask_dim x H_f x W_f at the finest input stride (4 with res2).
            transformer_encoder_features: B x conv_dim x H_32 x W_32, the encoded coarsest level.
        """
        srcs = [proj(features[name]) for proj, name in zip(self.input_proj, self.transformer_in_features)]
        pos = [self.pe_layer(src) for src in srcs]
        encoded, _ = self.transformer(srcs, masks=None, pos=pos)
        y = encoded[0]
        for name, lateral_conv, output_conv in zip(self.fpn_features[::-1], self.lateral_convs, self.output_convs):
            lateral = lateral_conv(features[name])
            y = output_conv(lateral + F.interpolate(y, size=lateral.shape[-2:], mode="nearest"))
        return self.mask_features(y), encoded[-1]

    def forward(self, features, targets=None):
        raise NotImplementedError("Use forward_features(); a pixel decoder is not called directly")
