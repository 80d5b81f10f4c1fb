"""Where a panoptic model loses its things: for every ground-truth thing, whether the model's
``panoptic_seg`` finds it, or a mask of its class in ``instances`` would have but the panoptic
merging left it out, or no mask of the model covers it; and how many thing segments of
``panoptic_seg`` match no ground truth.

"Matches" means the same class and an IoU above 0.5 over all pixels of the image (PQ's matching
criterion, without PQ's special handling of void and crowd pixels). ``tools/analyze_thing_errors.py``
runs a model over a dataset and prints the counts.
"""
from collections import Counter
from typing import Dict, List, Optional, Sequence

import torch
from detectron2.structures import Instances

__all__ = ["FOUND", "DROPPED", "MISSED", "ThingErrorCounter", "segment_masks"]

FOUND = "found"  # a thing segment of panoptic_seg of the same class has an IoU > 0.5 with it
DROPPED = "dropped"  # not found, but an instance mask of its class has an IoU > 0.5 with it
MISSED = "missed"  # no instance mask of its class has an IoU > 0.5 with it
OUTCOMES = (FOUND, DROPPED, MISSED)
# what covers most pixels of a dropped thing in panoptic_seg
UNDER = ("void", "same class", "other thing class", "stuff")


def segment_masks(id_map: torch.Tensor, ids: Sequence[int]) -> torch.Tensor:
    """len(ids) x H x W bool: the pixels of ``id_map`` (H x W) equal to each id."""
    return id_map[None] == torch.as_tensor(list(ids), dtype=id_map.dtype).view(-1, 1, 1)


def _ious(masks: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of each of N boolean H x W masks with one boolean H x W mask (0 where both are empty)."""
    inter = (masks & target).flatten(1).sum(1)
    union = (masks | target).flatten(1).sum(1)
    return inter.double() / union.clamp(min=1).double()


class ThingErrorCounter:
    """Accumulates, image by image, the outcome of every ground-truth thing by area bin.

    Args:
        thing_ids: contiguous ids of the thing classes.
        area_bins: increasing areas (pixels) that split the things into bins: ``[0, a_0)``,
            ``[a_0, a_1)``, ..., ``[a_last, inf)``.
    """

    def __init__(self, thing_ids: Sequence[int], area_bins: Sequence[int] = (32 ** 2, 96 ** 2)):
        bins = [int(a) for a in area_bins]
        if any(a <= 0 for a in bins) or bins != sorted(set(bins)):
            raise ValueError(f"area_bins must be increasing positive areas, got {list(area_bins)}")
        self.thing_ids = {int(i) for i in thing_ids}
        self.area_bins = bins
        edges = [0] + bins + [None]
        self.bin_names = [f"[{lo}, {hi})" if hi is not None else f"[{lo}, inf)" for lo, hi in zip(edges, edges[1:])]
        self.outcomes = {name: Counter() for name in self.bin_names}
        self.dropped_under = Counter()
        self.predicted_segments = 0
        self.false_segments = 0

    def _bin(self, area: int) -> str:
        return self.bin_names[sum(area >= a for a in self.area_bins)]

    def add(self, gt_masks: torch.Tensor, gt_classes: torch.Tensor, panoptic_seg: torch.Tensor,
            segments_info: List[Dict], instances: Optional[Instances]) -> None:
        """
        Args:
            gt_masks: N x H x W bool, the image's ground-truth segments (things and stuff; only
                things are counted). Crowd regions should be left out by the caller.
            gt_classes: N contiguous class ids.
            panoptic_seg, segments_info: the model's panoptic output at H x W (detectron2's
                format: "id", "category_id" contiguous, "isthing").
            instances: the model's instance output at H x W (``pred_masks``, ``pred_classes``),
                or None: every thing that is not found then counts as missed.
        """
        gt_masks = gt_masks.bool().cpu()
        gt_classes = torch.as_tensor(gt_classes).cpu()
        panoptic_seg = panoptic_seg.cpu()
        if gt_masks.shape[1:] != panoptic_seg.shape:
            raise ValueError(f"ground-truth masks of size {tuple(gt_masks.shape[1:])} but panoptic_seg of size "
                             f"{tuple(panoptic_seg.shape)}")
        segments = {int(s["id"]): s for s in segments_info}
        thing_segments = [s for s in segments_info if s["category_id"] in self.thing_ids]
        thing_masks = segment_masks(panoptic_seg, [s["id"] for s in thing_segments])
        segment_classes = torch.tensor([int(s["category_id"]) for s in thing_segments], dtype=torch.long)
        if instances is not None and len(instances):
            instance_masks = instances.pred_masks.bool().cpu()
            instance_classes = instances.pred_classes.cpu()
        else:
            instance_masks = torch.zeros((0,) + tuple(panoptic_seg.shape), dtype=torch.bool)
            instance_classes = torch.zeros(0, dtype=torch.long)

        matched_segments = torch.zeros(len(thing_segments), dtype=torch.bool)
        for mask, cls in zip(gt_masks, gt_classes.tolist()):
            if cls not in self.thing_ids:
                continue
            same = segment_classes == cls
            found = same & (_ious(thing_masks, mask) > 0.5)
            matched_segments |= found
            if found.any():
                outcome = FOUND
            elif ((instance_classes == cls) & (_ious(instance_masks, mask) > 0.5)).any():
                outcome = DROPPED
                self.dropped_under[self._under(panoptic_seg[mask], segments, cls)] += 1
            else:
                outcome = MISSED
            self.outcomes[self._bin(int(mask.sum()))][outcome] += 1
        self.predicted_segments += len(thing_segments)
        self.false_segments += int((~matched_segments).sum())

    def _under(self, ids: torch.Tensor, segments: Dict[int, Dict], cls: int) -> str:
        """What covers most of a dropped thing's pixels (``ids``: their segment ids)."""
        counts = Counter(ids.tolist())
        top = counts.most_common(1)[0][0] if counts else 0
        if top not in segments:
            return "void"
        category = segments[top]["category_id"]
        if category not in self.thing_ids:
            return "stuff"
        return "same class" if category == cls else "other thing class"

    def summary(self) -> Dict[str, object]:
        """Counts per area bin and in all (``{bin: {"things", "found", "dropped", "missed"}}``),
        what covers the dropped things, and the predicted thing segments and how many are false."""
        per_bin = {}
        total = Counter()
        for name in self.bin_names:
            counts = self.outcomes[name]
            total.update(counts)
            per_bin[name] = {"things": sum(counts.values()), **{o: counts[o] for o in OUTCOMES}}
        per_bin["all"] = {"things": sum(total.values()), **{o: total[o] for o in OUTCOMES}}
        return {
            "bins": per_bin,
            "dropped_under": {u: self.dropped_under[u] for u in UNDER},
            "predicted_thing_segments": self.predicted_segments,
            "false_thing_segments": self.false_segments,
        }
