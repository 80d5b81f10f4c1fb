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

# The gathered kernel gathers with int32 indices while the canvases of all images and heads
# together have fewer cells than int32 holds (int64 beyond).
_INT32_INDICES = 2 ** 31
# Corner samples whose indices and weights it computes at a time (2 MB of them).
_GATHERED_SAMPLES = 1 << 18

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


def _gathering(value: Tensor) -> bool:
    """Whether the samples are gathered (``_gather_at_pixels``) rather than ``grid_sample``d: under
    ``inference_kernels()``, gradients off, on CPU (measured there only; GPUs keep grid_sample)."""
    return inference_kernels_enabled() and not torch.is_grad_enabled() and value.device.type == "cpu"


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

    if _gathering(value) and not torch.isnan(sampling_locations).any():
        # (a NaN location has no pixel to gather; grid_sample gives it the result it always gave)
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


def _pixel_major_canvas(value: Tensor, shapes: List[Tuple[int, int]], dtype: torch.dtype) -> Tuple[Tensor, List[int]]:
    """The levels' maps one below the other, each inside a border of zeros, pixel-major with the
    heads innermost, as the rows of a table for ``F.embedding_bag`` (row ``((b * canvas_h + r) *
    canvas_w + c) * M + m`` holds head m's D channels of cell (r, c) of image b)::

        0 0 0 0 0 0 0 0 0
        0 level 0   0 0 0
        0 0 0 0 0 0 0 0 0
        0 0 0 0 0 0 0 0 0
        0 level 1 0 0 0 0
        ...
        0 0 0 0 0 0 0 0 0   (one more row, and two more columns right of the widest level)

    Only the border is written with zeros; the levels are copied in (the tokens are already
    pixel-major with the heads innermost).

    Args:
        value: B x S x M x D tokens of all levels.
        dtype: of the canvas (the values are converted in the copy).
    Returns:
        B x canvas_h x canvas_w x (M * D), canvas_h = sum_l(H_l + 2) + 1, canvas_w = max_l W_l + 3;
        and the canvas row of each level's row 0.
    """
    batch, _, heads, dim = value.shape
    canvas_h, canvas_w = sum(h + 2 for h, _ in shapes) + 1, max(w for _, w in shapes) + 3
    canvas = value.new_empty((batch, canvas_h, canvas_w, heads * dim), dtype=dtype)
    canvas[:, 0].zero_()
    first_rows, row = [], 1
    for (h, w), level in zip(shapes, value.split([h * w for h, w in shapes], dim=1)):
        canvas[:, row:row + h, 0].zero_()
        canvas[:, row:row + h, 1:1 + w] = level.reshape(batch, h, w, heads * dim)
        canvas[:, row:row + h, 1 + w:].zero_()
        canvas[:, row + h:row + h + 2].zero_()
        first_rows.append(row)
        row += h + 2
    return canvas, first_rows


def _level_constant(values: Sequence[float], points: int, dtype: torch.dtype, device) -> Tensor:
    """L x P x 2 tensor of per-level (x, y) constants: ``values`` is L pairs. Broadcast over the
    leading B x Q x M dimensions of the samples, it keeps the inner loop of an element-wise
    operation L x P x 2 elements long (a per-level L x 1 x 2 operand makes it 2)."""
    return torch.tensor(values, dtype=dtype, device=device)[:, None, :].expand(-1, points, -1).contiguous()


def _gather_at_pixels(value: Tensor, shapes: List[Tuple[int, int]], pixels: Tensor,
                      attention_weights: Tensor) -> Tensor:
    """``_sample_and_sum`` of samples given in pixel coordinates, as one ``F.embedding_bag`` call:
    each (image, query, head) row sums the four bilinear corners of its L x P samples in the
    canvas of ``_pixel_major_canvas``, weighted by attention weight x bilinear weight. Equal to the
    ``grid_sample`` computation to float rounding, without its B x M x D x Q x (L x P) samples.

    Coordinates are clamped to [-1, W_l] x [-1, H_l] pixels first: beyond, every corner of a
    sample lies outside the level (a zero sample, as with ``grid_sample``'s zero padding); at
    the clamp, the corners read the zero border (and those with weight 0 the row or column after
    it, which the canvas also has).

    Args:
        value: B x S x M x D.
        pixels: B x Q x M x L x P x 2 (x, y) pixel coordinates in each level (pixel (i, j) centred
            at (j, i)), float32 or float64, not NaN; overwritten.
        attention_weights: B x Q x M x L x P.
    Returns:
        B x Q x (M * D) in ``value``'s dtype.
    """
    batch, _, heads, dim = value.shape
    _, queries, _, levels, points, _ = pixels.shape
    dtype = _compute_dtype(value.dtype)
    canvas, first_rows = _pixel_major_canvas(value, shapes, dtype)
    canvas_h, canvas_w = canvas.shape[1:3]
    table = canvas.view(-1, dim)
    upper = _level_constant([(w, h) for h, w in shapes], points, pixels.dtype, pixels.device)
    lower = upper.new_full((), -1.0).expand_as(upper)
    index_dtype = torch.int32 if batch * canvas_h * canvas_w * heads < _INT32_INDICES else torch.int64
    # table row of the top-left corner: ((b * canvas_h + first_row_l + y) * canvas_w + 1 + x) * M + m
    first = torch.tensor(first_rows, dtype=index_dtype, device=value.device)
    image = torch.arange(batch, dtype=index_dtype, device=value.device) * canvas_h
    head = torch.arange(heads, dtype=index_dtype, device=value.device)
    base = ((image.view(batch, 1, 1, 1) + first.view(1, 1, levels, 1)) * canvas_w + 1) * heads
    base = (base + head.view(1, heads, 1, 1)).expand(batch, heads, levels, points).contiguous().unsqueeze(1)
    # the corners' offsets from the top left: top right, bottom left, bottom right
    offsets = torch.tensor([0, heads, canvas_w * heads, (canvas_w + 1) * heads], dtype=index_dtype,
                           device=value.device).view(4, 1, 1)
    samples = 4 * levels * points

    def gather(pixels: Tensor, attention_weights: Tensor) -> Tensor:  # of some queries
        pixels = pixels.clamp_(min=lower, max=upper)
        cells = pixels.floor()
        fractions = pixels.sub_(cells)  # B x q x M x L x P x 2
        cells = cells.to(index_dtype)
        top_left = torch.add(cells[..., 0] * heads, cells[..., 1], alpha=canvas_w * heads).add_(base)
        # corner-major bags, B x q x M x 4 x L x P: top left, top right, bottom left, bottom right
        corner_index = top_left.unsqueeze(3) + offsets
        corner_weights = pixels.new_empty(corner_index.shape, dtype=dtype)
        fx, fy = fractions[..., 0], fractions[..., 1]
        attention_weights = attention_weights.to(dtype)
        bottom = attention_weights * fy
        top = attention_weights - bottom
        torch.mul(top, fx, out=corner_weights[:, :, :, 1])
        torch.sub(top, corner_weights[:, :, :, 1], out=corner_weights[:, :, :, 0])
        torch.mul(bottom, fx, out=corner_weights[:, :, :, 3])
        torch.sub(bottom, corner_weights[:, :, :, 3], out=corner_weights[:, :, :, 2])
        return F.embedding_bag(corner_index.view(-1, samples), table,
                               per_sample_weights=corner_weights.view(-1, samples), mode="sum")

    # a few queries at a time: their corners' indices and weights stay small (and in cache)
    chunk = max(1, _GATHERED_SAMPLES // (batch * heads * samples))
    if queries <= chunk:
        return gather(pixels, attention_weights).view(batch, queries, heads * dim).to(value.dtype)
    output = value.new_empty((batch, queries, heads * dim))
    for start in range(0, queries, chunk):
        part = slice(start, start + chunk)
        output[:, part] = gather(pixels[:, part], attention_weights[:, part]).view(batch, -1, heads * dim)
    return output


def _gathered_sample_and_sum(value: Tensor, shapes: List[Tuple[int, int]], sampling_locations: Tensor,
                             attention_weights: Tensor) -> Tensor:
    """``_sample_and_sum`` by ``_gather_at_pixels``, the locations in [0, 1] of each level turned
    into pixel coordinates (x W_l - 0.5, y H_l - 0.5)."""
    points = sampling_locations.shape[4]
    dtype = _compute_dtype(value.dtype)
    sizes = _level_constant([(w, h) for h, w in shapes], points, dtype, value.device)
    pixels = sampling_locations.to(dtype) * sizes
    return _gather_at_pixels(value, shapes, pixels.sub_(0.5), attention_weights)


def _pixel_coordinates(offsets: Tensor, reference_points: Tensor, shapes: List[Tuple[int, int]]) -> Tensor:
    """The pixel coordinates of ``MSDeformAttn``'s samples, without going through [0, 1]: with
    points, ``ref * size - 0.5 + offset``; with boxes, ``(cx, cy) * size - 0.5 + offset * (w, h) *
    size / (2 P)``. The per-(query, level) terms are spread to every head and point by a product
    with a 0 / 1 matrix (exact: one term per output), which on a CPU took a fraction of the time
    of a broadcast over the innermost point dimension.

    Args:
        offsets: B x Q x M x L x P x 2.
        reference_points: B x Q x L x 2 points or B x Q x L x 4 boxes, in [0, 1] of each level.
    Returns:
        B x Q x M x L x P x 2 float32 (float64 for float64 offsets) pixel coordinates.
    """
    batch, queries, heads, levels, points, _ = offsets.shape
    dtype = _compute_dtype(offsets.dtype)
    sizes = torch.tensor([(w, h) for h, w in shapes], dtype=dtype, device=offsets.device)  # L x 2
    # spread[(l, c), (m, l', p, c')] = 1 where l = l' and c = c'
    spread = torch.eye(levels * 2, dtype=dtype, device=offsets.device).view(levels, 2, 1, levels, 1, 2)
    spread = spread.expand(-1, -1, heads, -1, points, -1).reshape(levels * 2, -1)

    def per_sample(per_level: Tensor, add: Optional[Tensor] = None) -> Tensor:
        """B x Q x L x 2 -> B x Q x M x L x P x 2 (+ ``add``)."""
        per_level = per_level.reshape(batch * queries, levels * 2)
        if add is None:
            return (per_level @ spread).view(offsets.shape)
        return torch.addmm(add.to(dtype).view(batch * queries, -1), per_level, spread).view(offsets.shape)

    reference_points = reference_points.to(dtype)
    if reference_points.shape[-1] == 2:
        return per_sample(reference_points * sizes - 0.5, add=offsets)
    pixels = per_sample(reference_points[..., :2] * sizes - 0.5)
    return pixels.addcmul_(offsets, per_sample(reference_points[..., 2:] * sizes * (0.5 / points)))


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

    def _check_reference_points(self, query: Tensor, reference_points: Tensor) -> None:
        batch, queries, _ = query.shape
        if reference_points.dim() != 4 or tuple(reference_points.shape[:3]) != (batch, queries, self.n_levels) \
                or reference_points.shape[-1] not in (2, 4):
            raise ValueError(
                f"reference_points must be B x Q x L x 2 (points) or B x Q x L x 4 (boxes) with "
                f"B, Q, L = {batch}, {queries}, {self.n_levels}; got shape {tuple(reference_points.shape)}"
            )

    def _offsets_and_weights(self, query: Tensor) -> Tuple[Tensor, Tensor]:
        """B x Q x M x L x P x 2 offsets (in the units of ``sampling_locations_and_weights``) and
        B x Q x M x L x P attention weights (a softmax over L x P) of the queries."""
        batch, queries, _ = query.shape
        offsets = linear(query, self.sampling_offsets).view(
            batch, queries, self.n_heads, self.n_levels, self.n_points, 2)
        weights = linear(query, self.attention_weights).view(
            batch, queries, self.n_heads, self.n_levels * self.n_points)
        weights = weights.softmax(-1).view(batch, queries, self.n_heads, self.n_levels, self.n_points)
        return offsets, weights

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
        self._check_reference_points(query, reference_points)
        offsets, weights = self._offsets_and_weights(query)
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
        if _gathering(value):
            # the samples' pixel coordinates straight from the offsets (what the gathered kernel
            # reads), not through the locations in [0, 1]
            self._check_reference_points(query, reference_points)
            offsets, weights = self._offsets_and_weights(query)
            pixels = _pixel_coordinates(offsets, reference_points, shapes)
            # any NaN makes the sum NaN (so may +inf and -inf together: then the modules' own
            # computation runs, with the same result); one pass instead of isnan's two
            if not torch.isnan(pixels.sum()):
                return linear(_gather_at_pixels(value, shapes, pixels, weights), self.output_proj)
        level_sizes = torch.as_tensor(input_spatial_shapes, device=query.device)
        locations, weights = self.sampling_locations_and_weights(query, reference_points, level_sizes)
        output = _sample_and_sum(value, shapes, level_sizes, locations, weights)
        return linear(output, self.output_proj)
