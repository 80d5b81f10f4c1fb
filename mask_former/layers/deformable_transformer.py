"""Deformable DETR's transformer encoder (Zhu et al., ICLR 2021), and the helpers that turn a list
of feature maps into the single token sequence it works on, and back.

The feature maps of L levels (B x C x H_l x W_l, usually strides 8 to 32 or 64) are flattened and
concatenated into S = sum_l H_l W_l tokens; every encoder layer lets each token attend, by
multi-scale deformable attention, to a few points around its own position on every level.

Parameter names follow Deformable DETR (``layers.N.self_attn.sampling_offsets``, ``norm1``,
``linear1``, ...; ``level_embed``), so its checkpoints' encoder weights map one to one.
"""
import dataclasses
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .fused_linear import linear
from .ms_deform_attn import MSDeformAttn, SpatialShapes, spatial_shape_list

__all__ = [
    "MultiLevelTokens",
    "flatten_levels",
    "split_levels",
    "valid_ratios_of_mask",
    "DeformableTransformerEncoderLayer",
    "DeformableTransformerEncoder",
    "MultiScaleDeformableEncoder",
]


@dataclasses.dataclass
class MultiLevelTokens:
    """Feature maps of L levels flattened into one sequence of S = sum_l H_l W_l tokens, level
    after level, each level row-major."""

    tokens: Tensor
    """B x S x C."""
    pos: Optional[Tensor]
    """B x S x C positional encoding (with the level embedding added), or None."""
    padding_mask: Optional[Tensor]
    """B x S bool, True on padding tokens; None when nothing is padded."""
    spatial_shapes: Tensor
    """L x 2 long, (H_l, W_l), on the tokens' device."""
    level_start_index: Tensor
    """L long, index of each level's first token."""
    valid_ratios: Tensor
    """B x L x 2, (w, h): the fraction of each level's width and height that is not padding."""
    shapes: List[Tuple[int, int]]
    """``spatial_shapes`` as Python ints."""

    def split(self, tokens: Optional[Tensor] = None) -> List[Tensor]:
        """``tokens`` (default: ``self.tokens``), B x S x C, back into L maps B x C x H_l x W_l."""
        return split_levels(self.tokens if tokens is None else tokens, self.shapes)


def valid_ratios_of_mask(mask: Tensor) -> Tensor:
    """The valid (not padded) fraction of a map padded at the bottom and right.

    Args:
        mask: B x H x W bool, True on padding.
    Returns:
        B x 2 float, (valid width / W, valid height / H).
    """
    _, height, width = mask.shape
    valid_h = (~mask[:, :, 0]).sum(dim=1)
    valid_w = (~mask[:, 0, :]).sum(dim=1)
    return torch.stack([valid_w.float() / width, valid_h.float() / height], dim=-1)


def flatten_levels(features: Sequence[Tensor], masks: Optional[Sequence[Tensor]] = None,
                   pos: Optional[Sequence[Tensor]] = None,
                   level_embed: Optional[Tensor] = None) -> MultiLevelTokens:
    """Flatten feature maps of several levels into one token sequence.

    Args:
        features: L maps B x C x H_l x W_l.
        masks: optional L masks B x H_l x W_l, True on padding (at the bottom and right).
        pos: optional L positional encodings B x C x H_l x W_l.
        level_embed: optional L x C, added to every token's positional encoding of that level
            (on its own when ``pos`` is None).
    Returns:
        the tokens, their positional encodings and padding mask, and the level layout.
    """
    if not features:
        raise ValueError("flatten_levels needs at least one feature map")
    batch, channels = features[0].shape[:2]
    for name, maps in (("masks", masks), ("pos", pos)):
        if maps is not None and len(maps) != len(features):
            raise ValueError(f"flatten_levels: got {len(features)} feature maps but {len(maps)} {name}")
    if level_embed is not None and tuple(level_embed.shape) != (len(features), channels):
        raise ValueError(
            f"level_embed must be L x C = {(len(features), channels)}, got {tuple(level_embed.shape)}"
        )
    shapes = []
    for level, feature in enumerate(features):
        if feature.dim() != 4 or tuple(feature.shape[:2]) != (batch, channels):
            raise ValueError(
                f"feature map {level} has shape {tuple(feature.shape)}; expected B x C x H x W with "
                f"B, C = {batch}, {channels} like map 0"
            )
        shapes.append((feature.shape[2], feature.shape[3]))
    device = features[0].device

    tokens = torch.cat([f.flatten(2).transpose(1, 2) for f in features], dim=1)
    pos_tokens = None
    if pos is not None or level_embed is not None:
        per_level = []
        for level, (h, w) in enumerate(shapes):
            if pos is not None:
                level_pos = pos[level].flatten(2).transpose(1, 2)
            else:
                level_pos = tokens.new_zeros(batch, h * w, channels)
            if level_embed is not None:
                level_pos = level_pos + level_embed[level].view(1, 1, -1)
            per_level.append(level_pos)
        pos_tokens = torch.cat(per_level, dim=1)
    if masks is not None:
        padding_mask = torch.cat([m.flatten(1) for m in masks], dim=1)
        valid_ratios = torch.stack([valid_ratios_of_mask(m) for m in masks], dim=1)
    else:
        padding_mask = None
        valid_ratios = torch.ones(batch, len(shapes), 2, device=device)
    spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=device)
    sizes = spatial_shapes.prod(dim=1)
    level_start_index = torch.cumsum(sizes, dim=0) - sizes
    return MultiLevelTokens(tokens, pos_tokens, padding_mask, spatial_shapes, level_start_index,
                            valid_ratios, shapes)


def split_levels(tokens: Tensor, spatial_shapes: SpatialShapes) -> List[Tensor]:
    """Inverse of the flattening of ``flatten_levels``.

    Args:
        tokens: B x S x C.
        spatial_shapes: L x 2 (H_l, W_l), tensor or pairs, with sum_l H_l W_l = S.
    Returns:
        L maps B x C x H_l x W_l.
    """
    shapes = spatial_shape_list(spatial_shapes)
    if tokens.shape[1] != sum(h * w for h, w in shapes):
        raise ValueError(
            f"split_levels: {tokens.shape[1]} tokens do not match spatial shapes {shapes}"
        )
    batch, _, channels = tokens.shape
    pieces = tokens.split([h * w for h, w in shapes], dim=1)
    return [p.transpose(1, 2).reshape(batch, channels, h, w) for p, (h, w) in zip(pieces, shapes)]


def _check_activation(name: str) -> str:
    if name not in ("relu", "gelu"):
        raise ValueError(f"Unknown activation {name!r}; expected 'relu' or 'gelu'")
    return name


class DeformableTransformerEncoderLayer(nn.Module):
    """Multi-scale deformable self-attention, then a feed-forward network; post-norm (each block
    is ``norm(x + dropout(block(x)))``)."""

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1,
                 activation: str = "relu", n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        """
        Args:
            d_model: token channels.
            d_ffn: hidden channels of the feed-forward network.
            dropout: dropout after the attention, inside and after the feed-forward network.
            activation: "relu" or "gelu", of the feed-forward network.
            n_levels, n_heads, n_points: of the deformable attention (see ``MSDeformAttn``).
        """
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = _check_activation(activation)  # applied by ``linear`` with linear1
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: Tensor, pos: Optional[Tensor], reference_points: Tensor,
                spatial_shapes: SpatialShapes, level_start_index: Optional[Tensor],
                padding_mask: Optional[Tensor] = None) -> Tensor:
        """
        Args:
            src: B x S x C tokens.
            pos: B x S x C positional encoding, added to the queries (not the values), or None.
            reference_points: B x S x L x 2, each token's position on every level, in [0, 1].
            spatial_shapes, level_start_index: the level layout (see ``MultiLevelTokens``).
            padding_mask: B x S bool, True on padding, or None.
        Returns:
            B x S x C.
        """
        query = src if pos is None else src + pos
        attended = self.self_attn(query, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        src = self.norm1(src + self.dropout1(attended))
        hidden = self.dropout2(linear(src, self.linear1, self.activation))
        return self.norm2(src + self.dropout3(linear(hidden, self.linear2)))


class DeformableTransformerEncoder(nn.Module):
    """A stack of ``DeformableTransformerEncoderLayer`` over multi-level tokens, every token
    using its own pixel centre as reference point on all levels."""

    def __init__(self, num_layers: int, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1,
                 activation: str = "relu", n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        """
        Args:
            num_layers: encoder layers (>= 1).
            others: of each layer (see ``DeformableTransformerEncoderLayer``).
        """
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"DeformableTransformerEncoder: num_layers must be >= 1, got {num_layers}")
        self.layers = nn.ModuleList(
            DeformableTransformerEncoderLayer(d_model, d_ffn, dropout, activation, n_levels, n_heads, n_points)
            for _ in range(num_layers)
        )
        self.num_layers = num_layers

    @staticmethod
    def get_reference_points(spatial_shapes: SpatialShapes, valid_ratios: Tensor) -> Tensor:
        """Each token's pixel centre as a reference point on every level.

        A token's centre is normalized by the valid (not padded) size of its own level, then
        scaled to each level's valid size, so the same image point is referred to on all levels.

        Args:
            spatial_shapes: L x 2 (H_l, W_l).
            valid_ratios: B x L x 2, (w, h) valid fraction of each level.
        Returns:
            B x S x L x 2, (x, y) in [0, 1] of each level.
        """
        device = valid_ratios.device
        points = []
        for level, (h, w) in enumerate(spatial_shape_list(spatial_shapes)):
            ys = (torch.arange(h, dtype=torch.float32, device=device) + 0.5)
            xs = (torch.arange(w, dtype=torch.float32, device=device) + 0.5)
            ys, xs = torch.meshgrid(ys, xs, indexing="ij")
            ys = ys.reshape(1, -1) / (valid_ratios[:, level, 1:2] * h)
            xs = xs.reshape(1, -1) / (valid_ratios[:, level, 0:1] * w)
            points.append(torch.stack([xs, ys], dim=-1))  # B x H_l W_l x 2
        points = torch.cat(points, dim=1)
        return points[:, :, None] * valid_ratios[:, None]

    def forward(self, src: Tensor, spatial_shapes: SpatialShapes, level_start_index: Optional[Tensor],
                valid_ratios: Tensor, pos: Optional[Tensor] = None,
                padding_mask: Optional[Tensor] = None) -> Tensor:
        """
        Args:
            src: B x S x C tokens of all levels.
            spatial_shapes: L x 2 (H_l, W_l); level_start_index: L (see ``MultiLevelTokens``).
            valid_ratios: B x L x 2, (w, h) valid fraction of each level.
            pos: B x S x C positional encoding, or None.
            padding_mask: B x S bool, True on padding, or None.
        Returns:
            B x S x C encoded tokens.
        """
        reference_points = self.get_reference_points(spatial_shapes, valid_ratios)
        output = src
        for layer in self.layers:
            output = layer(output, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
        return output


class MultiScaleDeformableEncoder(nn.Module):
    """Feature maps in, encoded feature maps out: flattens L maps (adding a learned embedding of
    each level to their positional encodings), runs a ``DeformableTransformerEncoder`` and splits
    the result back into maps."""

    def __init__(self, num_levels: int, num_layers: int, d_model: int = 256, n_heads: int = 8,
                 n_points: int = 4, d_ffn: int = 1024, dropout: float = 0.1, activation: str = "relu"):
        """
        Args:
            num_levels: L, feature maps per call.
            num_layers, d_model, n_heads, n_points, d_ffn, dropout, activation: of the encoder.
        """
        super().__init__()
        self.num_levels = num_levels
        self.level_embed = nn.Parameter(torch.empty(num_levels, d_model))
        self.encoder = DeformableTransformerEncoder(
            num_layers, d_model=d_model, d_ffn=d_ffn, dropout=dropout, activation=activation,
            n_levels=num_levels, n_heads=n_heads, n_points=n_points,
        )
        nn.init.normal_(self.level_embed)

    def forward(self, features: Sequence[Tensor], masks: Optional[Sequence[Tensor]] = None,
                pos: Optional[Sequence[Tensor]] = None) -> Tuple[List[Tensor], MultiLevelTokens]:
        """
        Args:
            features: L maps B x d_model x H_l x W_l.
            masks: optional L masks B x H_l x W_l, True on padding (at the bottom and right).
            pos: optional L positional encodings B x d_model x H_l x W_l.
        Returns:
            encoded: L maps B x d_model x H_l x W_l.
            memory: the encoded tokens with their layout, positional encodings (level embedding
                included) and padding mask, for a decoder that attends to them.
        """
        if len(features) != self.num_levels:
            raise ValueError(
                f"MultiScaleDeformableEncoder was built for {self.num_levels} levels, got {len(features)} maps"
            )
        flat = flatten_levels(features, masks, pos, self.level_embed)
        tokens = self.encoder(flat.tokens, flat.spatial_shapes, flat.level_start_index, flat.valid_ratios,
                              pos=flat.pos, padding_mask=flat.padding_mask)
        memory = dataclasses.replace(flat, tokens=tokens)
        return memory.split(), memory
