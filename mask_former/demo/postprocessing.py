"""HuggingFace-style post-processing of MaskFormer's raw outputs.

:func:`post_process_semantic`, :func:`post_process_instance` and :func:`post_process_panoptic`
take the same arguments and give results of the same form as the methods
``post_process_semantic_segmentation``, ``post_process_instance_segmentation`` and
``post_process_panoptic_segmentation`` of ``transformers.MaskFormerImageProcessor``. Their input is

* a list of :class:`RawOutput` (one per image: Q x (K+1) class logits, the last column "no
  object", and Q x h x w mask logits, plus where the image lies in the padded network input),
  as :meth:`mask_former.demo.Predictor.raw_outputs` returns it, or
* any object with HuggingFace's batched ``class_queries_logits`` (B x Q x (K+1)) and
  ``masks_queries_logits`` (B x Q x h x w), e.g. what ``MaskFormerForInstanceSegmentation``
  returns; such outputs carry no sizes, so nothing is cropped.

Deliberate differences from ``transformers`` (5.x):

* **Padding is cropped before anything else.** When a :class:`RawOutput` knows its sizes, the
  mask logits are upsampled to the padded network input, the padding is cropped away, and only
  then are the semantic scores combined, masks binarized or pixels assigned; the result is
  resized to the target size at the end. HuggingFace resizes the padded map to the target size,
  which shifts and stretches the result of a padded image.
* **Default size.** ``target_sizes=None`` gives results at the original image size when the raw
  outputs know it (from the predictor); HuggingFace's default is the mask resolution (h x w).
* **Logits are resized, then thresholded** (instance and panoptic): masks are the bilinearly
  resized logits binarized at the target size, mask scores are computed there, as the model's
  own inference does. HuggingFace binarizes at the mask resolution and resizes the binary masks
  (nearest; instance) or resizes the probabilities (panoptic).
* **Panoptic segment ids are unique**, counted from 1 in query order, with ONE ``segments_info``
  entry per segment; void pixels are 0 in every case (an int32 map). With ``label_ids_to_fuse``
  HuggingFace's counter goes back to the fused segment's id, so a later segment can get the id of
  an earlier one; it lists a fused segment once per query, and gives a float map of -1 when
  nothing is kept. A fused segment's ``score`` here is the highest score of its queries.
* **Panoptic mask area as in MaskFormer** (the paper's code and ``predictor(image)``): a query's
  own mask is ``sigmoid >= mask_threshold`` of its probabilities, not of the probabilities
  multiplied by its class score as in HuggingFace, and a segment is kept when it wins at least
  (HuggingFace: more than) ``overlap_mask_area_threshold`` of its own mask.
* **Instance**: ``mask_threshold`` binarizes the masks (default 0.5, i.e. logit > 0, what
  HuggingFace always uses; it ignores the argument); ``overlap_mask_area_threshold`` is accepted
  and not used (as in HuggingFace). Instances are sorted by decreasing score, ids count from 0 in
  that order and a pixel of overlapping instances belongs to the highest-scoring one in the map
  (-1: no instance). ``return_coco_annotation`` gives one pycocotools (COCO) RLE per instance
  (HuggingFace: its own run-length lists of the map's values, the background included);
  ``return_binary_maps`` with nothing found gives a 0 x H x W tensor. ``top_k`` (default Q, as
  HuggingFace) and ``label_ids`` (default all classes) are additions.
* Scores are not rounded (HuggingFace rounds them to 6 decimals).
"""
import math
from dataclasses import dataclass
from typing import Collection, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pycocotools.mask as mask_util
import torch
from torch import Tensor
from torch.nn import functional as F

from ..modeling.inference_optimization import upsample_bilinear_crop

__all__ = [
    "RawOutput",
    "as_raw_outputs",
    "post_process_semantic",
    "post_process_instance",
    "post_process_panoptic",
]

Size = Tuple[int, int]


@dataclass
class RawOutput:
    """
    One image's network outputs before post-processing.

    Attributes:
        class_logits: Q x (K+1) class logits; the last column is "no object".
        mask_logits: Q x h x w mask logits at the mask resolution (a quarter of the padded input).
        padded_size: (H, W) of the padded network input the mask logits cover; None when unknown
            (then nothing is cropped).
        image_size: (H, W) of the (resized) image inside the padded input, at its top left.
        original_size: (H, W) of the image as given; the default output size.
    """

    class_logits: Tensor
    mask_logits: Tensor
    padded_size: Optional[Size] = None
    image_size: Optional[Size] = None
    original_size: Optional[Size] = None

    def __post_init__(self):
        if self.class_logits.dim() != 2 or self.class_logits.shape[1] < 2:
            raise ValueError("class_logits must be Q x (K+1) with K >= 1 (last column: no object), got "
                             f"shape {tuple(self.class_logits.shape)}")
        if self.mask_logits.dim() != 3 or self.mask_logits.shape[0] != self.class_logits.shape[0]:
            raise ValueError(f"mask_logits must be Q x h x w with Q={self.class_logits.shape[0]} (as "
                             f"class_logits), got shape {tuple(self.mask_logits.shape)}")
        if (self.padded_size is None) != (self.image_size is None):
            raise ValueError("give both padded_size and image_size (where the image lies in the padded "
                             "input), or neither")
        if self.padded_size is not None and not (
            0 < self.image_size[0] <= self.padded_size[0] and 0 < self.image_size[1] <= self.padded_size[1]
        ):
            raise ValueError(f"image_size {tuple(self.image_size)} must lie inside padded_size "
                             f"{tuple(self.padded_size)}")

    @property
    def num_classes(self) -> int:
        """K, the number of classes without "no object"."""
        return self.class_logits.shape[1] - 1

    @property
    def output_size(self) -> Size:
        """The default size of the results: the original image size, else the image size inside
        the padded input, else the mask resolution."""
        size = self.original_size or self.image_size or self.mask_logits.shape[-2:]
        return int(size[0]), int(size[1])

    def mask_logits_at(self, size: Optional[Size] = None, queries: Optional[Tensor] = None) -> Tensor:
        """
        float32 mask logits with the padding cropped away (upsampled to ``padded_size`` and cut to
        ``image_size``, as the model's inference does), then bilinearly resized to ``size``.

        Args:
            size: (H, W) of the result; None: no resize after the crop.
            queries: indices (or a bool mask) of the queries to return; None: all.
        """
        logits = self.mask_logits.float()
        if self.padded_size is not None:
            logits = upsample_bilinear_crop(logits[None], self.padded_size, self.image_size)[0]
        if size is not None and tuple(logits.shape[-2:]) != tuple(size):
            logits = _resize(logits, size)
        # selected after resizing, as the model's inference does (the same values, bit for bit)
        return logits if queries is None else logits[queries]


def _resize(x: Tensor, size: Size) -> Tensor:
    """Bilinear resize of C x H x W ``x`` (align_corners=False, as detectron2 and HuggingFace)."""
    return F.interpolate(x[None], size=(int(size[0]), int(size[1])), mode="bilinear", align_corners=False)[0]


def as_raw_outputs(outputs) -> List[RawOutput]:
    """
    Args:
        outputs: a list of :class:`RawOutput`, or an object with HuggingFace's
            ``class_queries_logits`` (B x Q x (K+1)) and ``masks_queries_logits`` (B x Q x h x w).
    Returns:
        one :class:`RawOutput` per image.
    """
    if hasattr(outputs, "class_queries_logits") and hasattr(outputs, "masks_queries_logits"):
        class_logits, mask_logits = outputs.class_queries_logits, outputs.masks_queries_logits
        if class_logits.dim() != 3 or mask_logits.dim() != 4:
            raise ValueError(
                "class_queries_logits must be B x Q x (K+1) and masks_queries_logits B x Q x h x w, got "
                f"shapes {tuple(class_logits.shape)} and {tuple(mask_logits.shape)}"
            )
        return [RawOutput(c, m) for c, m in zip(class_logits, mask_logits)]
    if isinstance(outputs, RawOutput):
        raise TypeError("pass a list of RawOutput (one per image), as Predictor.raw_outputs returns, "
                        "not a single RawOutput")
    outputs = list(outputs)
    wrong = sorted({type(o).__name__ for o in outputs if not isinstance(o, RawOutput)})
    if wrong:
        raise TypeError(f"outputs must be RawOutput objects (Predictor.raw_outputs), got {wrong}")
    return outputs


def _target_sizes(raw: List[RawOutput], target_sizes: Optional[Sequence[Size]]) -> List[Size]:
    if target_sizes is None:
        return [r.output_size for r in raw]
    target_sizes = list(target_sizes)
    if len(target_sizes) != len(raw):
        raise ValueError(f"target_sizes has {len(target_sizes)} entries for {len(raw)} images: give one "
                         "(height, width) per image")
    sizes = []
    for size in target_sizes:
        size = tuple(int(s) for s in size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"each target size must be (height, width) of positive ints, got {size}")
        sizes.append(size)
    return sizes


def _class_probabilities(raw: RawOutput) -> Tensor:
    """Q x (K+1) softmax over all classes, "no object" included."""
    return F.softmax(raw.class_logits.float(), dim=-1)


def _check_threshold(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}")


# ----------------------------------------------------------------------------- semantic


def post_process_semantic(outputs, target_sizes: Optional[Sequence[Size]] = None, *,
                          resize_masks_first: bool = False) -> List[Tensor]:
    """
    Semantic segmentation maps: every query votes for each class with its class probability
    times its mask probability (``sum_q softmax(cls)[q, c] * sigmoid(mask)[q]``, "no object"
    dropped), and each pixel takes the class with the most votes.

    Args:
        outputs: see :func:`as_raw_outputs`.
        target_sizes: one (height, width) per image; None: each image's original size when known,
            else the mask resolution (HuggingFace).
        resize_masks_first: resize the (cropped) mask logits to the target size before combining
            them (what MaskFormer's inference does when panoptic or instance results are on:
            ``MODEL.MASK_FORMER.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE``); default: combine
            at the mask resolution, then resize the class scores (HuggingFace).
    Returns:
        one H x W int64 map of class ids in [0, K) per image.
    """
    raw = as_raw_outputs(outputs)
    results = []
    for r, size in zip(raw, _target_sizes(raw, target_sizes)):
        class_probs = _class_probabilities(r)[:, :-1]
        logits = r.mask_logits_at(size if resize_masks_first else None)
        scores = torch.einsum("qc,qhw->chw", class_probs, logits.sigmoid())
        if tuple(scores.shape[-2:]) != tuple(size):
            scores = _resize(scores, size)
        results.append(scores.argmax(0))
    return results


# ----------------------------------------------------------------------------- instance


def encode_coco_rle(mask) -> Dict:
    """One H x W binary mask (tensor or numpy array) as a JSON-friendly COCO RLE:
    ``{"size": [H, W], "counts": str}`` (pycocotools' compressed counts, decoded to text)."""
    if isinstance(mask, Tensor):
        mask = mask.cpu().numpy()
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def post_process_instance(
    outputs,
    threshold: float = 0.5,
    mask_threshold: float = 0.5,
    overlap_mask_area_threshold: float = 0.8,
    target_sizes: Optional[Sequence[Size]] = None,
    return_coco_annotation: bool = False,
    return_binary_maps: bool = False,
    *,
    top_k: Optional[int] = None,
    label_ids: Optional[Collection[int]] = None,
) -> List[Dict]:
    """
    Instance segmentation: the ``top_k`` most probable (query, class) pairs (one query may give
    instances of several classes), each scored ``class probability * mean mask probability inside
    its binary mask``; those with a non-empty mask and a score of at least ``threshold`` are kept.

    Args:
        outputs: see :func:`as_raw_outputs`.
        threshold: minimum score of a kept instance.
        mask_threshold: a pixel is in an instance's mask when its mask probability is above this.
        overlap_mask_area_threshold: not used (HuggingFace accepts and ignores it too).
        target_sizes: as in :func:`post_process_semantic`.
        return_coco_annotation: "segmentation" is a list of COCO RLEs (``{"size": [H, W],
            "counts": str}``), one per instance in ``segments_info`` order, each of its whole mask.
        return_binary_maps: "segmentation" is the N x H x W bool tensor of the instances' masks.
        top_k: number of (query, class) candidates; None: Q, the number of queries (HuggingFace).
        label_ids: the classes that may become instances (e.g. the thing classes); None: all.
    Returns:
        one dict per image: "segmentation" (by default an H x W int32 map of instance ids, -1 where
        there is none; a pixel of several instances shows the highest-scoring one) and
        "segments_info": ``[{"id", "label_id", "was_fused": False, "score"}]`` in decreasing score
        order, ids counting from 0.
    """
    if return_coco_annotation and return_binary_maps:
        raise ValueError("return_coco_annotation and return_binary_maps cannot both be True")
    _check_threshold("mask_threshold", mask_threshold)
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    raw = as_raw_outputs(outputs)
    # sigmoid(x) > t  <=>  x > logit(t); logit(0.5) = 0 exactly (HuggingFace's logit > 0)
    logit_threshold = math.inf if mask_threshold >= 1.0 else (
        -math.inf if mask_threshold <= 0.0 else math.log(mask_threshold / (1.0 - mask_threshold)))
    results = []
    for r, size in zip(raw, _target_sizes(raw, target_sizes)):
        class_probs = _class_probabilities(r)[:, :-1]  # Q x K
        device = class_probs.device
        candidates = torch.arange(r.num_classes, device=device)
        if label_ids is not None:
            ids = sorted({int(c) for c in label_ids})
            bad = [c for c in ids if not 0 <= c < r.num_classes]
            if bad:
                raise ValueError(f"label_ids {bad} are not class ids in [0, {r.num_classes})")
            candidates = torch.tensor(ids, dtype=torch.long, device=device)
            class_probs = class_probs[:, candidates]
        k = min(top_k or class_probs.shape[0], class_probs.numel())
        class_scores, flat = class_probs.flatten().topk(k)
        queries = flat // class_probs.shape[1]
        labels = candidates[flat % class_probs.shape[1]]

        logits = r.mask_logits_at(size, queries)  # k x H x W
        masks = logits > logit_threshold
        area = masks.flatten(1).sum(1)
        mask_scores = (logits.sigmoid() * masks).flatten(1).sum(1) / area.clamp(min=1)
        scores = class_scores * mask_scores
        keep = (area > 0) & (scores >= threshold)
        order = torch.sort(scores[keep], descending=True, stable=True).indices
        masks, labels, scores = masks[keep][order], labels[keep][order], scores[keep][order]

        segments_info = [
            {"id": i, "label_id": int(label), "was_fused": False, "score": float(score)}
            for i, (label, score) in enumerate(zip(labels.tolist(), scores.tolist()))
        ]
        if return_binary_maps:
            segmentation = masks
        elif return_coco_annotation:
            segmentation = [encode_coco_rle(m) for m in masks]
        else:
            segmentation = torch.full(tuple(size), -1, dtype=torch.int32, device=masks.device)
            for i in reversed(range(masks.shape[0])):  # the highest score is painted last
                segmentation[masks[i]] = i
        results.append({"segmentation": segmentation, "segments_info": segments_info})
    return results


# ----------------------------------------------------------------------------- panoptic


def post_process_panoptic(
    outputs,
    threshold: float = 0.5,
    mask_threshold: float = 0.5,
    overlap_mask_area_threshold: float = 0.8,
    label_ids_to_fuse: Optional[Collection[int]] = None,
    target_sizes: Optional[Sequence[Size]] = None,
) -> List[Dict]:
    """
    Panoptic segmentation by MaskFormer's pixel-wise merge.

    Queries whose most probable class is "no object", or whose class probability (softmax over
    the K+1 classes) is not above ``threshold``, are dropped. Each pixel goes to the remaining
    query with the highest ``class probability * mask probability`` (the first one on a tie). A
    query gives a segment when it wins a pixel, its own mask (``sigmoid >= mask_threshold``) is not
    empty, and it wins at least ``overlap_mask_area_threshold`` of its own mask; the pixels of the
    other queries are void (0). The queries of a class in ``label_ids_to_fuse`` make one segment;
    every other query its own. Ids count from 1 in query order.

    With ``mask_threshold=0.5``, ``threshold=MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD``,
    ``overlap_mask_area_threshold=...OVERLAP_THRESHOLD`` and the stuff classes fused, this is the
    model's own ``panoptic_seg``.

    Args:
        outputs: see :func:`as_raw_outputs`.
        threshold: minimum class probability of a query (strictly above).
        mask_threshold: a pixel is in a query's own mask when its probability is at least this.
        overlap_mask_area_threshold: minimum fraction of its own mask a query must win.
        label_ids_to_fuse: classes whose queries are fused into one segment (stuff); None: none.
        target_sizes: as in :func:`post_process_semantic`.
    Returns:
        one dict per image: "segmentation", an H x W int32 map of segment ids (0: void), and
        "segments_info": ``[{"id", "label_id", "was_fused", "score"}]``, one per segment, in
        increasing id order.
    """
    _check_threshold("threshold", threshold)
    _check_threshold("mask_threshold", mask_threshold)
    _check_threshold("overlap_mask_area_threshold", overlap_mask_area_threshold)
    fuse = set() if label_ids_to_fuse is None else {int(c) for c in label_ids_to_fuse}
    raw = as_raw_outputs(outputs)
    results = []
    for r, size in zip(raw, _target_sizes(raw, target_sizes)):
        scores, labels = _class_probabilities(r).max(-1)
        keep = (labels != r.num_classes) & (scores > threshold)
        segmentation = torch.zeros(tuple(size), dtype=torch.int32, device=r.mask_logits.device)
        if not bool(keep.any()):
            results.append({"segmentation": segmentation, "segments_info": []})
            continue
        scores, labels = scores[keep], labels[keep]
        probs = r.mask_logits_at(size, keep).sigmoid()  # n x H x W
        own_area = (probs >= mask_threshold).flatten(1).sum(1)
        owner = (scores[:, None, None] * probs).argmax(0)  # H x W, index into the kept queries
        won_area = torch.bincount(owner.flatten(), minlength=labels.numel())
        valid = (won_area > 0) & (own_area > 0) & (won_area.double() >= overlap_mask_area_threshold
                                                   * own_area.double())

        segment_of_query = torch.zeros(labels.numel() + 1, dtype=torch.int32, device=owner.device)
        segments_info: List[Dict] = []
        fused_segment: Dict[int, Dict] = {}
        for k, (label, score, ok) in enumerate(zip(labels.tolist(), scores.tolist(), valid.tolist())):
            if not ok:
                continue
            if label in fused_segment:
                info = fused_segment[label]
                info["score"] = max(info["score"], score)
            else:
                info = {"id": len(segments_info) + 1, "label_id": label, "was_fused": label in fuse,
                        "score": score}
                segments_info.append(info)
                if label in fuse:
                    fused_segment[label] = info
            segment_of_query[k] = info["id"]
        segmentation = segment_of_query[owner]
        results.append({"segmentation": segmentation, "segments_info": segments_info})
    return results
