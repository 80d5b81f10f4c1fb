"""
The paper's full-resolution mask losses, computed in tiles.

``SetCriterion`` with ``num_points=0`` upsamples the matched pairs' mask logits (M x h x w, the
1/4 resolution of the pixel decoder) bilinearly to the padded image size (M x H x W) and takes the
mask losses there. Written as whole-image operations, that is a dozen passes over M x H x W values
in memory, and autograd keeps several of those tensors (about 17 MB each per decoder layer for
16 masks at 512 x 512) until the backward. :func:`upsampled_mask_losses` computes the same losses
a tile at a time (a few masks by a band of rows, a few MB) so that each tile's intermediates stay
in the cache, and keeps only the low-resolution logits for the backward, which recomputes each
tile. A tile is upsampled by ``F.interpolate`` from its source rows with one row of margin, at the
same scale, so its values are those of the whole masks' upsampling (bitwise for factor 4 on this
project's CPUs; for other sizes PyTorch's kernel may round differently, by an ulp); the losses and
gradients differ from the whole-image computation by float rounding only (the order of the sums).

It needs losses that are functions of per-mask sums over the pixels (``MaskLossType.pixel_sums``
and ``loss_from_sums``: all built-in ones) and an integer power-of-two upsampling factor (the
stride-4 logits of a padded image). Otherwise the whole-image computation runs, as
:func:`whole_image_mask_losses`.
"""
from typing import ContextManager, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..layers.context_switch import ContextSwitch
from .mask_losses import MaskLossType

__all__ = [
    "tiled_upsampled_mask_losses",
    "tiled_upsampled_mask_losses_enabled",
    "tile_values",
    "tiling_supported",
    "upsampled_mask_losses",
    "upsampled_tile",
    "upsampling_weights",
    "whole_image_mask_losses",
]

# values of the upsampled masks per tile (masks x rows x W): about 2 MB of float32 on a CPU, where
# a tile's intermediates should stay in the cache; 32 MB on other devices, where the point is the
# memory and each of a tile's dozens of operations is a kernel launch (not measured: no GPU here)
TILE_VALUES = 1 << 19
TILE_VALUES_ACCELERATOR = 1 << 23
# fewest source rows per tile; each tile also upsamples a row of margin on either side
MIN_TILE_ROWS = 4

_TILED = ContextSwitch("tiled_upsampled_mask_losses")


def tiled_upsampled_mask_losses(enabled: bool = True) -> ContextManager[None]:
    """Within this context :func:`upsampled_mask_losses` computes the losses tile by tile where it
    can (``MaskFormer`` and ``PanopticSegFormer`` training with ``optimize_training`` enter it);
    outside, as whole images."""
    return _TILED(enabled)


def tiled_upsampled_mask_losses_enabled() -> bool:
    """Whether the calling code runs inside :func:`tiled_upsampled_mask_losses`."""
    return _TILED.enabled()


def _power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def tiling_supported(low_size: Tuple[int, int], high_size: Tuple[int, int], kinds: Sequence[MaskLossType]) -> bool:
    """Whether :func:`upsampled_mask_losses` can tile: every loss has ``pixel_sums`` and the upsampling
    factor is the same power of two along both axes (a tile's bilinear source coordinates and weights
    are then those of the whole mask, exactly representable in float32)."""
    (h, w), (height, width) = low_size, high_size
    if h == 0 or w == 0 or height % h or width % w or height // h != width // w:
        return False
    return _power_of_two(height // h) and all(kind.pixel_sums is not None for kind in kinds)


def whole_image_mask_losses(
    src_masks: Tensor, tgt_masks: Tensor, kinds: Sequence[MaskLossType], num_masks: float
) -> List[Tensor]:
    """The mask losses of ``src_masks`` (N x h x w logits) upsampled (bilinear) to the size of
    ``tgt_masks`` (N x H x W; not resampled when it is that size), by each kind's ``loss`` on the
    whole images."""
    tgt_flat = tgt_masks.flatten(1)
    if src_masks.shape[-2:] != tgt_masks.shape[-2:]:
        src_masks = F.interpolate(src_masks[:, None], size=tgt_masks.shape[-2:], mode="bilinear", align_corners=False)
    src_flat = src_masks.flatten(1)
    return [kind.loss(src_flat, tgt_flat, num_masks) for kind in kinds]


def upsampled_mask_losses(
    src_masks: Tensor,
    tgt_masks: Tensor,
    kinds: Sequence[MaskLossType],
    num_masks: float,
    target_rows: Optional[Tensor] = None,
) -> List[Tensor]:
    """
    The mask losses of matched pairs at the targets' resolution, the predictions upsampled
    (bilinear, ``align_corners=False``) to it: tile by tile inside
    :func:`tiled_upsampled_mask_losses` where :func:`tiling_supported`, otherwise as whole images.

    Args:
        src_masks: N x h x w float32 mask logits (differentiable).
        tgt_masks: N x H x W float32 targets; with ``target_rows``, a K x H x W table of targets.
        kinds: the mask losses.
        num_masks: the normalizer of each loss's sum over the masks.
        target_rows: (optional) (N,) int64, the row of ``tgt_masks`` of each pair: the tiles then
            read their targets from the table, so that the matched targets of each decoder layer
            are never copied whole (6 copies of M x H x W float32 per step for MaskFormer).

    Returns:
        One scalar per kind, in order.

    Raises:
        ValueError: naming the shapes, when they do not pair the predictions with the targets.
    """
    _check_inputs(src_masks, tgt_masks, target_rows)
    if (
        tiled_upsampled_mask_losses_enabled()
        and src_masks.shape[0] > 0
        and tiling_supported(tuple(src_masks.shape[-2:]), tuple(tgt_masks.shape[-2:]), kinds)
    ):
        losses = _TiledMaskLosses.apply(src_masks, tgt_masks.detach(), target_rows, tuple(kinds), float(num_masks))
        return list(losses.unbind(0))
    if target_rows is not None:
        tgt_masks = tgt_masks.index_select(0, target_rows)
    return whole_image_mask_losses(src_masks, tgt_masks, kinds, num_masks)


def _check_inputs(src_masks: Tensor, tgt_masks: Tensor, target_rows: Optional[Tensor]) -> None:
    if src_masks.dim() != 3 or tgt_masks.dim() != 3:
        raise ValueError(
            f"upsampled_mask_losses: expected N x h x w logits and N x H x W (or K x H x W) targets, got "
            f"shapes {tuple(src_masks.shape)} and {tuple(tgt_masks.shape)}"
        )
    if target_rows is None:
        if tgt_masks.shape[0] != src_masks.shape[0]:
            raise ValueError(
                f"upsampled_mask_losses: {src_masks.shape[0]} predicted masks but {tgt_masks.shape[0]} "
                "targets; expected one target per prediction (or target_rows)"
            )
        return
    if target_rows.shape != (src_masks.shape[0],):
        raise ValueError(
            f"upsampled_mask_losses: target_rows must hold one row per predicted mask ({src_masks.shape[0]}), "
            f"got shape {tuple(target_rows.shape)}"
        )
    if target_rows.numel() and (target_rows.min() < 0 or target_rows.max() >= tgt_masks.shape[0]):
        raise ValueError(
            f"upsampled_mask_losses: target_rows must lie in [0, {tgt_masks.shape[0]}), the rows of the "
            f"targets' table, got {target_rows.min().item()} to {target_rows.max().item()}"
        )


def tile_values(device: torch.device) -> int:
    """The upsampled values per tile on ``device``."""
    return TILE_VALUES if device.type == "cpu" else TILE_VALUES_ACCELERATOR


def _tiles(
    num_masks: int, low_height: int, factor: int, width: int, values: int
) -> Iterator[Tuple[slice, int, int]]:
    """(masks, first source row, end source row) of each tile of about ``values`` upsampled values."""
    rows = max(MIN_TILE_ROWS, values // max(1, factor * width * num_masks))
    rows = min(rows, low_height)
    masks_per_tile = max(1, min(num_masks, values // max(1, factor * width * rows)))
    for first_mask in range(0, num_masks, masks_per_tile):
        masks = slice(first_mask, min(first_mask + masks_per_tile, num_masks))
        for start in range(0, low_height, rows):
            yield masks, start, min(start + rows, low_height)


def upsampled_tile(src_masks: Tensor, start: int, stop: int, factor: int, width: int) -> Tensor:
    """
    Rows ``start * factor : stop * factor`` of ``F.interpolate(src_masks[:, None], scale
    factor)``, bilinear with ``align_corners=False``, computed from source rows ``start - 1`` to
    ``stop`` only: the rows of the whole upsampled masks (the same source coordinates and weights;
    equal to float rounding).

    Args:
        src_masks: N x h x w.
        start, stop: source rows, 0 <= start < stop <= h.
        factor: the upsampling factor (a power of two; the output is (h * factor) x width).
        width: w * factor.

    Returns:
        N x ((stop - start) * factor) x width.
    """
    first, end = max(start - 1, 0), min(stop + 1, src_masks.shape[-2])
    slab = src_masks[:, first:end]
    upsampled = F.interpolate(slab[:, None], size=((end - first) * factor, width), mode="bilinear", align_corners=False)
    return upsampled[:, 0, (start - first) * factor : (stop - first) * factor]


def _tile_targets(tgt_masks: Tensor, target_rows: Optional[Tensor], masks: slice, start: int, stop: int) -> Tensor:
    """Rows ``start:stop`` of the targets of the pairs ``masks``: n x (stop - start) x W."""
    if target_rows is None:
        return tgt_masks[masks, start:stop]
    return tgt_masks[:, start:stop].index_select(0, target_rows[masks])


def _tile_sums(kinds: Sequence[MaskLossType], upsampled: Tensor, targets: Tensor) -> List[Tensor]:
    values, targets = upsampled.flatten(1), targets.flatten(1)
    return [kind.pixel_sums(values, targets) for kind in kinds]


def _tile_grad(kinds: Sequence[MaskLossType], upsampled: Tensor, targets: Tensor, coefficients: List[Tensor]) -> Tensor:
    """n x R x W: the gradient with respect to a tile's upsampled logits of its pixel sums, each
    kind's weighted by its coefficients (n x S): by the kinds' closed forms (``pixel_sums_grad``,
    all built-in losses have one) or else by autograd on their ``pixel_sums``."""
    values, flat_targets = upsampled.flatten(1), targets.flatten(1)
    if all(kind.pixel_sums_grad is not None for kind in kinds):
        grad = None
        for kind, c in zip(kinds, coefficients):
            kind_grad = kind.pixel_sums_grad(values, flat_targets, c)
            grad = kind_grad if grad is None else grad.add_(kind_grad)
        return grad.view_as(upsampled)
    values = values.detach().requires_grad_()
    with torch.enable_grad():
        weighted = sum((kind.pixel_sums(values, flat_targets) * c).sum() for kind, c in zip(kinds, coefficients))
        (grad,) = torch.autograd.grad(weighted, values)
    return grad.view_as(upsampled)


class _TiledMaskLosses(torch.autograd.Function):
    """Losses of upsampled masks from per-mask sums over tiles; the backward recomputes each tile."""

    @staticmethod
    def forward(
        ctx,
        src_masks: Tensor,
        tgt_masks: Tensor,
        target_rows: Optional[Tensor],
        kinds: Tuple[MaskLossType, ...],
        num_masks: float,
    ):
        num, low_height, low_width = src_masks.shape
        height, width = tgt_masks.shape[-2:]
        factor = height // low_height
        # per group of masks (keyed by its first mask, in order), per kind: n x S sums so far
        group_sums: Dict[int, List[Tensor]] = {}
        for masks, start, stop in _tiles(num, low_height, factor, width, tile_values(src_masks.device)):
            upsampled = upsampled_tile(src_masks[masks], start, stop, factor, width)
            targets = _tile_targets(tgt_masks, target_rows, masks, start * factor, stop * factor)
            tile_sums = _tile_sums(kinds, upsampled, targets)
            previous = group_sums.get(masks.start)
            group_sums[masks.start] = tile_sums if previous is None else [a + b for a, b in zip(previous, tile_sums)]
        totals = [torch.cat([group[k] for group in group_sums.values()]) for k in range(len(kinds))]
        ctx.save_for_backward(src_masks, tgt_masks, target_rows, *totals)
        ctx.kinds, ctx.num_masks = kinds, num_masks
        num_pixels = height * width
        return torch.stack([kind.loss_from_sums(total, num_pixels, num_masks) for kind, total in zip(kinds, totals)])

    @staticmethod
    @once_differentiable  # no double backward: an error, not a silently wrong second derivative
    def backward(ctx, grad_losses: Tensor):
        src_masks, tgt_masks, target_rows, *totals = ctx.saved_tensors
        kinds = ctx.kinds
        num, low_height, low_width = src_masks.shape
        height, width = tgt_masks.shape[-2:]
        factor = height // low_height
        with torch.enable_grad():
            # the gradient of the weighted losses with respect to each mask's sums: the tiles'
            # sums then enter the backward linearly, with these coefficients
            leaves = [total.detach().requires_grad_() for total in totals]
            losses = torch.stack(
                [kind.loss_from_sums(leaf, height * width, ctx.num_masks) for kind, leaf in zip(kinds, leaves)]
            )
            coefficients = torch.autograd.grad(losses, leaves, grad_losses, allow_unused=True, materialize_grads=True)
        # the backward of the upsampling as products with its (sparse, small) weight matrices:
        # upsampled = rows @ masks @ columns^T (PyTorch's CPU kernel of the upsampling's backward
        # took a third of this backward's time, 7 ms per tile)
        rows_weights = upsampling_weights(low_height, height, src_masks)  # H x h
        columns_weights = upsampling_weights(low_width, width, src_masks)  # W x w
        grad = torch.zeros_like(src_masks)
        for masks, start, stop in _tiles(num, low_height, factor, width, tile_values(src_masks.device)):
            first, end = max(start - 1, 0), min(stop + 1, low_height)
            upsampled = upsampled_tile(src_masks[masks], start, stop, factor, width)
            targets = _tile_targets(tgt_masks, target_rows, masks, start * factor, stop * factor)
            tile_grad = _tile_grad(kinds, upsampled, targets, [coefficient[masks] for coefficient in coefficients])
            tile_rows = rows_weights[start * factor : stop * factor, first:end]  # R x (end - first)
            slab_grad = torch.matmul(tile_rows.t(), tile_grad)  # n x (end - first) x W
            grad[masks, first:end] += torch.matmul(slab_grad, columns_weights)
        return grad, None, None, None, None


def upsampling_weights(low_size: int, size: int, like: Tensor) -> Tensor:
    """
    ``size x low_size``: the weights of bilinear upsampling (``align_corners=False``) along one
    axis, from ``low_size`` to ``size`` values, as ``F.interpolate`` applies them (it is run on the
    identity), so that upsampling a ``low_size`` vector ``x`` is ``weights @ x``.
    """
    identity = torch.eye(low_size, dtype=like.dtype, device=like.device)
    # along the last axis only (the other one keeps its size: scale 1, the identity)
    return F.interpolate(identity[None, None], size=(low_size, size), mode="bilinear", align_corners=False)[0, 0].t()
