"""Multi-scale deformable attention (Zhu et al., "Deformable DETR", ICLR 2021) in pure PyTorch.

Each query attends to a few sampled points per head and per feature level instead of to every
token: ``n_points`` locations around a reference point, at offsets predicted from the query, read
by bilinear interpolation and averaged with weights also predicted from the query.

``ms_deform_attn`` is the functional core (what Deformable DETR runs as a compiled CUDA op): it
runs one ``grid_sample`` for all heads and levels at once, on CPU or GPU, in float64, float32 or
bfloat16/float16 (sampled in float32); in inference on CPU (``inference_kernels()``, gradients
off) it gathers and sums the samples' corner pixels with ``F.embedding_bag`` instead. ``MSDeformAttn`` is
the module with Deformable DETR's parameter names and initialisation.
"""
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fused_linear import linear
from .inference_kernels import inference_kernels_enabled

SpatialShapes = Union[Tensor, Sequence[Tuple[int, int]]]

# The gathered kernel computes each sample's cell index in float32 while the canvas has fewer
# cells than float32 counts exactly (in float64 beyond), and gathers with int32 indices while all
# canvases together have fewer cells than int32 holds (int64 beyond).
_FLOAT32_EXACT_INTEGERS = 2 ** 24
_INT32_INDICES = 2 ** 31

__all__ = ["ms_deform_attn", "MSDeformAttn", "SpatialShapes", "spatial_shape_list"]


def spatial_shape_list(spatial_shapes: SpatialShapes) -> List[Tuple[int, int]]:
    """``[(H_l, W_l), ...]`` as Python ints, from an L x 2 tensor (one host sync on GPU) or pairs."""
    if isinstance(spatial_shapes, Tensor):
        if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
            raise ValueError(f"spatial_shapes must be L x 2 (H, W), got shape {tuple(spatial_shapes.shape)}")
        spatial_shapes = spatial_shapes.tolist()
    shapes = [(int(h), int(w)) for h, w in spatial_shapes]
    if not shapes or any(h < 1 or w < 1 for h, w in shapes):
        raise ValueError(f"spatial_shapes must list at least one level of positive size, got {shapes}")
    return shapes


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # A reduced-precision sampling grid would misplace points: near the ends of [-1, 1] bfloat16
    # steps by 2^-8, 1/512 of the canvas, i.e. half a pixel on the ~250-row canvas of a 1024 x 1024
    # image at strides 8-64.
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _pack_levels(value: Tensor, shapes: List[Tuple[int, int]]) -> Tensor:
    """Stack the levels' maps into one zero-padded canvas, top to bottom.

    Every level is followed by one zero row and padded with zero columns to ``max(W_l) + 1``, so a
    bilinear sample of a level never reads a pixel of another level (see ``_canvas_grid``)::

        level 0 (H_0 x W_0) | 0
        0 0 0 0 0 0 0 0 0 0 0 0
        level 1     | 0 0 0 0 0
        0 0 0 0 0 0 0 0 0 0 0 0
        ...

    Args:
        value: B x S x M x D tokens of all levels.
    Returns:
        (B * M) x D x sum_l(H_l + 1) x (max_l W_l + 1).
    """
    batch, _, heads, dim = value.shape
    canvas_w = max(w for _, w in shapes) + 1
    pieces = []
    for level, (h, w) in zip(value.split([h * w for h, w in shapes], dim=1), shapes):
        level = level.reshape(batch, h, w, heads * dim)
        pieces.append(F.pad(level, (0, 0, 0, canvas_w - w, 0, 1)))
    canvas = torch.cat(pieces, dim=1)  # B x H_c x W_c x (M * D)
    canvas_h = canvas.shape[1]
    canvas = canvas.view(batch, canvas_h, canvas_w, heads, dim).permute(0, 3, 4, 1, 2)
    return canvas.reshape(batch * heads, dim, canvas_h, canvas_w)


def _canvas_grid(sampling_locations: Tensor, level_sizes: Tensor, canvas_h: int, canvas_w: int) -> Tensor:
    """``grid_sample`` coordinates on the canvas of ``_pack_levels`` of per-level locations.

    A location (x, y) in [0, 1] of level l is the pixel coordinate (x W_l - 0.5, y H_l - 0.5)
    (align_corners=False), shifted down to the level's rows. Rows are clamped to [-1, H_l] first,
    so a sample reads only the level's pixels and the zero rows around them: beyond, both
    vertical neighbours are outside the level, so the sample and its gradient are zero either way.
    Columns need no clamp: right of a level there are only zeros, left of it the canvas ends.

    Args:
        sampling_locations: B x Q x M x L x P x 2, (x, y).
        level_sizes: L x 2 (H_l, W_l), floating point, on the locations' device.
    Returns:
        (B * M) x Q x (L * P) x 2 grid in [-1, 1] of the canvas.
    """
    heights, widths = level_sizes[:, 0, None], level_sizes[:, 1, None]  # L x 1, broadcast over P
    first_rows = torch.cumsum(heights + 1, dim=0) - (heights + 1)
    x = sampling_locations[..., 0] * widths - 0.5
    y = torch.minimum((sampling_locations[..., 1] * heights - 0.5).clamp(min=-1.0), heights) + first_rows
    grid = torch.stack(((2 * x + 1) / canvas_w - 1, (2 * y + 1) / canvas_h - 1), dim=-1)
    batch, queries, heads, levels, points, _ = grid.shape
    return grid.transpose(1, 2).reshape(batch * heads, queries, levels * points, 2)


def ms_deform_attn(value: Tensor, spatial_shapes: SpatialShapes, level_start_index: Optional[Tensor],
                   sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """Multi-scale deformable attention: per query and head, the attention-weighted sum of
    bilinear samples of every level's value map (zero outside the maps).

    Args:
        value: B x S x M x D, the values of M heads (D channels each) for the S = sum_l H_l W_l
            tokens of all levels, level after level, each level row-major.
        spatial_shapes: L x 2 integer tensor of (H_l, W_l), or a sequence of L (H_l, W_l).
        level_start_index: L, index in S of each level's first token. Accepted so that calls
            match Deformable DETR's op; the levels' extents are taken from ``spatial_shapes``.
        sampling_locations: B x Q x M x L x P x 2, (x, y) normalized to [0, 1] of each level:
            0 and 1 are the outer edges of the map, pixel (i, j) has its centre at
            ((j + 0.5) / W_l, (i + 0.5) / H_l) (grid_sample's align_corners=False).
        attention_weights: B x Q x M x L x P, the weight of each sample (usually a softmax over
            L x P per query and head).
    Returns:
        B x Q x (M * D), in ``value``'s dtype. bfloat16/float16 inputs are sampled and summed in
        float32.
    """
    del level_start_index  # the split follows spatial_shapes
    return _sample_and_sum(value, spatial_shape_list(spatial_shapes),
                           torch.as_tensor(spatial_shapes, device=value.device),
                           sampling_locations, attention_weights)


def _sample_and_sum(value: Tensor, shapes: List[Tuple[int, int]], level_sizes: Tensor,
                    sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """``ms_deform_attn`` with the level shapes given both as Python ints (to cut the tokens into
    levels) and as an L x 2 tensor on the device (for the sampling grid), so that no host-device
    copy or sync is needed when the caller has both."""
    if value.dim() != 4:
        raise ValueError(f"value must be B x S x M x D, got shape {tuple(value.shape)}")
    batch, tokens, heads, dim = value.shape
    if tokens != sum(h * w for h, w in shapes):
        raise ValueError(
            f"value has {tokens} tokens but spatial_shapes {shapes} add up to "
            f"{sum(h * w for h, w in shapes)}"
        )
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            f"sampling_locations must be B x Q x M x L x P x 2, got shape {tuple(sampling_locations.shape)}"
        )
    _, queries, _, levels, points, _ = sampling_locations.shape
    expected = (batch, queries, heads, len(shapes), points)
    if tuple(sampling_locations.shape[:-1]) != expected:
        raise ValueError(
            f"sampling_locations has shape {tuple(sampling_locations.shape)}; with value "
            f"{tuple(value.shape)} and {len(shapes)} levels it must be {expected + (2,)}"
        )
    if tuple(attention_weights.shape) != expected:
        raise ValueError(
            f"attention_weights has shape {tuple(attention_weights.shape)}, expected {expected}"
        )

    if (inference_kernels_enabled() and not torch.is_grad_enabled() and value.device.type == "cpu"
            and not torch.isnan(sampling_locations).any()):
        # (measured on CPU only: GPUs keep grid_sample; a NaN location has no pixel to gather,
        # grid_sample gives it the result it always gave)
        return _gathered_sample_and_sum(value, shapes, sampling_locations, attention_weights)
    dtype = _compute_dtype(value.dtype)
    canvas = _pack_levels(value.to(dtype), shapes)
    grid = _canvas_grid(sampling_locations.to(dtype), level_sizes.to(dtype), canvas.shape[-2], canvas.shape[-1])
    # (B * M) x D x Q x (L * P): every sample of every level at once.
    samples = F.grid_sample(canvas, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    weights = attention_weights.to(dtype).transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
    output = (samples * weights).sum(dim=-1)  # (B * M) x D x Q
    output = output.view(batch, heads * dim, queries).transpose(1, 2).contiguous()
    return output.to(value.dtype)


def _bordered_canvas(value: Tensor, shapes: List[Tuple[int, int]]) -> Tensor:
    """The levels' maps one below the other, each inside a border of zeros, as the rows of a
    table for ``F.embedding_bag``::

        0 0 0 0 0 0 0 0 0
        0 level 0   0 0 0
        0 0 0 0 0 0 0 0 0
        0 0 0 0 0 0 0 0 0
        0 level 1 0 0 0 0
        ...
        0 0 0 0 0 0 0 0 0   (one more row, and two more columns right of the widest level)

    Args:
        value: B x S x M x D tokens of all levels.
    Returns:
        B x M x canvas_h x canvas_w x D, canvas_h = sum_l(H_l + 2) + 1, canvas_w = max_l W_l + 3.
    """
    batch, _, heads, dim = value.shape
    canvas = value.new_zeros((batch, heads, sum(h + 2 for h, _ in shapes) + 1, max(w for _, w in shapes) + 3, dim))
    row = 1
    for (h, w), level in zip(shapes, value.split([h * w for h, w in shapes], dim=1)):
        canvas[:, :, row:row + h, 1:1 + w] = level.view(batch, h, w, heads, dim).permute(0, 3, 1, 2, 4)
        row += h + 2
    return canvas


def _gathered_sample_and_sum(value: Tensor, shapes: List[Tuple[int, int]], sampling_locations: Tensor,
                             attention_weights: Tensor) -> Tensor:
    """``_sample_and_sum`` as four ``F.embedding_bag`` calls, one per bilinear corner: each
    (image, head, query) row sums its L x P corner pixels of the canvas of ``_bordered_canvas``,
    weighted by attention weight x bilinear weight. Equal to the ``grid_sample`` computation to
    float rounding, without its B x M x D x Q x (L x P) samples.

    Coordinates are clamped to [-1, W_l] x [-1, H_l] pixels first: beyond, every corner of a
    sample lies outside the level (a zero sample, as with ``grid_sample``'s zero padding); at
    the clamp, the corners read the zero border (and those with weight 0 the row or column after
    it, which the canvas also has).
    """
    batch, _, heads, dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    dtype = _compute_dtype(value.dtype)
    canvas = _bordered_canvas(value.to(dtype), shapes)
    canvas_h, canvas_w = canvas.shape[2:4]
    if canvas_h * canvas_w >= _FLOAT32_EXACT_INTEGERS:
        dtype = torch.float64
    sizes = torch.tensor(shapes, dtype=dtype, device=value.device)
    heights, widths = sizes[:, 0, None], sizes[:, 1, None]  # L x 1, broadcast over P
    first_rows = torch.cumsum(heights + 2, dim=0) - (heights + 1)  # canvas row of each level's row 0
    # (image, head, query) major, as the rows of the bags
    locations = sampling_locations.to(dtype).permute(0, 2, 1, 3, 4, 5).contiguous()
    x = torch.maximum(torch.minimum(locations[..., 0] * widths - 0.5, widths), widths.new_tensor(-1.0))
    y = torch.maximum(torch.minimum(locations[..., 1] * heights - 0.5, heights), heights.new_tensor(-1.0))
    x0, y0 = x.floor(), y.floor()
    fx, fy = x.sub_(x0), y.sub_(y0)  # B x M x Q x L x P
    index_dtype = torch.int32 if canvas.numel() // dim < _INT32_INDICES else torch.int64
    top_left = ((y0 + first_rows) * canvas_w + x0 + 1).to(index_dtype)
    top_left += (torch.arange(batch * heads, dtype=index_dtype, device=value.device)
                 * (canvas_h * canvas_w)).view(batch, heads, 1, 1, 1)
    weights = attention_weights.to(dtype).permute(0, 2, 1, 3, 4).contiguous()
    bottom = weights * fy
    top = weights - bottom
    top_right, bottom_right = top * fx, bottom * fx
    corners = ((0, top - top_right), (1, top_right), (canvas_w, bottom - bottom_right),
               (canvas_w + 1, bottom_right))
    samples = levels * points
    table = canvas.view(-1, dim)
    top_left = top_left.view(-1, samples)
    output = None
    for offset, corner_weights in corners:
        corner = F.embedding_bag(top_left + offset if offset else top_left, table,
                                 per_sample_weights=corner_weights.view(-1, samples).to(table.dtype), mode="sum")
        output = corner if output is None else output.add_(corner)
    output = output.view(batch, heads, queries, dim).permute(0, 2, 1, 3).reshape(batch, queries, heads * dim)
    return output.to(value.dtype)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module (Deformable DETR).

    From each query, ``sampling_offsets`` predicts M x L x P (dx, dy) offsets around the query's
    reference point on each level and ``attention_weights`` predicts their weights (softmax over
    L x P per head); ``value_proj`` makes the values, ``output_proj`` mixes the heads' results.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        """
        Args:
            d_model: channels of queries, values and output; a multiple of ``n_heads``.
            n_levels: feature levels L.
            n_heads: attention heads M.
            n_points: sampling points P per head and level.
        """
        super().__init__()
        for name, number in (("d_model", d_model), ("n_levels", n_levels), ("n_heads", n_heads),
                             ("n_points", n_points)):
            if number < 1:
                raise ValueError(f"MSDeformAttn: {name} must be >= 1, got {number}")
        if d_model % n_heads != 0:
            raise ValueError(f"MSDeformAttn: d_model={d_model} is not divisible by n_heads={n_heads}")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self):
        """Deformable DETR's initialisation: offsets start on a ring of directions, one per head
        (cos, sin of 2 pi m / M, scaled so the larger coordinate is 1), point p at distance p + 1
        on every level; uniform attention weights; xavier-uniform projections with zero bias."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([thetas.cos(), thetas.sin()], dim=-1)  # M x 2
        directions = directions / directions.abs().max(dim=-1, keepdim=True)[0]
        scale = torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        grid = directions.view(self.n_heads, 1, 1, 2) * scale  # M x 1 x P x 2
        grid = grid.expand(self.n_heads, self.n_levels, self.n_points, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def sampling_locations_and_weights(self, query: Tensor, reference_points: Tensor,
                                       spatial_shapes: SpatialShapes) -> Tuple[Tensor, Tensor]:
        """Where each query samples, and with which weights.

        Args:
            query: B x Q x d_model.
            reference_points: B x Q x L x 2, points (x, y) in [0, 1] of each level, or
                B x Q x L x 4, boxes (cx, cy, w, h): offsets are then in units of the box's
                half size divided by P.
            spatial_shapes: L x 2 (H_l, W_l), tensor or pairs.
        Returns:
            sampling_locations: B x Q x M x L x P x 2, (x, y) in [0, 1] of each level.
            attention_weights: B x Q x M x L x P, summing to 1 over L x P.
        """
        batch, queries, _ = query.shape
        if reference_points.dim() != 4 or tuple(reference_points.shape[:3]) != (batch, queries, self.n_levels) \
                or reference_points.shape[-1] not in (2, 4):
            raise ValueError(
                f"reference_points must be B x Q x L x 2 (points) or B x Q x L x 4 (boxes) with "
                f"B, Q, L = {batch}, {queries}, {self.n_levels}; got shape {tuple(reference_points.shape)}"
            )
        offsets = linear(query, self.sampling_offsets).view(
            batch, queries, self.n_heads, self.n_levels, self.n_points, 2)
        weights = linear(query, self.attention_weights).view(
            batch, queries, self.n_heads, self.n_levels * self.n_points)
        weights = weights.softmax(-1).view(batch, queries, self.n_heads, self.n_levels, self.n_points)
        ref = reference_points[:, :, None, :, None, :]  # B x Q x 1 x L x 1 x (2 | 4)
        if reference_points.shape[-1] == 2:
            sizes = torch.as_tensor(spatial_shapes, device=query.device)
            # offsets are in pixels of each level: divide by (W_l, H_l)
            normalizer = sizes.flip(-1).to(offsets.dtype)[None, None, None, :, None, :]
            locations = ref + offsets / normalizer
        else:
            locations = ref[..., :2] + offsets / self.n_points * ref[..., 2:] * 0.5
        return locations, weights

    def forward(self, query: Tensor, reference_points: Tensor, input_flatten: Tensor,
                input_spatial_shapes: SpatialShapes, input_level_start_index: Optional[Tensor],
                input_padding_mask: Optional[Tensor] = None) -> Tensor:
        """
        Args:
            query: B x Q x d_model (with its positional encoding added, if any).
            reference_points: B x Q x L x 2 points or B x Q x L x 4 boxes, normalized to [0, 1]
                of each level (see ``sampling_locations_and_weights``).
            input_flatten: B x S x d_model, the tokens of all levels, S = sum_l H_l W_l.
            input_spatial_shapes: L x 2 (H_l, W_l), tensor or pairs.
            input_level_start_index: L, first token of each level (see ``ms_deform_attn``).
            input_padding_mask: optional B x S bool, True on padding tokens: their values are zeroed.
        Returns:
            B x Q x d_model.
        """
        del input_level_start_index  # the levels' extents follow input_spatial_shapes
        batch, tokens, _ = input_flatten.shape
        shapes = spatial_shape_list(input_spatial_shapes)
        if len(shapes) != self.n_levels:
            raise ValueError(
                f"MSDeformAttn was built for n_levels={self.n_levels} but got {len(shapes)} spatial shapes {shapes}"
            )
        value = linear(input_flatten, self.value_proj)
        if input_padding_mask is not None:
            if tuple(input_padding_mask.shape) != (batch, tokens):
                raise ValueError(
                    f"input_padding_mask must be B x S = {(batch, tokens)}, got {tuple(input_padding_mask.shape)}"
                )
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(batch, tokens, self.n_heads, self.d_model // self.n_heads)
        level_sizes = torch.as_tensor(input_spatial_shapes, device=query.device)
        locations, weights = self.sampling_locations_and_weights(query, reference_points, level_sizes)
        output = _sample_and_sum(value, shapes, level_sizes, locations, weights)
        return linear(output, self.output_proj)
