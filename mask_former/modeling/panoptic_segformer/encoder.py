"""Panoptic SegFormer's encoder: a neck that maps backbone features of strides 8/16/32 to a common
width (plus extra coarser levels), a sine positional encoding, and a deformable transformer
encoder over all levels."""
import math
from typing import Dict, List, Sequence

import fvcore.nn.weight_init as weight_init
import torch
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec
from torch import Tensor, nn
from torch.nn import functional as F

from ...layers import MultiLevelTokens, MultiScaleDeformableEncoder
from .build import PSF_ENCODER_REGISTRY


def sine_position_encoding(padding_mask: Tensor, num_feats: int, temperature: float = 10000.0,
                           offset: float = -0.5, eps: float = 1e-6) -> Tensor:
    """Normalized sine positional encoding of each valid pixel's (y, x) position.

    Positions count valid pixels from 1, are shifted by ``offset`` and normalized to [0, 2 pi]
    by the valid height / width, as in Panoptic SegFormer (and mmdetection's encoding).

    Args:
        padding_mask: B x H x W bool, True on padding.
        num_feats: channels per axis (the output has 2 * num_feats channels: y first, then x).
    Returns:
        B x 2 num_feats x H x W.
    """
    valid = (~padding_mask).to(torch.float32)
    y_embed = valid.cumsum(1)
    x_embed = valid.cumsum(2)
    scale = 2 * math.pi
    y_embed = (y_embed + offset) / (y_embed[:, -1:, :] + eps) * scale
    x_embed = (x_embed + offset) / (x_embed[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=padding_mask.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_feats)
    pos_x = x_embed[..., None] / dim_t
    pos_y = y_embed[..., None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


class ChannelMapper(nn.Module):
    """1x1 conv + GroupNorm per input level to ``out_channels``, then ``num_extra`` levels made by
    3x3 stride-2 convs + GroupNorm, the first on the coarsest input feature, the others on the
    previous extra level."""

    def __init__(self, in_channels: Sequence[int], out_channels: int, num_extra: int):
        super().__init__()
        self.convs = nn.ModuleList(
            Conv2d(c, out_channels, kernel_size=1, norm=_group_norm(out_channels)) for c in in_channels
        )
        self.extra_convs = nn.ModuleList(
            Conv2d(in_channels[-1] if i == 0 else out_channels, out_channels, kernel_size=3, stride=2,
                   padding=1, norm=_group_norm(out_channels))
            for i in range(num_extra)
        )
        for conv in list(self.convs) + list(self.extra_convs):
            weight_init.c2_xavier_fill(conv)

    def forward(self, features: Sequence[Tensor]) -> List[Tensor]:
        """features: the input levels, fine to coarse. Returns all levels, fine to coarse."""
        outputs = [conv(x) for conv, x in zip(self.convs, features)]
        previous = features[-1]
        for conv in self.extra_convs:
            previous = conv(previous)
            outputs.append(previous)
        return outputs


@PSF_ENCODER_REGISTRY.register()
class DeformableEncoder(nn.Module):
    """``neck`` (ChannelMapper) -> sine positional encoding + learned level embedding ->
    ``encoder`` (deformable transformer encoder) over all levels."""

    @configurable
    def __init__(self, *, in_features: Sequence[str], in_channels: Sequence[int], hidden_dim: int,
                 num_levels: int, num_layers: int, nheads: int, n_points: int, dim_feedforward: int,
                 dropout: float):
        """
        Args:
            in_features: backbone features, fine to coarse (res3, res4, res5).
            in_channels: their channels.
            hidden_dim: channels of every level and token.
            num_levels: levels of the encoder (>= len(in_features); the rest are extra levels).
            num_layers, nheads, n_points, dim_feedforward, dropout: of the deformable encoder.
        """
        super().__init__()
        if num_levels < len(in_features):
            raise ValueError(
                f"MODEL.PANOPTIC_SEGFORMER.NUM_FEATURE_LEVELS={num_levels} is smaller than the "
                f"{len(in_features)} IN_FEATURES {list(in_features)}"
            )
        if hidden_dim % 2:
            raise ValueError(f"MODEL.PANOPTIC_SEGFORMER.HIDDEN_DIM must be even, got {hidden_dim}")
        self.in_features = list(in_features)
        self.hidden_dim = hidden_dim
        self.num_levels = num_levels
        self.neck = ChannelMapper(in_channels, hidden_dim, num_levels - len(in_features))
        self.encoder = MultiScaleDeformableEncoder(
            num_levels, num_layers, d_model=hidden_dim, n_heads=nheads, n_points=n_points,
            d_ffn=dim_feedforward, dropout=dropout,
        )

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        psf = cfg.MODEL.PANOPTIC_SEGFORMER
        missing = [f for f in psf.IN_FEATURES if f not in input_shape]
        if missing:
            raise KeyError(
                f"MODEL.PANOPTIC_SEGFORMER.IN_FEATURES={list(psf.IN_FEATURES)}: {missing} are not "
                f"backbone outputs ({sorted(input_shape)})"
            )
        return {
            "in_features": list(psf.IN_FEATURES),
            "in_channels": [input_shape[f].channels for f in psf.IN_FEATURES],
            "hidden_dim": psf.HIDDEN_DIM,
            "num_levels": psf.NUM_FEATURE_LEVELS,
            "num_layers": psf.ENC_LAYERS,
            "nheads": psf.NHEADS,
            "n_points": psf.N_POINTS,
            "dim_feedforward": psf.DIM_FEEDFORWARD,
            "dropout": psf.DROPOUT,
        }

    def forward(self, features: Dict[str, Tensor], image_padding_mask: Tensor) -> MultiLevelTokens:
        """
        Args:
            features: backbone outputs, name -> B x C x H_s x W_s.
            image_padding_mask: B x H x W bool, True on the padding of the batched images.
        Returns:
            the encoded tokens of all levels (B x S x hidden_dim) with their positional encodings
            (level embedding included), padding mask and level layout.
        """
        maps = self.neck([features[f] for f in self.in_features])
        masks = [
            F.interpolate(image_padding_mask[None].float(), size=m.shape[-2:], mode="nearest")[0].bool()
            for m in maps
        ]
        pos = [sine_position_encoding(mask, self.hidden_dim // 2).to(m.dtype) for mask, m in zip(masks, maps)]
        _, memory = self.encoder(maps, masks, pos)
        return memory
