"""Which query owns each pixel in MaskFormer's pixel-wise panoptic merge, and each query's mask area.

For the kept queries of one image (class scores ``s``, mask logits ``x``), the merge needs

* ``owner[p] = argmax_q s_q * sigmoid(x_q[p])`` (first query on a tie), and
* ``own_area[q] = #{p : sigmoid(x_q[p]) >= 0.5}``,

exactly as the plain formulation ``(s[:, None, None] * sigmoid(mask_pred[keep])).argmax(0)``
computes them.

On the CPU, the plain formulation reads and writes the n x H x W probabilities several times
through memory. :func:`certified_pixel_owners` instead streams the logits once, in cache-sized
blocks of pixels, and takes one exactness argument into account: torch's CPU ``sigmoid`` has a
vectorised and a scalar code path that may differ in the last bit of the result, and which
elements of a tensor take which path depends on its size and the threads. So a block's
probabilities may differ from the plain formulation's by a few units in the last place, and the
block pass certifies its answers instead of trusting them:

* a pixel whose best product is ahead of every other by more than ``_NEAR_MAX_MARGIN`` (relative)
  has the same owner whatever the code path; other pixels (near-ties, tiny or NaN products) are
  decided again from both code paths' sigmoids of their logits;
* a probability further than ``_HALF_BAND`` from 0.5 is on the same side of 0.5 whatever the
  code path; the blocks of a row holding others are counted again from both code paths.

Where the two code paths disagree on such a re-checked element, the answer could depend on the
path: :func:`certified_pixel_owners` then returns None, and the caller runs the plain formulation
itself. What it returns is therefore always the plain formulation's result.
"""
from typing import Optional, Tuple

import torch

__all__ = ["certified_pixel_owners", "certifiable", "MAX_CERTIFIED_QUERIES"]

# How far apart the two sigmoid code paths can be: on every float32 input, measured on an Intel
# Xeon with AVX-512 (torch 2.14), at most 4 units in the last place, and 2.7e-7 (2^-21.8)
# relative where the sigmoid is above 1e-30; never on different sides of 0.5. The margins below
# leave a factor of about 50 (relative) and of 4 (around 0.5).
# Products within this relative distance of a pixel's best product make the pixel a near-tie.
_NEAR_MAX_MARGIN = 2.0**-16
# Pixels whose best product is below this are decided again: relative differences grow near
# float32's smallest normal numbers (2^-126).
_TINY_PRODUCT = 2.0**-100
# Probabilities within this distance of 0.5 (units in the last place there: 2^-24 and 2^-25) are
# counted again, from the logits within _LOGIT_BAND of 0 (sigmoid(x) - 0.5 is about x / 4).
_HALF_BAND = 2.0**-20
_LOGIT_BAND = 2.0**-16
# Logits per block of pixels and per thread (512 KiB of float32): the block's probabilities, their
# products and flags stay in the threads' caches from one operation to the next.
_BLOCK_ELEMENTS_PER_THREAD = 1 << 17
# The rank of a query is summed in a float32 matrix product, possibly computed in bfloat16 (if the
# user allowed reduced-precision matmuls): integers up to 256 are exact there.
MAX_CERTIFIED_QUERIES = 256
# Beyond this fraction of pixels to decide again, the plain formulation is faster.
_MAX_UNCERTAIN_FRACTION = 1 / 16
# torch runs an element-wise kernel on a contiguous tensor of fewer elements than its grain size
# (32768) in one loop, vectorised but for the last elements (fewer than 2 x 16 floats). Pieces of
# this many elements, followed by this much padding, take the vectorised code path throughout.
_VECTOR_PIECE = 8192
_VECTOR_PADDING = 64


def certifiable(mask_pred: torch.Tensor, num_kept: int) -> bool:
    """Whether :func:`certified_pixel_owners` takes these inputs: float32 logits on the CPU and
    1 to ``MAX_CERTIFIED_QUERIES`` kept queries."""
    return (mask_pred.device.type == "cpu" and mask_pred.dtype == torch.float32
            and 1 <= num_kept <= MAX_CERTIFIED_QUERIES)


def certified_pixel_owners(
    mask_pred: torch.Tensor, kept_index: torch.Tensor, kept_scores: torch.Tensor
) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """
    The plain formulation's pixel owners and mask areas, computed in blocks of pixels with
    certified answers (see the module docstring).

    Args:
        mask_pred: Q x H x W float32 mask logits of all queries, on the CPU.
        kept_index: n int64, the kept queries (increasing), 1 <= n <= 256.
        kept_scores: n class scores of the kept queries (positive).

    Returns:
        owner: H*W int64, for each pixel the index into the kept queries of its owner,
            ``(kept_scores[:, None] * sigmoid(mask_pred[kept_index]).flatten(1)).argmax(0)``.
        own_area: n int64, the pixels of each kept query whose mask probability is >= 0.5.

        None where the answer could depend on the sigmoid's code path (or where so many pixels
        need deciding again that the plain formulation is faster).
    """
    if not (mask_pred.device.type == "cpu" and mask_pred.dtype == torch.float32):
        raise ValueError(f"mask_pred must be float32 on the CPU, got {mask_pred.dtype} on {mask_pred.device}")
    if not certifiable(mask_pred, kept_index.numel()):
        raise ValueError(f"1 to {MAX_CERTIFIED_QUERIES} kept queries are supported, got {kept_index.numel()}")
    # integer answers: no gradient flows through them (and torch's out= arguments refuse autograd)
    logits = mask_pred.detach().reshape(mask_pred.shape[0], -1)  # Q x HW
    kept_scores = kept_scores.detach()
    num_kept, num_pixels = kept_index.numel(), logits.shape[1]
    if num_pixels == 0:
        return torch.empty(0, dtype=torch.long), torch.zeros(num_kept, dtype=torch.long)
    block_elements = _BLOCK_ELEMENTS_PER_THREAD * torch.get_num_threads()
    block = max(32, block_elements // num_kept // 32 * 32)
    near_best, area_counts = _scan_blocks(logits, kept_index, kept_scores, block)

    owner = torch.sub(num_kept, near_best[:, 1]).long().view(-1)[:num_pixels]
    uncertain_pixels = (near_best[:, 0] != 1).view(-1).nonzero().squeeze(1)
    if uncertain_pixels.numel() > num_pixels * _MAX_UNCERTAIN_FRACTION:
        return None
    if uncertain_pixels.numel() > 0:
        decided = _owners_from_both_paths(logits, kept_index, kept_scores, uncertain_pixels)
        if decided is None:
            return None
        owner[uncertain_pixels] = decided

    certain_area, possible_area = area_counts.unbind(1)
    for block_index, row in (certain_area != possible_area).nonzero().tolist():
        start = block_index * block
        counted = _area_from_both_paths(logits[kept_index[row], start : start + block])
        if counted is None:
            return None
        certain_area[block_index, row] = counted
    own_area = certain_area.sum(0, dtype=torch.float64).long()
    return owner, own_area


def _scan_blocks(
    logits: torch.Tensor, kept_index: torch.Tensor, kept_scores: torch.Tensor, block: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    The pass over the logits, ``block`` pixels at a time.

    Args:
        logits: Q x HW; kept_index: n; kept_scores: n; block: pixels per block.

    Returns:
        near_best: num_blocks x 2 x block float32: per pixel, the number of kept queries whose
            product is within ``_NEAR_MAX_MARGIN`` of the best (row 0) and the sum of their ranks
            n - q (row 1); pixels past the last count as certain (one query, rank 0).
        area_counts: num_blocks x 2 x n float32: per block, each query's probabilities
            >= 0.5 + ``_HALF_BAND`` (row 0) and >= 0.5 - ``_HALF_BAND`` (row 1).
    """
    num_kept, num_pixels = kept_index.numel(), logits.shape[1]
    num_blocks = -(-num_pixels // block)
    scores = kept_scores.to(torch.float32)[:, None]
    count_and_rank = torch.stack([torch.ones(num_kept), torch.arange(num_kept, 0, -1, dtype=torch.float32)])
    near_best = torch.empty(num_blocks, 2, block)
    area_counts = torch.empty(num_blocks, 2, num_kept)
    workspaces = {}
    for index, start in enumerate(range(0, num_pixels, block)):
        width = min(block, num_pixels - start)
        if width not in workspaces:
            workspaces[width] = _BlockWorkspace(num_kept, width)
        workspace = workspaces[width]
        probs, flags = workspace.probs, workspace.flags
        torch.index_select(logits[:, start : start + width], 0, kept_index, out=probs)
        probs.sigmoid_()
        counts = area_counts[index]
        torch.mv(torch.ge(probs, workspace.band_top, out=flags), workspace.ones, out=counts[0])
        torch.mv(torch.ge(probs, workspace.band_bottom, out=flags), workspace.ones, out=counts[1])
        products = probs.mul_(scores)
        best = _max_over_rows(products, out=workspace.threshold, halves=workspace.halves)
        # (1 - margin) x best - tiny: a pixel whose best product is tiny has every query near it
        torch.add(workspace.minus_tiny, best, alpha=1 - _NEAR_MAX_MARGIN, out=workspace.threshold)
        torch.ge(products, workspace.threshold, out=flags)
        torch.mm(count_and_rank, flags, out=near_best[index, :, :width] if width < block else near_best[index])
    near_best[-1, 0, num_pixels - (num_blocks - 1) * block :] = 1
    return near_best, area_counts


class _BlockWorkspace:
    """The buffers of :func:`certified_pixel_owners` for blocks of ``width`` pixels, made once."""

    def __init__(self, num_kept: int, width: int):
        self.probs = torch.empty(num_kept, width)
        self.flags = torch.empty(num_kept, width)
        self.ones = torch.ones(width)
        self.threshold = torch.empty(width)
        self.halves = torch.empty(2, width)
        self.minus_tiny = torch.full((width,), -_TINY_PRODUCT)
        # 0-dim tensors: torch compares with them faster than with Python numbers
        self.band_top = torch.tensor(0.5 + _HALF_BAND)
        self.band_bottom = torch.tensor(0.5 - _HALF_BAND)


def _max_over_rows(values: torch.Tensor, out: torch.Tensor, halves: torch.Tensor) -> torch.Tensor:
    """
    ``torch.amax(values, 0, out=out)`` for an n x w ``values`` (n >= 1), as the maximum of the two
    halves' maxima: torch then splits the work between two threads by rows, as it split the
    element-wise operation that wrote ``values``, and each thread reads what is in its own cache.
    ``halves`` is 2 x w scratch.
    """
    half = values.shape[0] // 2
    if half == 0:
        return out.copy_(values[0])
    torch.amax(values[: 2 * half].view(2, half, -1), 1, out=halves)
    torch.maximum(halves[0], halves[1], out=out)
    if values.shape[0] > 2 * half:
        torch.maximum(out, values[-1], out=out)
    return out


def _owners_from_both_paths(
    logits: torch.Tensor, kept_index: torch.Tensor, kept_scores: torch.Tensor, pixels: torch.Tensor
) -> Optional[torch.Tensor]:
    """
    The plain formulation's owners of ``pixels`` (k int64 indices into H*W), or None where they
    could depend on the sigmoid's code path: the owner is certified if its product, at its lowest
    over the two code paths, beats every earlier query's highest and reaches every later one's.
    """
    vectorised, scalar = _sigmoid_on_both_paths(logits[kept_index[:, None], pixels[None, :]])  # n x k
    products = kept_scores[:, None] * vectorised
    other_products = kept_scores[:, None] * scalar
    lowest, highest = torch.minimum(products, other_products), torch.maximum(products, other_products)
    owner = products.argmax(0)
    owner_lowest = lowest.gather(0, owner[None, :])
    query = torch.arange(kept_index.numel(), device=owner.device)[:, None]
    beaten = torch.where(query < owner[None, :], highest < owner_lowest, highest <= owner_lowest)
    certified = (beaten | (query == owner[None, :])).all(0)
    return owner if bool(certified.all()) else None


def _area_from_both_paths(row_logits: torch.Tensor) -> Optional[int]:
    """``#{p : sigmoid(row_logits[p]) >= 0.5}`` as any code path computes it, or None where that
    depends on the path. Only logits near 0 can give a probability near 0.5."""
    near_zero = row_logits.abs() <= _LOGIT_BAND
    vectorised, scalar = _sigmoid_on_both_paths(row_logits[near_zero])
    at_least_half = vectorised >= 0.5
    if not torch.equal(at_least_half, scalar >= 0.5):
        return None
    return int((row_logits > _LOGIT_BAND).sum()) + int(at_least_half.sum())


def _sigmoid_on_both_paths(logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``sigmoid(logits)`` by torch's vectorised and by its scalar CPU code path."""
    flat = logits.reshape(-1)
    vectorised = torch.empty_like(flat)
    for start in range(0, flat.numel(), _VECTOR_PIECE):
        piece = flat[start : start + _VECTOR_PIECE]
        padded = torch.zeros(piece.numel() + _VECTOR_PADDING, dtype=flat.dtype)
        padded[: piece.numel()] = piece
        vectorised[start : start + piece.numel()] = padded.sigmoid_()[: piece.numel()]
    # a strided input makes torch's element-wise loop call the scalar function on every element
    strided = torch.zeros(flat.numel(), 2, dtype=flat.dtype)
    strided[:, 0] = flat
    scalar = strided[:, 0].sigmoid()
    return vectorised.view(logits.shape), scalar.view(logits.shape)
