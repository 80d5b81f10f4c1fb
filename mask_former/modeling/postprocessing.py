"""Inference post-processing: turn one image's (class, mask) query pairs into the three outputs.

The MaskFormer-facing functions take the predictions of ONE image:

* ``mask_cls``: Q x (K+1) class logits; the last column is the "no object" class.
* ``mask_pred``: Q x H x W mask logits, already resized to the requested output size.

and return what detectron2's evaluators and ``Visualizer`` consume:

* :func:`semantic_inference` -> ``sem_seg`` (K x H x W per-class scores, for ``SemSegEvaluator``),
* :func:`panoptic_inference` -> ``panoptic_seg`` (id map, segments_info), for
  ``COCOPanopticEvaluator`` and ``Visualizer.draw_panoptic_seg``: MaskFormer's pixel-wise merge,
* :func:`mask_wise_panoptic_inference` -> the same output by Panoptic SegFormer's mask-wise merge,
  :func:`mask_wise_merge`, which takes class ids, class scores and mask probabilities and so
  serves any model,
* :func:`instance_inference` -> ``instances`` (:class:`Instances`), for ``COCOEvaluator``.

Class ids are contiguous ids in ``[0, K)`` throughout.

Speed and exactness: the functions are vectorised over queries and pixels; only the mask-wise
merge loops, over its candidates, as its definition is sequential. On the CPU, Q x H x W work goes
through cache-sized blocks, and where one of torch's CPU kernels is slow for these shapes (sums of
bool tensors, comparisons into bool tensors, argmax over the query dimension, max with indices,
bool ``any``, float ``where``), an equivalent formulation gives the same result exactly
(:func:`_count_true`, :func:`_argmax_over_queries`, :func:`_max_over_classes`, comparisons written
into float 0 / 1 tensors). The outputs of :func:`panoptic_inference` are identical to those of the
plain formulation written in its docstring, and so are those of :func:`instance_inference` but for
its scores, which equal it to float rounding (tests compare both with loop implementations). For
the panoptic output, ``sigmoid``'s vectorised and scalar CPU code paths can differ in the last bit,
and which elements take which path depends on the tensor's size and on the threads: on the CPU,
:func:`mask_former.modeling.pixel_owners.certified_pixel_owners` streams the logits in blocks and
certifies that its answers do not depend on the path, and where it cannot, ``sigmoid`` is applied
to the very tensor of the plain formulation.
"""
import math
from typing import Collection, Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.structures import Boxes, Instances
from torch.nn import functional as F

from .pixel_owners import certifiable, certified_pixel_owners

__all__ = [
    "semantic_inference",
    "panoptic_inference",
    "mask_wise_merge",
    "mask_wise_panoptic_inference",
    "instance_inference",
    "filter_panoptic",
    "binarize_masks",
    "boxes_from_profiles",
]

# uint8 sums of this many zeros and ones cannot overflow.
_UINT8_BLOCK = 255
# On the CPU, work on Q x H x W tensors goes through blocks of about this many elements (2 MiB of
# float32), which stay in cache between operations: the inference is memory-bound otherwise.
_CPU_BLOCK_ELEMENTS = 1 << 19


def _blocks(length: int, other_size: int, device: torch.device) -> List[slice]:
    """
    Slices cutting ``range(length)`` into blocks of about ``_CPU_BLOCK_ELEMENTS / other_size``
    (at least 1) on the CPU, one block elsewhere (a GPU is not helped by blocking).
    """
    if device.type != "cpu":
        return [slice(0, length)]
    step = max(1, _CPU_BLOCK_ELEMENTS // max(other_size, 1))
    return [slice(start, min(start + step, length)) for start in range(0, length, step)]


def _check_predictions(mask_cls: torch.Tensor, mask_pred: torch.Tensor) -> None:
    if mask_cls.dim() != 2 or mask_cls.shape[1] < 2:
        raise ValueError(
            "mask_cls must be Q x (K+1) class logits with K >= 1 (last column = no object), "
            f"got shape {tuple(mask_cls.shape)}"
        )
    if mask_pred.dim() != 3:
        raise ValueError(f"mask_pred must be Q x H x W mask logits, got shape {tuple(mask_pred.shape)}")
    if mask_cls.shape[0] != mask_pred.shape[0]:
        raise ValueError(
            f"mask_cls has {mask_cls.shape[0]} queries but mask_pred has {mask_pred.shape[0]}; "
            "they must describe the same queries"
        )


def _check_thing_ids(thing_ids: Collection[int], num_classes: int) -> set:
    thing_ids = {int(c) for c in thing_ids}
    invalid = sorted(c for c in thing_ids if not 0 <= c < num_classes)
    if invalid:
        raise ValueError(
            f"thing_ids must be contiguous class ids in [0, {num_classes}), got {invalid}; "
            "pass metadata.thing_dataset_id_to_contiguous_id.values(), not dataset ids"
        )
    return thing_ids


def _is_thing(labels: torch.Tensor, thing_ids: Collection[int]) -> torch.Tensor:
    """N bool: whether each class id in ``labels`` (N int64) is in ``thing_ids``."""
    things = torch.tensor(sorted(thing_ids), dtype=labels.dtype, device=labels.device)
    return torch.isin(labels, things)


# ----------------------------------------------------------------------------- fast exact kernels


def _max_over_classes(probs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    ``probs.max(-1)``: the highest value of each row and its first index (torch documents argmax
    as max's index). torch's max-with-indices kernel has a fixed cost of ~20 ms per call with 2
    CPU threads (measured on torch 2.14), argmax + gather costs microseconds.

    Args:
        probs: Q x K.

    Returns:
        values (Q), indices (Q int64).
    """
    indices = probs.argmax(-1)
    return probs.gather(-1, indices[:, None]).squeeze(-1), indices


def _count_true(masks: torch.Tensor) -> torch.Tensor:
    """
    Number of True values in each row.

    Args:
        masks: N x ... bool tensor.

    Returns:
        N int64 tensor, equal to ``masks.flatten(1).sum(1)``. (torch's bool sum converts every
        element to int64 and is about 10x slower on the CPU than these uint8 block sums.)
    """
    flat = masks.flatten(1).view(torch.uint8)
    num_blocks = flat.shape[1] // _UINT8_BLOCK
    split = num_blocks * _UINT8_BLOCK
    counts = flat[:, split:].sum(1)
    if num_blocks > 0:
        blocks = flat[:, :split].unflatten(1, (num_blocks, _UINT8_BLOCK))
        counts = counts + blocks.sum(2, dtype=torch.uint8).sum(1)
    return counts


def _first_and_end(flags: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Args:
        flags: N x L bool.

    Returns:
        first: N int64, index of the first True of each row (L for a row without True).
        end: N int64, index of the last True + 1 (0 for a row without True).
    """
    positions = torch.arange(flags.shape[1], device=flags.device)
    first = torch.where(flags, positions, flags.shape[1]).amin(1)
    end = torch.where(flags, positions + 1, 0).amax(1)
    return first, end


def boxes_from_profiles(in_column: torch.Tensor, in_row: torch.Tensor) -> torch.Tensor:
    """
    Tight boxes around binary masks, given which columns and rows of each mask hold a True pixel
    (equal to ``BitMasks(masks).get_bounding_boxes().tensor``).

    Args:
        in_column: N x W bool, ``masks.any(1)``; in_row: N x H bool, ``masks.any(2)``.

    Returns:
        N x 4 float32 (x1, y1, x2, y2), absolute, x2 / y2 one past the last pixel of the mask;
        all zero for an empty mask.
    """
    x1, x2 = _first_and_end(in_column)
    y1, y2 = _first_and_end(in_row)
    corners = torch.stack([x1, y1, x2, y2], dim=1).to(torch.float32)
    return torch.where(in_column.any(1)[:, None], corners, torch.zeros_like(corners))


def _argmax_over_queries(values: torch.Tensor) -> torch.Tensor:
    """
    ``values.argmax(0)``: for each pixel, the first query with the highest value (a NaN counts as
    the highest value, as in ``torch.argmax``).

    Args:
        values: n x ..., n >= 1 (n x H x W, or n x pixels).

    Returns:
        ... int64 query indices.
    """
    num_queries = values.shape[0]
    if values.device.type != "cpu" or num_queries > torch.iinfo(torch.int16).max:
        return values.argmax(0)
    # torch's CPU argmax over the leading dimension is not vectorised, its max is: the first query
    # reaching the max is the one with the largest rank n - k among the queries equal to it. The
    # comparison writes float32 0 / 1 (vectorised; into bool it is not), and ranks up to 2^15 are
    # exact in float32.
    best = values.amax(0)
    ranks = torch.arange(num_queries, 0, -1, dtype=torch.float32, device=values.device)
    ranked = torch.eq(values, best, out=torch.empty(values.shape, dtype=torch.float32, device=values.device))
    ranked.mul_(ranks.view((-1,) + (1,) * (values.dim() - 1)))
    first = num_queries - ranked.amax(0).long()
    nan_pixels = first == num_queries  # only where the max is NaN, which equals nothing
    if nan_pixels.any():
        first[nan_pixels] = values[:, nan_pixels].argmax(0)
    return first


# ----------------------------------------------------------------------------- segment bookkeeping


def _number_segments(
    kept: torch.Tensor, labels: torch.Tensor, isthing: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Segment ids of candidates taken in order: every kept thing opens a segment; the first kept
    candidate of a stuff class opens that class's segment and later kept candidates of the class
    join it. Ids count from 1 in order of opening.

    Args:
        kept: n bool; labels: n int64 class ids; isthing: n bool.

    Returns:
        segment_id: n int64, the segment of each candidate (0 for candidates not kept).
        opens: n bool, the candidates that open a segment (their ids increase with their index).
    """
    index = torch.arange(labels.numel(), device=labels.device)
    kept_stuff = kept & ~isthing
    # [i, j]: candidate j is kept stuff of the class of candidate i
    same_kept_stuff = (labels[:, None] == labels[None, :]) & kept_stuff[None, :]
    joins_earlier = (same_kept_stuff & (index[None, :] < index[:, None])).any(1)
    opens = kept & (isthing | ~joins_earlier)
    opened_id = torch.cumsum(opens, dim=0)
    first_of_class = same_kept_stuff.to(torch.int32).argmax(1)  # first True; for kept stuff, <= i
    segment_id = torch.where(isthing, opened_id, opened_id[first_of_class])
    return torch.where(kept, segment_id, 0), opens


def _segments_info(
    segment_id: torch.Tensor,
    opens: torch.Tensor,
    labels: torch.Tensor,
    isthing: torch.Tensor,
    scores: torch.Tensor,
    pixel_counts: torch.Tensor,
) -> List[Dict]:
    """
    detectron2's ``segments_info`` from the per-candidate bookkeeping of :func:`_number_segments`.

    Args:
        segment_id, opens, labels, isthing: as in :func:`_number_segments` (n each).
        scores: n class scores; the "score" of a thing segment.
        pixel_counts: n int64, the pixels each candidate gives to its segment.

    Returns:
        one dict per segment, in increasing id order: ``{"id", "isthing", "category_id", "area"}``
        plus ``"score"`` for things, all plain Python numbers.
    """
    opening = opens.nonzero().squeeze(1)
    area = torch.zeros(segment_id.numel() + 1, dtype=torch.long, device=segment_id.device)
    area.scatter_add_(0, segment_id, pixel_counts)
    columns = torch.stack(
        [segment_id[opening], isthing[opening].long(), labels[opening], area[segment_id[opening]]], dim=1
    )
    segments_info = []
    for (seg_id, thing, label, seg_area), score in zip(columns.tolist(), scores[opening].tolist()):
        info = {"id": seg_id, "isthing": bool(thing), "category_id": label, "area": seg_area}
        if thing:
            info["score"] = score
        segments_info.append(info)
    return segments_info


# ----------------------------------------------------------------------------- semantic


def semantic_inference(mask_cls: torch.Tensor, mask_pred: torch.Tensor) -> torch.Tensor:
    """
    Per-pixel class scores: each query votes for every class with its class probability
    times its mask probability; the "no object" probability is dropped.

    Args:
        mask_cls: Q x (K+1) class logits.
        mask_pred: Q x H x W mask logits.

    Returns:
        K x H x W tensor, ``sum_q softmax(mask_cls)[q, c] * sigmoid(mask_pred)[q, h, w]``.
    """
    _check_predictions(mask_cls, mask_pred)
    class_probs = F.softmax(mask_cls, dim=-1)[:, :-1]
    mask_probs = mask_pred.sigmoid()
    return torch.einsum("qc,qhw->chw", class_probs, mask_probs)


# ----------------------------------------------------------------------------- panoptic


def panoptic_inference(
    mask_cls: torch.Tensor,
    mask_pred: torch.Tensor,
    thing_ids: Collection[int],
    object_mask_threshold: float,
    overlap_threshold: float,
) -> Tuple[torch.Tensor, List[Dict]]:
    """
    Panoptic segmentation as in the MaskFormer paper (pixel-wise merge).

    Queries whose most likely class is "no object", or whose top class probability is not above
    ``object_mask_threshold``, are dropped. Each pixel goes to the kept query with the highest
    ``class score * mask probability`` (the first such query on a tie). A query's segment is
    dropped (its pixels become void, 0) when it wins no pixel, when its own mask (probability
    >= 0.5) is empty, or when it wins less than ``overlap_threshold`` of its own mask. Segments of
    one stuff class are merged into one segment; every thing query gives its own segment. Segment
    ids are assigned from 1 in query order, counting only the segments that are kept.

    Plain formulation (the result is identical): ``p = sigmoid(mask_pred[keep])``,
    ``owner = (score[:, None, None] * p).argmax(0)``, then a loop over the kept queries.

    Args:
        mask_cls: Q x (K+1) class logits.
        mask_pred: Q x H x W mask logits.
        thing_ids: contiguous class ids that are things (all other classes are stuff).
        object_mask_threshold: a query is kept only if its top class probability is above this.
        overlap_threshold: minimum (pixels won) / (pixels of its own mask) for a segment to be kept.

    Returns:
        panoptic_seg: H x W int32 tensor of segment ids; 0 is void, segments are numbered from 1.
        segments_info: one dict per segment id in ``panoptic_seg``, in increasing id order:
            ``{"id": int, "isthing": bool, "category_id": int (contiguous), "area": int}``,
            plus ``"score": float`` (the class probability) for things.
            This is detectron2's format for ``COCOPanopticEvaluator`` and
            ``Visualizer.draw_panoptic_seg``.
    """
    _check_predictions(mask_cls, mask_pred)
    num_classes = mask_cls.shape[1] - 1
    thing_ids = _check_thing_ids(thing_ids, num_classes)

    scores, labels = _max_over_classes(F.softmax(mask_cls, dim=-1))
    keep = (labels != num_classes) & (scores > object_mask_threshold)
    kept_scores = scores[keep]
    kept_labels = labels[keep]

    panoptic_seg = torch.zeros(mask_pred.shape[-2:], dtype=torch.int32, device=mask_pred.device)
    num_kept = kept_labels.numel()
    if num_kept == 0 or panoptic_seg.numel() == 0:  # nothing kept, or an image without pixels
        return panoptic_seg, []

    certified = None
    if certifiable(mask_pred, num_kept):
        certified = certified_pixel_owners(mask_pred, keep.nonzero().squeeze(1), kept_scores)
    if certified is not None:
        pixel_owner, own_area = certified
    else:
        pixel_owner, own_area = _plain_pixel_owners(mask_pred, keep, kept_scores)
    won_area = torch.bincount(pixel_owner, minlength=num_kept)
    pixel_owner = pixel_owner.view(mask_pred.shape[-2:])

    won_fraction = won_area.double() / own_area.clamp(min=1).double()
    kept_segment = (won_area > 0) & (own_area > 0) & ~(won_fraction < overlap_threshold)
    isthing = _is_thing(kept_labels, thing_ids)
    segment_id, opens = _number_segments(kept_segment, kept_labels, isthing)
    panoptic_seg = segment_id.to(torch.int32)[pixel_owner]
    return panoptic_seg, _segments_info(segment_id, opens, kept_labels, isthing, kept_scores, won_area)


def _plain_pixel_owners(
    mask_pred: torch.Tensor, keep: torch.Tensor, kept_scores: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    The pixel owners and mask areas of :func:`panoptic_inference`'s plain formulation, computed on
    the very tensor ``sigmoid(mask_pred[keep])``.

    Returns:
        owner: H*W int64 index into the kept queries; own_area: n int64 pixels with p >= 0.5.
    """
    num_kept = kept_scores.numel()
    kept_probs = _sigmoid_of_rows(mask_pred, keep).reshape(num_kept, -1)  # n x HW, ours to overwrite
    own_area = torch.zeros(num_kept, dtype=torch.long, device=mask_pred.device)
    pixel_owner = torch.empty(kept_probs.shape[1], dtype=torch.long, device=mask_pred.device)
    in_place = torch.result_type(kept_scores, kept_probs) == kept_probs.dtype
    blocks = _blocks(kept_probs.shape[1], num_kept, mask_pred.device)
    # float32 0 / 1 flags: a comparison into bool is not vectorised on the CPU; the counts are exact
    flags = torch.empty((num_kept, blocks[0].stop - blocks[0].start), dtype=torch.float32, device=mask_pred.device)
    for pixels in blocks:
        probs = kept_probs[:, pixels]
        own_area += torch.ge(probs, 0.5, out=flags[:, : probs.shape[1]]).sum(1).long()
        weighted = probs.mul_(kept_scores[:, None]) if in_place else kept_scores[:, None] * probs
        pixel_owner[pixels] = _argmax_over_queries(weighted)  # index into the kept queries
    return pixel_owner, own_area


def _sigmoid_of_rows(mask_pred: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """
    ``mask_pred[keep].sigmoid()`` (a new tensor the caller may overwrite), without the copy when
    every row is kept: the sigmoid of a contiguous tensor with the same values is the same.

    Args:
        mask_pred: Q x H x W logits; keep: Q bool.
    """
    if mask_pred.is_contiguous() and bool(keep.all()):
        return mask_pred.sigmoid()
    return mask_pred[keep].sigmoid_()  # the very indexing of the plain formulation: same layout


def _check_merge_arguments(labels: torch.Tensor, scores: torch.Tensor, mask_probs: torch.Tensor, **thresholds):
    """ValueError unless labels and scores have one entry per mask of the N x H x W ``mask_probs``,
    labels are integers and every threshold is in [0, 1] (alpha and beta: >= 0)."""
    if mask_probs.dim() != 3:
        raise ValueError(f"mask_probs must be N x H x W mask probabilities, got shape {tuple(mask_probs.shape)}")
    num_masks = mask_probs.shape[0]
    if labels.shape != (num_masks,) or scores.shape != (num_masks,):
        raise ValueError(
            f"labels and scores must have one entry per mask ({num_masks},), got shapes "
            f"{tuple(labels.shape)} and {tuple(scores.shape)}"
        )
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}")
    for name, value in thresholds.items():
        low, high = (0.0, float("inf")) if name in ("alpha", "beta") else (0.0, 1.0)
        if not low <= value <= high:
            raise ValueError(f"{name} must be in [{low}, {high}], got {value!r}")


def binarize_masks(mask_probs: torch.Tensor, threshold: float):
    """
    Binary masks, their areas and the probability mass inside them, in blocks of masks.

    Args:
        mask_probs: N x H x W probabilities.

    Returns:
        binary: N x H x W bool, ``mask_probs > threshold``; area: N int64;
        prob_in_mask: N, ``sum(mask_probs * binary)`` in float32 or wider.
    """
    num_masks = mask_probs.shape[0]
    dtype = torch.promote_types(mask_probs.dtype, torch.float32)
    binary = torch.empty(mask_probs.shape, dtype=torch.bool, device=mask_probs.device)
    area = torch.empty(num_masks, dtype=torch.long, device=mask_probs.device)
    prob_in_mask = torch.empty(num_masks, dtype=dtype, device=mask_probs.device)
    blocks = _blocks(num_masks, math.prod(mask_probs.shape[1:]), mask_probs.device)
    # The comparison is written as float 0 / 1 (vectorised on the CPU, into bool it is not), copied
    # to bool, and then multiplied by the probabilities in place (a float where() is slow).
    flags = torch.empty((blocks[0].stop - blocks[0].start,) + mask_probs.shape[1:], dtype=dtype,
                        device=mask_probs.device) if num_masks else None
    for rows in blocks:
        probs = mask_probs[rows]
        inside = torch.gt(probs, threshold, out=flags[: probs.shape[0]])
        binary[rows] = inside
        area[rows] = _count_true(binary[rows])
        prob_in_mask[rows] = inside.mul_(probs).flatten(1).sum(1)
    return binary, area, prob_in_mask


def _place_masks(
    binary: torch.Tensor, order: torch.Tensor, max_overlap: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    The sequential walk of the mask-wise merge: candidate ``order[i]`` is accepted when at most
    ``max_overlap[i]`` of its pixels are already taken by accepted candidates, and then takes its
    free pixels. The loop over candidates is the only one; its state stays in tensors (no
    synchronisation with the device inside; uint8 views, as bool ops that broadcast are slow).

    Args:
        binary: N x H x W bool masks; order: n int64, the candidates in walk order;
        max_overlap: n, the number of taken pixels each may have (float64).

    Returns:
        accepted: n bool.
        owner: H x W int64, the walk position i of the candidate owning each pixel, n for none.
    """
    flat = binary.flatten(1).view(torch.uint8)
    taken = torch.zeros(flat.shape[1], dtype=torch.uint8, device=binary.device)
    accepted = []
    for position, candidate in enumerate(order.tolist()):
        mask = flat[candidate]
        overlap = _count_true((mask & taken)[None].view(torch.bool))[0]
        ok = overlap <= max_overlap[position]
        taken |= mask * ok.to(torch.uint8)
        accepted.append(ok)
    accepted = torch.stack(accepted)
    # Every taken pixel belongs to the first accepted candidate covering it (the first candidate
    # is always accepted, so there is one).
    placed = accepted.nonzero().squeeze(1)  # walk positions
    first = _argmax_over_queries(binary.index_select(0, order[placed]).view(torch.uint8))
    owner = torch.where(taken.view(binary.shape[1:]).bool(), placed[first], order.numel())
    return accepted, owner


def mask_wise_merge(
    labels: torch.Tensor,
    scores: torch.Tensor,
    mask_probs: torch.Tensor,
    thing_ids: Collection[int],
    alpha: float = 1.0,
    beta: float = 2.0,
    mask_threshold: float = 0.5,
    thing_quality_threshold: float = 0.25,
    stuff_quality_threshold: float = 0.25,
    thing_overlap_threshold: float = 0.4,
    stuff_overlap_threshold: float = 0.2,
    binarized: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
) -> Tuple[torch.Tensor, List[Dict]]:
    """
    Panoptic segmentation by mask-wise merging (Panoptic SegFormer, Li et al., CVPR 2022).

    Each mask gets the confidence ``s = p ** alpha * q ** beta``: ``p`` is its class score and
    ``q = sum(prob * binary) / (sum(binary) + 1)`` the mean probability inside its binary mask
    (``prob > mask_threshold``). Masks whose ``s`` is below the quality threshold of their kind
    (thing or stuff) are dropped; the others are walked in order of decreasing ``s`` (equal ``s``:
    input order). A mask is dropped when its binary mask is empty or when more than
    ``overlap_threshold * area`` of its pixels are already placed (the threshold of its kind);
    otherwise its pixels that are still free become its segment. Every thing mask gives its own
    segment; the masks of one stuff class are merged into one segment, whose id is given when its
    first mask is placed. Segment ids count from 1 in order of placement. (A mask that is accepted
    but gets no free pixel, possible only with an overlap threshold of 1, gives no segment.)

    Args:
        labels: N int64 contiguous class ids.
        scores: N class scores ``p`` in [0, 1].
        mask_probs: N x H x W mask probabilities at the output size.
        thing_ids: class ids that are things; all other classes are stuff.
        alpha, beta: exponents of ``p`` and ``q`` in the confidence.
        mask_threshold: a pixel is in a binary mask when its probability is above this.
        thing_quality_threshold, stuff_quality_threshold: minimum confidence of a thing / stuff mask.
        thing_overlap_threshold, stuff_overlap_threshold: maximum fraction of a thing / stuff mask
            that may already be placed.
        binarized: ``binarize_masks(mask_probs, mask_threshold)`` when the caller has it already
            (the Panoptic SegFormer's instance output needs it too), or None to compute it here.

    Returns:
        panoptic_seg: H x W int32 segment ids, 0 = void.
        segments_info: one dict per segment in increasing id order, the fields of
            :func:`panoptic_inference`: ``{"id", "isthing", "category_id", "area"}`` plus
            ``"score"`` (the class score ``p``) for things.
    """
    _check_merge_arguments(
        labels, scores, mask_probs, alpha=alpha, beta=beta, mask_threshold=mask_threshold,
        thing_quality_threshold=thing_quality_threshold, stuff_quality_threshold=stuff_quality_threshold,
        thing_overlap_threshold=thing_overlap_threshold, stuff_overlap_threshold=stuff_overlap_threshold,
    )
    labels = labels.long()
    panoptic_seg = torch.zeros(mask_probs.shape[-2:], dtype=torch.int32, device=mask_probs.device)
    isthing = _is_thing(labels, {int(c) for c in thing_ids})
    if binarized is None:
        binarized = binarize_masks(mask_probs, mask_threshold)
    if not isinstance(binarized, (tuple, list)) or len(binarized) != 3:
        raise ValueError(
            "binarized must be binarize_masks' (binary, area, prob_in_mask) of the mask_probs, got "
            f"{type(binarized).__name__}" + (f" of {len(binarized)}" if isinstance(binarized, (tuple, list)) else "")
        )
    binary, area, prob_in_mask = binarized
    if binary.shape != mask_probs.shape or area.shape != scores.shape or prob_in_mask.shape != scores.shape:
        raise ValueError(
            f"binarized must be binarize_masks' (binary, area, prob_in_mask) of the {tuple(mask_probs.shape)} "
            f"mask_probs, got shapes {tuple(binary.shape)}, {tuple(area.shape)}, {tuple(prob_in_mask.shape)}"
        )
    confidence = scores.to(prob_in_mask.dtype) ** alpha * (prob_in_mask / (area + 1)) ** beta

    quality_threshold = torch.where(isthing, thing_quality_threshold, stuff_quality_threshold)
    candidate = (confidence >= quality_threshold) & (area > 0)
    order = torch.sort(confidence, descending=True, stable=True).indices
    order = order[candidate[order]]
    if order.numel() == 0:
        return panoptic_seg, []

    labels, isthing, scores = labels[order], isthing[order], scores[order]
    overlap_threshold = torch.where(isthing, thing_overlap_threshold, stuff_overlap_threshold)
    max_overlap = overlap_threshold.double() * area[order].double()
    accepted, owner = _place_masks(binary, order, max_overlap)
    won_area = torch.bincount(owner.flatten(), minlength=order.numel() + 1)[:-1]

    segment_id, opens = _number_segments(accepted & (won_area > 0), labels, isthing)
    panoptic_seg = torch.cat([segment_id, segment_id.new_zeros(1)]).to(torch.int32)[owner]
    return panoptic_seg, _segments_info(segment_id, opens, labels, isthing, scores, won_area)


def mask_wise_panoptic_inference(
    mask_cls: torch.Tensor,
    mask_pred: torch.Tensor,
    thing_ids: Collection[int],
    **merge_params: float,
) -> Tuple[torch.Tensor, List[Dict]]:
    """
    :func:`mask_wise_merge` on MaskFormer's outputs, a drop-in alternative to
    :func:`panoptic_inference`.

    The class of a query is its most probable REAL class and its score ``p`` that class's softmax
    probability (softmax over all K+1 columns, as MaskFormer computes class probabilities; the
    "no object" column is never a label, so a query that is most likely "no object" keeps its
    low best real-class probability and the quality threshold drops it). Mask probabilities are
    ``sigmoid(mask_pred)``.

    Args:
        mask_cls: Q x (K+1) class logits.
        mask_pred: Q x H x W mask logits at the output size.
        thing_ids: contiguous class ids that are things.
        merge_params: the keyword arguments of :func:`mask_wise_merge` (``alpha`` ...
            ``stuff_overlap_threshold``; its defaults are those of the Panoptic SegFormer release).

    Returns:
        panoptic_seg (H x W int32), segments_info: as :func:`mask_wise_merge`.
    """
    _check_predictions(mask_cls, mask_pred)
    thing_ids = _check_thing_ids(thing_ids, mask_cls.shape[1] - 1)
    scores, labels = _max_over_classes(F.softmax(mask_cls, dim=-1)[:, :-1])
    return mask_wise_merge(labels, scores, mask_pred.sigmoid(), thing_ids, **merge_params)


# ----------------------------------------------------------------------------- instance


def _mask_statistics(mask_pred: torch.Tensor, queries: torch.Tensor):
    """
    The binary masks of some queries and what the instance output needs of them, reading each
    query's logits once (and its image rows that hold a positive logit twice). On the CPU the
    queries are taken one at a time (each query's logits stay in cache between the operations),
    and the sigmoid, the areas and the boxes are computed only on the image rows that hold a
    positive (or NaN) logit: the other rows add nothing to them.

    Args:
        mask_pred: Q x H x W logits.
        queries: N int64 indices into Q.

    Returns:
        masks: N x H x W bool, ``mask_pred[queries] > 0``.
        areas: N int64, True pixels of each mask.
        boxes: N x 4 float32 (:func:`boxes_from_profiles`).
        mask_scores: N, of ``mask_pred``'s dtype: the mean ``sigmoid(logit)`` over the mask (0 for
            an empty mask; NaN when a logit of the query is NaN, as ``sigmoid(logits) * masks``
            sums to NaN then). Rows are summed apart and their sums added in float64, so the
            value can differ from one ``sum`` over the whole mask by float rounding.
    """
    num, (height, width) = queries.numel(), mask_pred.shape[-2:]
    device, dtype = mask_pred.device, mask_pred.dtype
    if device.type == "cpu":
        groups = [(slice(i, i + 1), mask_pred[query][None]) for i, query in enumerate(queries.tolist())]
    else:
        groups = [(slice(0, num), mask_pred[queries])]
    masks = torch.empty((num, height, width), dtype=torch.bool, device=device)
    quiet_rows = torch.empty((num, height), dtype=torch.bool, device=device)
    in_column = torch.empty((num, width), dtype=torch.uint8, device=device)
    positive = torch.empty((groups[0][1].shape[0] if groups else 0, height, width), dtype=dtype, device=device)
    for rows, logits in groups:
        # a comparison into a float tensor is vectorised on the CPU, into a bool tensor it is not;
        # the float -> bool copy is, and so is a uint8 max
        masks[rows] = torch.gt(logits, 0, out=positive[: logits.shape[0]])
        in_column[rows] = masks[rows].view(torch.uint8).amax(1)
        torch.le(logits.amax(2), 0, out=quiet_rows[rows])  # False: a positive or NaN logit (a NaN max)

    busy = (~quiet_rows).flatten().nonzero().squeeze(1)  # into the N * H image rows
    owner, row = busy // height, busy % height
    busy_masks = masks.view(-1, width).index_select(0, busy)  # R x W
    areas = torch.zeros(num, dtype=torch.long, device=device)
    areas.index_add_(0, owner, _count_true(busy_masks))
    busy_masks = busy_masks.view(torch.uint8).to(dtype)  # 0 / 1
    if mask_pred.is_contiguous():
        busy_probs = mask_pred.view(-1, width).index_select(0, queries[owner] * height + row)
    else:
        busy_probs = mask_pred[queries[owner], row]
    busy_probs.sigmoid_()  # R x W, a new tensor
    # NaN * 0 stays NaN, as in the plain formulation
    prob_sums = torch.zeros(num, dtype=torch.float64, device=device)
    prob_sums.index_add_(0, owner, busy_probs.mul_(busy_masks).sum(1).to(torch.float64))
    in_row = torch.zeros((num, height), dtype=dtype, device=device)
    in_row.view(-1)[busy] = busy_masks.amax(1)
    boxes = boxes_from_profiles(in_column > 0, in_row > 0)
    mask_scores = (prob_sums / areas.clamp(min=1)).to(dtype)
    return masks, areas, boxes, mask_scores


def instance_inference(
    mask_cls: torch.Tensor,
    mask_pred: torch.Tensor,
    num_classes: int,
    topk: int,
    thing_ids: Optional[Collection[int]] = None,
) -> Instances:
    """
    Instance segmentation: the ``topk`` most probable (query, class) pairs, so one query may give
    several instances of different classes.

    When ``thing_ids`` is given, stuff classes are removed BEFORE the top-k, so no slot is spent on
    a stuff class (with ``thing_ids=None`` every class competes).

    Plain formulation: ``logits = mask_pred[query_indices]``, ``masks = logits > 0``, mask score
    ``(sigmoid(logits) * masks).flatten(1).sum(1) / masks.flatten(1).sum(1).clamp(min=1)``, boxes
    from ``BitMasks.get_bounding_boxes``. Masks, boxes, classes and their order are identical to
    it; the scores equal it to float rounding (the mask scores are summed in another order).

    Args:
        mask_cls: Q x (K+1) class logits, K = ``num_classes``.
        mask_pred: Q x H x W mask logits.
        num_classes: K, the number of classes without "no object".
        topk: maximum number of instances; at most Q * (number of candidate classes) are returned.
        thing_ids: contiguous class ids that may become instances; None means all K classes.

    Returns:
        Instances with ``image_size`` (H, W) and N fields, in decreasing order of class probability:
            pred_masks: N x H x W bool, ``mask_pred[query] > 0``.
            pred_boxes: Boxes (N x 4 float32, XYXY absolute, x2/y2 exclusive, i.e. one past the
                last mask pixel, as ``BitMasks.get_bounding_boxes``); all zero for an empty mask.
            pred_classes: N int64 contiguous class ids.
            scores: N, class probability * mean ``sigmoid(mask_pred)`` inside the binary mask
                (0 for an empty mask).
    """
    _check_predictions(mask_cls, mask_pred)
    if mask_cls.shape[1] != num_classes + 1:
        raise ValueError(
            f"mask_cls has {mask_cls.shape[1]} columns but num_classes={num_classes} needs "
            f"{num_classes + 1} (K classes + no object)"
        )
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be a positive int, got {topk!r}")

    class_probs = F.softmax(mask_cls, dim=-1)[:, :-1]  # Q x K
    candidate_classes = torch.arange(num_classes, device=mask_cls.device)
    if thing_ids is not None:
        thing_ids = _check_thing_ids(thing_ids, num_classes)
        candidate_classes = torch.tensor(sorted(thing_ids), dtype=torch.long, device=mask_cls.device)
        class_probs = class_probs[:, candidate_classes]  # Q x K_things

    num_candidates = class_probs.shape[1]
    topk = min(topk, class_probs.numel())
    class_scores, flat_indices = class_probs.flatten().topk(topk, sorted=True)
    query_indices = flat_indices // num_candidates
    pred_classes = candidate_classes[flat_indices % num_candidates]

    # a query may be selected with several classes: its mask is computed once
    unique_queries, position = torch.unique(query_indices, return_inverse=True)
    if unique_queries.numel() == query_indices.numel():
        pred_masks, _, boxes, mask_scores = _mask_statistics(mask_pred, query_indices)
    else:
        masks, _, boxes, mask_scores = _mask_statistics(mask_pred, unique_queries)
        pred_masks, boxes, mask_scores = masks[position], boxes[position], mask_scores[position]

    result = Instances(tuple(mask_pred.shape[-2:]))
    result.pred_masks = pred_masks
    result.pred_boxes = Boxes(boxes)
    result.pred_classes = pred_classes
    result.scores = class_scores * mask_scores
    return result


def filter_panoptic(
    panoptic_seg: torch.Tensor, segments_info: Sequence[Dict], threshold: float
) -> Tuple[torch.Tensor, List[Dict]]:
    """
    Drop thing segments whose "score" is below ``threshold`` (their pixels become void, 0);
    segments without a score (stuff) are kept.

    Args:
        panoptic_seg: H x W segment ids.
        segments_info: dicts with "id", "isthing" and, for things, "score".
    Returns:
        a new (panoptic_seg, segments_info); the inputs are not modified.
    """
    kept, dropped_ids = [], []
    for info in segments_info:
        if info["isthing"] and "score" in info and info["score"] < threshold:
            dropped_ids.append(info["id"])
        else:
            kept.append(dict(info))
    panoptic_seg = panoptic_seg.clone()
    if dropped_ids:
        panoptic_seg[torch.isin(panoptic_seg, torch.tensor(dropped_ids, dtype=panoptic_seg.dtype))] = 0
    return panoptic_seg, kept
