"""Inference post-processing: turn one image's (class, mask) query pairs into the three outputs.

Every function takes the predictions of ONE image:

* ``mask_cls``: Q x (K+1) class logits; the last column is the "no object" class.
* ``mask_pred``: Q x H x W mask logits, already resized to the requested output size.

and returns what detectron2's evaluators and ``Visualizer`` consume:

* :func:`semantic_inference` -> ``sem_seg`` (K x H x W per-class scores, for ``SemSegEvaluator``),
* :func:`panoptic_inference` -> ``panoptic_seg`` (id map, segments_info), for
  ``COCOPanopticEvaluator`` and ``Visualizer.draw_panoptic_seg``,
* :func:`instance_inference` -> ``instances`` (:class:`Instances`), for ``COCOEvaluator``.

Class ids are contiguous ids in ``[0, K)`` throughout.
"""
from typing import Collection, Dict, List, Optional, Tuple

import torch
from torch.nn import functional as F

from detectron2.structures import BitMasks, Instances

__all__ = ["semantic_inference", "panoptic_inference", "instance_inference"]


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


def panoptic_inference(
    mask_cls: torch.Tensor,
    mask_pred: torch.Tensor,
    thing_ids: Collection[int],
    object_mask_threshold: float,
    overlap_threshold: float,
) -> Tuple[torch.Tensor, List[Dict]]:
    """
    Panoptic segmentation as in the MaskFormer paper.

    Queries whose most likely class is "no object", or whose top class probability is not above
    ``object_mask_threshold``, are dropped. Each pixel goes to the kept query with the highest
    ``class score * mask probability``. A query's segment is dropped (its pixels become void, 0)
    when it wins no pixel, when its own mask (probability >= 0.5) is empty, or when it wins less
    than ``overlap_threshold`` of its own mask. Segments of one stuff class are merged into one
    segment; every thing query gives its own segment. Segment ids are assigned from 1 in query
    order, counting only the segments that are kept.

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

    scores, labels = F.softmax(mask_cls, dim=-1).max(-1)
    keep = (labels != num_classes) & (scores > object_mask_threshold)
    kept_scores = scores[keep]
    kept_labels = labels[keep].tolist()
    kept_masks = mask_pred[keep].sigmoid()

    panoptic_seg = torch.zeros(mask_pred.shape[-2:], dtype=torch.int32, device=mask_pred.device)
    segments_info: List[Dict] = []
    if len(kept_labels) == 0:
        return panoptic_seg, segments_info

    pixel_owner = (kept_scores[:, None, None] * kept_masks).argmax(0)  # H x W, index into kept
    stuff_segment_index: Dict[int, int] = {}  # stuff class -> its entry in segments_info
    for k, label in enumerate(kept_labels):
        won = pixel_owner == k
        won_area = int(won.sum())
        own_area = int((kept_masks[k] >= 0.5).sum())
        if won_area == 0 or own_area == 0 or won_area / own_area < overlap_threshold:
            continue
        isthing = label in thing_ids
        if not isthing and label in stuff_segment_index:
            info = segments_info[stuff_segment_index[label]]
            info["area"] += won_area
            panoptic_seg[won] = info["id"]
            continue
        info = {"id": len(segments_info) + 1, "isthing": isthing, "category_id": label, "area": won_area}
        if isthing:
            info["score"] = float(kept_scores[k])
        else:
            stuff_segment_index[label] = len(segments_info)
        segments_info.append(info)
        panoptic_seg[won] = info["id"]
    return panoptic_seg, segments_info


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

    Args:
        mask_cls: Q x (K+1) class logits, K = ``num_classes``.
        mask_pred: Q x H x W mask logits.
        num_classes: K, the number of classes without "no object".
        topk: maximum number of instances; at most Q * (number of candidate classes) are returned.
        thing_ids: contiguous class ids that may become instances; None means all K classes.

    Returns:
        Instances with ``image_size`` (H, W) and N fields, in decreasing order of class probability:
            pred_masks: N x H x W bool, ``mask_pred[query] > 0``.
            pred_boxes: Boxes (N x 4, XYXY absolute, x2/y2 exclusive, i.e. one past the last mask
                pixel, from ``BitMasks.get_bounding_boxes``); all zero for an empty mask.
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

    selected_logits = mask_pred[query_indices]  # N x H x W
    pred_masks = selected_logits > 0
    mask_area = pred_masks.flatten(1).sum(1)
    mask_prob_sum = (selected_logits.sigmoid() * pred_masks).flatten(1).sum(1)
    mask_scores = mask_prob_sum / mask_area.clamp(min=1)

    result = Instances(tuple(mask_pred.shape[-2:]))
    result.pred_masks = pred_masks
    boxes = BitMasks(pred_masks).get_bounding_boxes()  # computed on the CPU
    boxes.tensor = boxes.tensor.to(mask_pred.device)
    result.pred_boxes = boxes
    result.pred_classes = pred_classes
    result.scores = class_scores * mask_scores
    return result
