"""The MaskFormer meta-architecture: normalize -> backbone -> head -> set loss | inference."""
import contextlib
import logging
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone, build_sem_seg_head
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList
from detectron2.utils.events import get_event_storage
from torch import Tensor, nn
from torch.nn import functional as F

from ...layers.inference_kernels import inference_kernels
from ..backbone.swin import zero_masked_attention
from ..criterion import build_criterion, without_mask_factors
from ..inference_optimization import (
    inference_dtype,
    semantic_scores_from_logits,
    semantic_scores_from_low_res,
    upsample_bilinear_crop,
)
from ..matcher import NonFiniteCostError
from ..postprocessing import instance_inference, mask_wise_panoptic_inference, panoptic_inference, semantic_inference
from ..training_optimization import checkpoint_activations
from ..transformer_decoder.standard_transformer_decoder import pixel_major_mask_logits
from ..transformer_decoder.transformer import fused_attention
from ..upsampled_mask_losses import tiled_upsampled_mask_losses
from .base import INSTANCE, PANOPTIC, SEMANTIC, SegmentationMetaArch, task_switches

logger = logging.getLogger(__name__)


def mask_merge_params(cfg) -> Dict[str, float]:
    """Keyword arguments of mask-wise merging, from MODEL.PANOPTIC_SEGFORMER.TEST (shared by both
    model families)."""
    test = cfg.MODEL.PANOPTIC_SEGFORMER.TEST
    return {
        "alpha": test.ALPHA, "beta": test.BETA, "mask_threshold": test.MASK_THRESHOLD,
        "thing_quality_threshold": test.THING_QUALITY_THRESHOLD,
        "stuff_quality_threshold": test.STUFF_QUALITY_THRESHOLD,
        "thing_overlap_threshold": test.THING_OVERLAP_THRESHOLD,
        "stuff_overlap_threshold": test.STUFF_OVERLAP_THRESHOLD,
    }


def detections_per_image(cfg) -> int:
    """Instances kept per image: detectron2's TEST.DETECTIONS_PER_IMAGE, unless the alias
    MODEL.MASK_FORMER.TEST.DETECTIONS_PER_IMAGE of earlier versions of this project is set."""
    alias = cfg.MODEL.MASK_FORMER.TEST.DETECTIONS_PER_IMAGE
    return int(cfg.TEST.DETECTIONS_PER_IMAGE if alias is None else alias)


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
class MaskFormer(SegmentationMetaArch):
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
        object_mask_threshold: float,
        overlap_threshold: float,
        panoptic_merge: str = "pixel",
        mask_merge_params: Optional[Dict[str, float]] = None,
        metadata,
        size_divisibility: int,
        sem_seg_postprocess_before_inference: bool,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        semantic_on: bool = True,
        panoptic_on: bool = False,
        instance_on: bool = False,
        detections_per_image: int = 100,
        precision: str = "fp32",
        reuse_output_memory: Optional[bool] = None,
        optimize_inference: bool = True,
        optimize_training: bool = True,
        train_channels_last: Optional[bool] = None,
        train_winograd_conv: Optional[bool] = None,
        test_winograd_conv: Optional[bool] = None,
        activation_checkpointing: Sequence[str] = (),
    ):
        """
        Args:
            backbone: a detectron2 Backbone.
            sem_seg_head: a head returning "pred_logits" and "pred_masks" (e.g. MaskFormerHead).
            criterion: computes the named, unweighted losses from the head's outputs and targets.
            loss_weights: weight of each named loss; losses without a weight are dropped.
            object_mask_threshold, overlap_threshold: panoptic inference thresholds.
            panoptic_merge: "pixel" (MaskFormer's argmax merge) or "mask" (mask-wise merging with
                ``mask_merge_params``, the keyword arguments of ``mask_wise_merge``).
            metadata: the test dataset's metadata (thing classes for panoptic/instance inference).
            size_divisibility: images are padded to a multiple of this (0 or less: the backbone's).
            sem_seg_postprocess_before_inference: resize mask logits to the output size before the
                semantic combination (more memory, slightly different interpolation).
            pixel_mean, pixel_std: per-channel normalization of the input image.
            semantic_on, panoptic_on, instance_on: which results inference returns.
            detections_per_image: top-k of instance inference.
            precision: "fp32", "bf16" or "fp16", the dtype of the network's weights and activations
                in inference (MODEL.MASK_FORMER.TEST.PRECISION); post-processing is float32. fp16
                outputs that overflowed are a FloatingPointError (``check_low_precision_outputs``).
            reuse_output_memory: write the semantic scores of the optimised path into the memory
                of the previous call's once the caller has let go of them (``output_buffer``);
                None: with bf16 or fp16 only (MODEL.MASK_FORMER.TEST.REUSE_OUTPUT_MEMORY).
            optimize_inference: run inference through the optimised path (channels-last
                convolutions, fused attention, band-wise upsampling and semantic combination, in
                bf16 and fp16 folded batch norms; see ``prepare_for_inference``). False runs the reference
                path (plain modules, full-resolution intermediates), which is always float32.
            optimize_training: train with the backbone's frozen batch norms folded into their
                convolutions, channels-last where ``train_channels_last`` says so
                (``backbone_features``; same losses and gradients to float rounding), and the
                mask losses' backward through the matched queries only (the criterion reads the
                predictor's ``mask_embed`` / ``mask_features``). False trains the modules as built.
            train_channels_last: MODEL.TRAIN_CHANNELS_LAST: True, False, or None for where it
                pays (``channels_last_training``).
            train_winograd_conv: MODEL.TRAIN_WINOGRAD_CONV: the large float32 3x3 convolutions on
                the CPU by Winograd in training; True, False, or None for where it pays
                (``winograd_training``).
            test_winograd_conv: MODEL.MASK_FORMER.TEST.WINOGRAD_CONV: the same in inference; True,
                False, or None for where it pays (``winograd_inference``).
            activation_checkpointing: dotted names of submodules whose activations are recomputed
                in the backward instead of kept (``training_optimization.checkpoint_activations``).
        """
        super().__init__()
        self.backbone = backbone
        self.sem_seg_head = sem_seg_head
        self.criterion = criterion
        self.loss_weights = loss_weights
        self.object_mask_threshold = object_mask_threshold
        self.overlap_threshold = overlap_threshold
        if panoptic_merge not in ("pixel", "mask"):
            raise ValueError(
                f"MODEL.MASK_FORMER.TEST.PANOPTIC_MERGE={panoptic_merge!r}: expected 'pixel' (MaskFormer's "
                "argmax) or 'mask' (Panoptic SegFormer's mask-wise merging)"
            )
        self.panoptic_merge_mode = panoptic_merge
        self.mask_merge_params = dict(mask_merge_params or {})
        if size_divisibility <= 0:
            size_divisibility = self.backbone.size_divisibility
        self.size_divisibility = size_divisibility
        self.sem_seg_postprocess_before_inference = sem_seg_postprocess_before_inference
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.detections_per_image = detections_per_image
        inference_dtype(precision)  # validates
        self.precision = precision
        if not (reuse_output_memory is None or isinstance(reuse_output_memory, bool)):
            raise ValueError(
                f"MODEL.MASK_FORMER.TEST.REUSE_OUTPUT_MEMORY={reuse_output_memory!r}: expected None "
                "(on with bf16 and fp16), True or False"
            )
        self.reuse_output_memory = reuse_output_memory
        self.optimize_inference = optimize_inference
        self.optimize_training = optimize_training
        self.set_train_channels_last(train_channels_last)
        self.set_winograd_conv(train_winograd_conv, test_winograd_conv)
        self.set_task_switches(semantic_on, panoptic_on, instance_on)
        self.thing_ids = thing_ids_from_metadata(metadata)
        checkpoint_activations(self, activation_checkpointing)
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
        backbone = build_backbone(cfg)
        sem_seg_head = build_sem_seg_head(cfg, backbone.output_shape())
        tasks = cls.output_tasks(cfg)
        criterion = build_criterion(cfg, sem_seg_head.num_classes)
        return {
            "backbone": backbone,
            "sem_seg_head": sem_seg_head,
            "criterion": criterion,
            "loss_weights": criterion.weight_dict,
            "object_mask_threshold": mf.TEST.OBJECT_MASK_THRESHOLD,
            "overlap_threshold": mf.TEST.OVERLAP_THRESHOLD,
            "panoptic_merge": mf.TEST.PANOPTIC_MERGE,
            "mask_merge_params": mask_merge_params(cfg),
            "metadata": MetadataCatalog.get(cfg.DATASETS.TEST[0]) if cfg.DATASETS.TEST else None,
            "size_divisibility": mf.SIZE_DIVISIBILITY,
            "sem_seg_postprocess_before_inference": (
                mf.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE
                or PANOPTIC.name in tasks or INSTANCE.name in tasks
            ),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "activation_checkpointing": cfg.MODEL.ACTIVATION_CHECKPOINTING,
            "train_channels_last": cfg.MODEL.TRAIN_CHANNELS_LAST,
            "train_winograd_conv": cfg.MODEL.TRAIN_WINOGRAD_CONV,
            "test_winograd_conv": mf.TEST.WINOGRAD_CONV,
            **task_switches(tasks),
            "detections_per_image": detections_per_image(cfg),
            "precision": mf.TEST.PRECISION,
            "reuse_output_memory": mf.TEST.REUSE_OUTPUT_MEMORY,
        }

    def run_network_for_inference(self, images: Tensor, *, fold_norms: Optional[bool] = None,
                                  channels_last: bool = True, fuse_attention: bool = True,
                                  fast_kernels: bool = True, winograd: Optional[bool] = None
                                  ) -> Dict[str, Tensor]:
        """
        Backbone and head as the optimised inference path runs them: channels-last activations,
        fused attention (a Swin backbone's masked window pairs weighted exactly 0,
        ``zero_masked_attention``), the layers' inference kernels (``layers.inference_kernels``:
        linear layers fused with their activation, gathered deformable attention), in
        ``self.precision``, and in bfloat16 the batch norms folded into their convolutions
        (``prepare_for_inference``), large float32 3x3 convolutions by Winograd where
        :meth:`winograd_inference`; the outputs are float32. Call under
        ``torch.no_grad()`` (the folded weights are copies). The keyword switches turn single
        levers on or off, for measuring them (``tools/benchmark_inference.py --levers``;
        ``fold_norms`` and ``winograd`` None: as ``prepare_for_inference`` chooses).
        """
        if fold_norms is False and not channels_last and not winograd:
            weights = None
        else:  # 1x1 convolutions of channels-last inputs run as matrix products
            weights = self.prepare_for_inference(fold=fold_norms, winograd=winograd)
        with contextlib.ExitStack() as stack:
            if weights is not None:
                stack.enter_context(weights.active())
            stack.enter_context(fused_attention(fuse_attention))
            stack.enter_context(zero_masked_attention(fuse_attention))
            stack.enter_context(inference_kernels(fast_kernels))
            stack.enter_context(self.inference_autocast())
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            if weights is None:
                outputs = self.sem_seg_head(self.backbone(images))
            else:
                features = weights.call(self.backbone, "backbone", images)
                outputs = weights.call(self.sem_seg_head, "sem_seg_head", features)
        outputs = {k: v.float() if isinstance(v, Tensor) else v for k, v in outputs.items()}
        self.check_low_precision_outputs([outputs["pred_logits"], outputs["pred_masks"]])
        return outputs

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
        images = self.preprocess_images(batched_inputs)
        if not self.training and self.optimize_inference and not torch.is_grad_enabled():
            # The optimised path reads cached copies of some weights: no gradients reach them.
            outputs = self.run_network_for_inference(images.tensor)
            return self.optimized_inference(outputs, batched_inputs, images)
        features = self.backbone_features(images.tensor)
        with self.winograd_training_context(self.sem_seg_head), \
                pixel_major_mask_logits(self.training and self.optimize_training):
            outputs = self.sem_seg_head(features)

        if self.training:
            targets = self.prepare_targets(batched_inputs, images)
            if not self.optimize_training:
                # the modules as built: the mask losses' backward through every query's logits
                outputs = without_mask_factors(outputs)
            try:
                with tiled_upsampled_mask_losses(self.optimize_training):
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

    def panoptic_merge(self, mask_cls: Tensor, mask_pred: Tensor):
        """One image's panoptic result from Q x (K+1) class logits and Q x H x W mask logits:
        MaskFormer's pixel-wise argmax (``panoptic_merge_mode`` "pixel") or Panoptic SegFormer's
        mask-wise merging ("mask")."""
        if self.panoptic_merge_mode == "mask":
            return mask_wise_panoptic_inference(mask_cls, mask_pred, self.thing_ids, **self.mask_merge_params)
        return panoptic_inference(mask_cls, mask_pred, self.thing_ids, self.object_mask_threshold,
                                  self.overlap_threshold)

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
            sem_seg, mask_pred = semantic_postprocess(
                mask_cls, mask_pred, image_size, height, width,
                masks_first=self.sem_seg_postprocess_before_inference, semantic_on=self.semantic_on,
            )
            result: Dict[str, object] = {} if sem_seg is None else {SEMANTIC.output_key: sem_seg}
            processed_results.append(self._add_mask_results(result, mask_cls, mask_pred))
        return processed_results

    def _add_mask_results(self, result: Dict[str, object], mask_cls: Tensor, mask_pred: Tensor
                          ) -> Dict[str, object]:
        """``result`` with one image's panoptic and instance results added (those switched on),
        from Q x (K+1) class logits and Q x H x W mask logits at their size."""
        if self.panoptic_on:
            result[PANOPTIC.output_key] = self.panoptic_merge(mask_cls, mask_pred)
        if self.instance_on:
            result[INSTANCE.output_key] = instance_inference(
                mask_cls, mask_pred, self.sem_seg_head.num_classes, self.detections_per_image,
                self.thing_ids,
            )
        return result

    def optimized_inference(self, outputs, batched_inputs, images: ImageList) -> List[Dict[str, object]]:
        """
        ``inference`` without the full-resolution intermediates it does not need: the mask logits
        are upsampled only inside the image (not its padding), the semantic scores are combined
        band by band (upsample -> sigmoid -> product with the class probabilities), and the
        resize to the output size is skipped when it is the identity (same size). Equal to
        ``inference`` up to float rounding.
        """
        mask_cls_results = outputs["pred_logits"].float()
        mask_pred_results = outputs["pred_masks"].float()  # at the mask resolution
        padded_size = tuple(images.tensor.shape[-2:])
        num_classes = mask_cls_results.shape[-1] - 1
        processed_results = []
        for i, (mask_cls, mask_pred, input_per_image, image_size) in enumerate(zip(
            mask_cls_results, mask_pred_results, batched_inputs, images.image_sizes
        )):
            image_size = (int(image_size[0]), int(image_size[1]))
            output_size = (int(input_per_image.get("height", image_size[0])),
                           int(input_per_image.get("width", image_size[1])))
            result: Dict[str, object] = {}
            if self.sem_seg_postprocess_before_inference:
                mask_pred = upsample_bilinear_crop(mask_pred[None], padded_size, image_size)
                mask_pred = _resize(mask_pred, image_size, output_size)[0]
                if self.semantic_on:
                    scores = self.output_buffer(("sem_seg", i), (num_classes, *output_size))
                    result[SEMANTIC.output_key] = semantic_scores_from_logits(mask_cls, mask_pred, out=scores)
            else:
                if self.semantic_on:
                    scores = self.output_buffer(("sem_seg", i), (num_classes, *image_size))
                    sem_seg = semantic_scores_from_low_res(mask_cls, mask_pred, padded_size, image_size, out=scores)
                    result[SEMANTIC.output_key] = _resize(sem_seg[None], image_size, output_size)[0]
                if self.panoptic_on or self.instance_on:  # as ``inference``: at the padded size
                    mask_pred = F.interpolate(mask_pred[None], size=padded_size, mode="bilinear",
                                              align_corners=False)[0]
            processed_results.append(self._add_mask_results(result, mask_cls, mask_pred))
        return processed_results


def semantic_postprocess(mask_cls: Tensor, mask_pred: Tensor, image_size: Tuple[int, int], height: int,
                         width: int, *, masks_first: bool, semantic_on: bool = True
                         ) -> Tuple[Optional[Tensor], Tensor]:
    """
    The reference path's resizing and semantic combination of one image (``MaskFormer.inference``;
    also what an exported network's outputs go through).

    Args:
        mask_cls: Q x (K+1) class logits.
        mask_pred: Q x H' x W' mask logits at the padded input size.
        image_size: (H, W) of the image inside the padding (top left).
        height, width: the output size.
        masks_first: resize the mask logits to the output size before the semantic combination
            (``sem_seg_postprocess_before_inference``); else resize the semantic scores after it.
        semantic_on: compute the semantic scores.
    Returns:
        sem_seg: K x height x width scores (None unless ``semantic_on``);
        mask_pred: the mask logits panoptic and instance inference take: at the output size with
            ``masks_first``, else as given (padded size).
    """
    if masks_first:
        mask_pred = sem_seg_postprocess(mask_pred, image_size, height, width)
    if not semantic_on:
        return None, mask_pred
    sem_seg = semantic_inference(mask_cls, mask_pred)
    if not masks_first:
        sem_seg = sem_seg_postprocess(sem_seg, image_size, height, width)
    return sem_seg, mask_pred


def _resize(x: Tensor, size: Tuple[int, int], output_size: Tuple[int, int]) -> Tensor:
    """Bilinear resize of N x C x H x W ``x`` (of spatial ``size``) to ``output_size``, as
    ``sem_seg_postprocess`` does; skipped when the sizes are equal (it is then the identity)."""
    if tuple(size) == tuple(output_size):
        return x
    return F.interpolate(x, size=output_size, mode="bilinear", align_corners=False)
