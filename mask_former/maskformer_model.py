"""The MaskFormer meta-architecture: normalize -> backbone -> head -> set loss | inference."""
import logging
from typing import Dict, List, Optional, Sequence, Set

import torch
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone, build_sem_seg_head
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList
from detectron2.utils.events import get_event_storage
from torch import Tensor, nn
from torch.nn import functional as F

from .modeling.criterion import SetCriterion
from .modeling.mask_losses import MASK_LOSSES
from .modeling.matcher import HungarianMatcher, NonFiniteCostError
from .modeling.postprocessing import instance_inference, panoptic_inference, semantic_inference

logger = logging.getLogger(__name__)

# Config key under MODEL.MASK_FORMER that weights each mask loss.
_MASK_LOSS_WEIGHT_KEYS = {"focal": "MASK_WEIGHT", "bce": "BCE_WEIGHT", "brier": "BRIER_WEIGHT",
                          "dice": "DICE_WEIGHT"}


def build_loss_weights(cfg) -> Dict[str, float]:
    """Weights of the criterion's named losses, repeated with suffix ``_i`` for each of the
    DEC_LAYERS - 1 intermediate decoder layers when deep supervision is on."""
    mf = cfg.MODEL.MASK_FORMER
    unknown = [n for n in mf.MASK_LOSSES if n not in MASK_LOSSES]
    if unknown or not mf.MASK_LOSSES:
        raise ValueError(
            f"MODEL.MASK_FORMER.MASK_LOSSES={list(mf.MASK_LOSSES)}: expected a non-empty list of "
            f"{sorted(MASK_LOSSES)}"
        )
    weights = {"loss_ce": mf.CLASS_WEIGHT}
    for name in mf.MASK_LOSSES:
        weights[MASK_LOSSES[name].loss_key] = getattr(mf, _MASK_LOSS_WEIGHT_KEYS[name])
    if mf.DEEP_SUPERVISION:
        last_layer = dict(weights)
        for i in range(mf.DEC_LAYERS - 1):
            weights.update({f"{k}_{i}": v for k, v in last_layer.items()})
    return weights


def build_matcher(cfg) -> HungarianMatcher:
    """The Hungarian matcher, with the same terms and weights as the loss: the first pointwise mask
    loss in MASK_LOSSES gives the mask cost, "dice" the dice cost."""
    mf = cfg.MODEL.MASK_FORMER
    pointwise = [n for n in mf.MASK_LOSSES if MASK_LOSSES[n].pointwise]
    mask_cost_type = pointwise[0] if pointwise else "focal"
    return HungarianMatcher(
        cost_class=mf.CLASS_WEIGHT,
        cost_mask=getattr(mf, _MASK_LOSS_WEIGHT_KEYS[mask_cost_type]) if pointwise else 0.0,
        cost_dice=mf.DICE_WEIGHT if "dice" in mf.MASK_LOSSES else 0.0,
        mask_cost_type=mask_cost_type,
    )


def _current_iteration():
    try:
        return get_event_storage().iter
    except AssertionError:  # not inside a training loop
        return None


def thing_ids_from_metadata(metadata) -> Optional[Set[int]]:
    """Contiguous ids of the thing classes, or None when the metadata does not say."""
    mapping = getattr(metadata, "thing_dataset_id_to_contiguous_id", None)
    return None if mapping is None else set(mapping.values())


@META_ARCH_REGISTRY.register()
class MaskFormer(nn.Module):
    """Mask classification: N (class, mask) predictions matched to the ground-truth segments in
    training; combined into semantic, panoptic and/or instance results in inference."""

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        sem_seg_head: nn.Module,
        criterion: nn.Module,
        loss_weights: Dict[str, float],
        num_queries: int,
        object_mask_threshold: float,
        overlap_threshold: float,
        metadata,
        size_divisibility: int,
        sem_seg_postprocess_before_inference: bool,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        semantic_on: bool = True,
        panoptic_on: bool = False,
        instance_on: bool = False,
        detections_per_image: int = 100,
    ):
        """
        Args:
            backbone: a detectron2 Backbone.
            sem_seg_head: a head returning "pred_logits" and "pred_masks" (e.g. MaskFormerHead).
            criterion: computes the named, unweighted losses from the head's outputs and targets.
            loss_weights: weight of each named loss; losses without a weight are dropped.
            num_queries: N.
            object_mask_threshold, overlap_threshold: panoptic inference thresholds.
            metadata: the test dataset's metadata (thing classes for panoptic/instance inference).
            size_divisibility: images are padded to a multiple of this (0 or less: the backbone's).
            sem_seg_postprocess_before_inference: resize mask logits to the output size before the
                semantic combination (more memory, slightly different interpolation).
            pixel_mean, pixel_std: per-channel normalization of the input image.
            semantic_on, panoptic_on, instance_on: which results inference returns.
            detections_per_image: top-k of instance inference.
        """
        super().__init__()
        self.backbone = backbone
        self.sem_seg_head = sem_seg_head
        self.criterion = criterion
        self.loss_weights = loss_weights
        self.num_queries = num_queries
        self.object_mask_threshold = object_mask_threshold
        self.overlap_threshold = overlap_threshold
        self.metadata = metadata
        if size_divisibility <= 0:
            size_divisibility = self.backbone.size_divisibility
        self.size_divisibility = size_divisibility
        self.sem_seg_postprocess_before_inference = sem_seg_postprocess_before_inference
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.semantic_on = semantic_on
        self.panoptic_on = panoptic_on
        self.instance_on = instance_on
        self.detections_per_image = detections_per_image
        if not (semantic_on or panoptic_on or instance_on):
            raise ValueError(
                "MODEL.MASK_FORMER.TEST.{SEMANTIC_ON,PANOPTIC_ON,INSTANCE_ON} are all False: "
                "inference would produce nothing"
            )
        self.thing_ids = thing_ids_from_metadata(metadata)
        if instance_on and self.thing_ids is None:
            logger.warning(
                "MODEL.MASK_FORMER.TEST.INSTANCE_ON: the metadata of DATASETS.TEST[0] "
                f"({getattr(metadata, 'name', None)!r}) names no thing classes; instances of every "
                "class will be predicted"
            )
        if panoptic_on and self.thing_ids is None:
            raise ValueError(
                "MODEL.MASK_FORMER.TEST.PANOPTIC_ON needs to know the thing classes, but the metadata "
                f"of DATASETS.TEST[0] ({getattr(metadata, 'name', None)!r}) has no "
                "thing_dataset_id_to_contiguous_id"
            )

    @classmethod
    def from_config(cls, cfg):
        mf = cfg.MODEL.MASK_FORMER
        loss_weights = build_loss_weights(cfg)  # validates MASK_LOSSES first
        backbone = build_backbone(cfg)
        sem_seg_head = build_sem_seg_head(cfg, backbone.output_shape())
        criterion = SetCriterion(
            sem_seg_head.num_classes,
            matcher=build_matcher(cfg),
            eos_coef=mf.NO_OBJECT_WEIGHT,
            mask_losses=list(mf.MASK_LOSSES),
        )
        metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0]) if cfg.DATASETS.TEST else None
        return {
            "backbone": backbone,
            "sem_seg_head": sem_seg_head,
            "criterion": criterion,
            "loss_weights": loss_weights,
            "num_queries": mf.NUM_OBJECT_QUERIES,
            "object_mask_threshold": mf.TEST.OBJECT_MASK_THRESHOLD,
            "overlap_threshold": mf.TEST.OVERLAP_THRESHOLD,
            "metadata": metadata,
            "size_divisibility": mf.SIZE_DIVISIBILITY,
            "sem_seg_postprocess_before_inference": (
                mf.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE
                or mf.TEST.PANOPTIC_ON or mf.TEST.INSTANCE_ON
            ),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "semantic_on": mf.TEST.SEMANTIC_ON,
            "panoptic_on": mf.TEST.PANOPTIC_ON,
            "instance_on": mf.TEST.INSTANCE_ON,
            "detections_per_image": mf.TEST.DETECTIONS_PER_IMAGE,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def forward(self, batched_inputs: List[Dict[str, object]]):
        """
        Args:
            batched_inputs: a list (one per image) of what the dataset mapper returns:
                "image": 3 x H x W tensor in the config's INPUT.FORMAT;
                "instances": (training) Instances with gt_classes (K) and gt_masks (K x H x W);
                "height", "width": (inference, optional) the output resolution.
        Returns:
            training: dict of weighted losses.
            inference: a list of dicts, one per image, with any of "sem_seg" (K x H x W scores),
                "panoptic_seg" ((H x W int ids, segments_info)) and "instances" (detectron2
                Instances), at the requested output size.
        """
        images = [x["image"].to(self.device) for x in batched_inputs]
        images = [(x - self.pixel_mean) / self.pixel_std for x in images]
        images = ImageList.from_tensors(images, self.size_divisibility)
        features = self.backbone(images.tensor)
        outputs = self.sem_seg_head(features)

        if self.training:
            targets = self.prepare_targets(batched_inputs, images)
            try:
                losses = self.criterion(outputs, targets)
            except NonFiniteCostError as e:
                # Diverged predictions surface in the matcher before any loss is computed: say it
                # the way detectron2 reports a non-finite loss, with the iteration.
                raise FloatingPointError(
                    f"Loss became infinite or NaN at iteration={_current_iteration()}: {e}"
                ) from e
            return {k: v * self.loss_weights[k] for k, v in losses.items() if k in self.loss_weights}

        return self.inference(outputs, batched_inputs, images)

    def prepare_targets(self, batched_inputs, images: ImageList) -> List[Dict[str, Tensor]]:
        """Pad each image's gt masks with zeros to the padded batch size."""
        if any("instances" not in x for x in batched_inputs):
            raise ValueError("MaskFormer training needs 'instances' in every input (the dataset mapper's "
                             "gt_classes/gt_masks); check INPUT.DATASET_MAPPER_NAME")
        h_pad, w_pad = images.tensor.shape[-2:]
        targets = []
        for x in batched_inputs:
            gt = x["instances"].to(self.device)
            gt_masks = gt.gt_masks
            if not isinstance(gt_masks, Tensor):  # BitMasks
                gt_masks = gt_masks.tensor
            padded = torch.zeros((gt_masks.shape[0], h_pad, w_pad), dtype=gt_masks.dtype, device=self.device)
            padded[:, : gt_masks.shape[1], : gt_masks.shape[2]] = gt_masks
            targets.append({"labels": gt.gt_classes, "masks": padded})
        return targets

    def inference(self, outputs, batched_inputs, images: ImageList) -> List[Dict[str, object]]:
        mask_cls_results = outputs["pred_logits"]
        mask_pred_results = F.interpolate(
            outputs["pred_masks"], size=images.tensor.shape[-2:], mode="bilinear", align_corners=False
        )
        processed_results = []
        for mask_cls, mask_pred, input_per_image, image_size in zip(
            mask_cls_results, mask_pred_results, batched_inputs, images.image_sizes
        ):
            height = input_per_image.get("height", image_size[0])
            width = input_per_image.get("width", image_size[1])
            result: Dict[str, object] = {}
            if self.sem_seg_postprocess_before_inference:
                mask_pred = sem_seg_postprocess(mask_pred, image_size, height, width)
            if self.semantic_on:
                sem_seg = semantic_inference(mask_cls, mask_pred)
                if not self.sem_seg_postprocess_before_inference:
                    sem_seg = sem_seg_postprocess(sem_seg, image_size, height, width)
                result["sem_seg"] = sem_seg
            if self.panoptic_on:
                result["panoptic_seg"] = panoptic_inference(
                    mask_cls, mask_pred, self.thing_ids, self.object_mask_threshold, self.overlap_threshold
                )
            if self.instance_on:
                result["instances"] = instance_inference(
                    mask_cls, mask_pred, self.sem_seg_head.num_classes, self.detections_per_image,
                    self.thing_ids,
                )
            processed_results.append(result)
        return processed_results
