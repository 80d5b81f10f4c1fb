"""Post-processing of the exported network's outputs in Python: what ``MaskFormer`` does after its
network, with the project's post-processing functions."""
from dataclasses import asdict, dataclass, field
from typing import Dict, FrozenSet, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from ..modeling import MaskFormer
from ..modeling.meta_arch.maskformer import semantic_postprocess
from ..modeling.postprocessing import (
    instance_inference,
    mask_wise_panoptic_inference,
    panoptic_inference,
)
from ..tasks import get_task

__all__ = ["Postprocessor"]

Array = Union[Tensor, np.ndarray]


def _as_tensor(x: Array, name: str, dims: int) -> Tensor:
    x = torch.as_tensor(x, dtype=torch.float32)
    if x.dim() == dims + 1:
        if x.shape[0] != 1:
            raise ValueError(f"{name}: one image at a time (batch 1), got shape {tuple(x.shape)}")
        x = x[0]
    if x.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions (or {dims + 1} with batch 1), got "
                         f"shape {tuple(x.shape)}")
    return x


@dataclass(frozen=True)
class Postprocessor:
    """
    Turns one image's exported outputs into the model's results, as ``MaskFormer``'s inference
    does (``MaskFormer.inference``): the mask logits are upsampled to the padded input, then for
    each task switched on, the semantic combination (``sem_seg``, K x H x W scores), the panoptic
    merge (``panoptic_seg``, (H x W ids, segments_info)) or the instance top-k (``instances``),
    at the requested output size. Given the same network outputs, the results are those of the
    model (``tests/test_export.py`` checks it).

    Build it with :meth:`from_model` (the settings of a model built from the config), or give the
    settings, e.g. those an export wrote to ``export.json`` (``Postprocessor(**info["postprocessing"])``).

    Attributes: see ``MaskFormer.__init__`` (``num_classes`` is K; ``thing_ids`` the contiguous
    ids of the thing classes, None when the metadata names none; ``panoptic_merge`` "pixel" or
    "mask" (``MODEL.MASK_FORMER.TEST.PANOPTIC_MERGE``) with the keyword arguments of mask-wise
    merging in ``mask_merge_params``).
    """

    num_classes: int
    semantic_on: bool = True
    panoptic_on: bool = False
    instance_on: bool = False
    thing_ids: Optional[FrozenSet[int]] = None
    object_mask_threshold: float = 0.8
    overlap_threshold: float = 0.8
    detections_per_image: int = 100
    sem_seg_postprocess_before_inference: bool = False
    panoptic_merge: str = "pixel"
    mask_merge_params: Optional[Dict[str, float]] = field(default=None, hash=False)

    def __post_init__(self):
        if self.thing_ids is not None:
            object.__setattr__(self, "thing_ids", frozenset(int(c) for c in self.thing_ids))
        if self.panoptic_merge not in ("pixel", "mask"):
            raise ValueError(f"panoptic_merge={self.panoptic_merge!r}: expected 'pixel' (MaskFormer's argmax) "
                             "or 'mask' (mask-wise merging with mask_merge_params)")
        object.__setattr__(self, "mask_merge_params", dict(self.mask_merge_params or {}))
        if not (self.semantic_on or self.panoptic_on or self.instance_on):
            raise ValueError("semantic_on, panoptic_on and instance_on are all False: nothing to compute")
        if self.panoptic_on and self.thing_ids is None:
            raise ValueError("panoptic_on needs thing_ids (the contiguous ids of the thing classes)")

    @classmethod
    def from_model(cls, model: MaskFormer) -> "Postprocessor":
        """The post-processing settings of ``model`` (``build_model(cfg)``; no weights needed)."""
        if not isinstance(model, MaskFormer):
            raise TypeError(f"expected a MaskFormer, got a {type(model).__name__}")
        return cls(
            num_classes=int(model.sem_seg_head.num_classes),
            semantic_on=bool(model.semantic_on),
            panoptic_on=bool(model.panoptic_on),
            instance_on=bool(model.instance_on),
            thing_ids=None if model.thing_ids is None else frozenset(model.thing_ids),
            object_mask_threshold=float(model.object_mask_threshold),
            overlap_threshold=float(model.overlap_threshold),
            detections_per_image=int(model.detections_per_image),
            sem_seg_postprocess_before_inference=bool(model.sem_seg_postprocess_before_inference),
            panoptic_merge=model.panoptic_merge_mode,
            mask_merge_params=dict(model.mask_merge_params),
        )

    def to_dict(self) -> Dict[str, object]:
        """JSON-friendly settings; ``Postprocessor(**d)`` rebuilds it."""
        d = asdict(self)
        d["thing_ids"] = None if self.thing_ids is None else sorted(self.thing_ids)
        return d

    def __call__(self, pred_logits: Array, pred_masks: Array, padded_size: Tuple[int, int],
                 image_size: Tuple[int, int], output_size: Optional[Tuple[int, int]] = None
                 ) -> Dict[str, object]:
        """
        Args:
            pred_logits: (1 x) Q x (K+1) class logits of one image (tensor or numpy array).
            pred_masks: (1 x) Q x h x w mask logits.
            padded_size: (H', W') of the network's input (the padded image).
            image_size: (H, W) of the image inside it, at its top left (``pad_image``'s second
                result).
            output_size: (height, width) of the results; default ``image_size``. A resized input
                (as the predictor's ``ResizeShortestEdge``) gets its original size back here.
        Returns:
            a dict with the results of the tasks switched on, under the model's keys
            (``sem_seg``, ``panoptic_seg``, ``instances``).
        """
        mask_cls = _as_tensor(pred_logits, "pred_logits", 2)
        mask_pred = _as_tensor(pred_masks, "pred_masks", 3)
        padded_size = (int(padded_size[0]), int(padded_size[1]))
        image_size = (int(image_size[0]), int(image_size[1]))
        height, width = image_size if output_size is None else (int(output_size[0]), int(output_size[1]))
        if not (0 < image_size[0] <= padded_size[0] and 0 < image_size[1] <= padded_size[1]):
            raise ValueError(f"image_size {image_size} does not fit in padded_size {padded_size}")
        if mask_cls.shape[0] != mask_pred.shape[0]:
            raise ValueError(f"pred_logits has {mask_cls.shape[0]} queries, pred_masks {mask_pred.shape[0]}")
        if mask_cls.shape[1] != self.num_classes + 1:
            raise ValueError(f"pred_logits has {mask_cls.shape[1]} columns; expected K+1 = "
                             f"{self.num_classes + 1}")

        mask_pred = F.interpolate(mask_pred[None], size=padded_size, mode="bilinear", align_corners=False)[0]
        sem_seg, mask_pred = semantic_postprocess(
            mask_cls, mask_pred, image_size, height, width,
            masks_first=self.sem_seg_postprocess_before_inference, semantic_on=self.semantic_on,
        )
        result: Dict[str, object] = {} if sem_seg is None else {get_task("semantic").output_key: sem_seg}
        if self.panoptic_on:
            if self.panoptic_merge == "mask":
                panoptic = mask_wise_panoptic_inference(mask_cls, mask_pred, self.thing_ids, **self.mask_merge_params)
            else:
                panoptic = panoptic_inference(mask_cls, mask_pred, self.thing_ids, self.object_mask_threshold,
                                              self.overlap_threshold)
            result[get_task("panoptic").output_key] = panoptic
        if self.instance_on:
            result[get_task("instance").output_key] = instance_inference(
                mask_cls, mask_pred, self.num_classes, self.detections_per_image, self.thing_ids
            )
        return result
