"""The Panoptic SegFormer meta-architecture (Li et al., CVPR 2022): backbone -> encoder (neck +
deformable encoder) -> location decoder (thing queries, boxes) -> mask decoder (thing queries and
class-fixed stuff queries, masks from attention maps) -> losses | mask-wise merging.

Inference returns the same three outputs as MaskFormer (``sem_seg``, ``panoptic_seg``,
``instances``), switched by ``MODEL.MASK_FORMER.TEST.{SEMANTIC,PANOPTIC,INSTANCE}_ON``.
"""
import contextlib
import inspect
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import BitMasks, Boxes, ImageList, Instances
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import box_convert

from ...layers.inference_kernels import inference_kernels
from ..inference_optimization import InferenceWeights, inference_dtype
from ..panoptic_segformer import (
    DenoisingQueries,
    EncoderProposals,
    LocationDecoder,
    PanopticSegFormerCriterion,
    build_psf_encoder,
    build_psf_mask_decoder,
)
from ..postprocessing import binarize_masks, boxes_from_profiles, mask_wise_merge
from ..training_optimization import checkpoint_activations
from ..upsampled_mask_losses import tiled_upsampled_mask_losses
from .base import INSTANCE, PANOPTIC, SEMANTIC, SegmentationMetaArch, task_switches
from .maskformer import mask_merge_params

# Masks weighted and reduced at a time by ``PanopticSegFormer.semantic_scores`` (16 x 512 x 512
# floats: a 16 MB scratch block).
SEMANTIC_MASKS_PER_CHUNK = 16


def thing_query_pos_from_boxes(value: str) -> bool:
    """MODEL.PANOPTIC_SEGFORMER.THING_QUERY_POS: "learned" (published) -> False, "box" -> True."""
    if value not in ("learned", "box"):
        raise ValueError(f"MODEL.PANOPTIC_SEGFORMER.THING_QUERY_POS={value!r}: expected 'learned' (the published "
                         "learned positional part) or 'box' (an embedding of the location decoder's boxes)")
    return value == "box"


def _resize_to_output(logits: Tensor, image_size: Tuple[int, int], height: int, width: int) -> Tensor:
    """detectron2's ``sem_seg_postprocess`` (crop the padding, resize bilinearly to the output
    size), without the resize when the crop already has the output size: a bilinear resize to
    the same size copies every value, and at 512 x 512 with 150 masks that copy costs ~60 ms."""
    cropped = logits[:, : image_size[0], : image_size[1]]
    if tuple(cropped.shape[-2:]) == (height, width):
        return cropped
    return sem_seg_postprocess(logits, image_size, height, width)


def _run_module(weights: Optional[InferenceWeights], module: nn.Module, name: str, *args, **kwargs):
    """``module(*args, **kwargs)``, with the cached inference weights when there are (``name``: the
    module's name in the model)."""
    return module(*args, **kwargs) if weights is None else weights.call(module, name, *args, **kwargs)


def takes_all_layers(mask_decoder: nn.Module) -> bool:
    """Whether a mask decoder's forward takes ``all_layers`` (``AttentionMaskDecoder``'s switch to
    the last layers' outputs only); a registered decoder without it returns every layer."""
    return "all_layers" in inspect.signature(mask_decoder.forward).parameters


def thing_queries_from_encoder(value: str) -> bool:
    """MODEL.PANOPTIC_SEGFORMER.THING_QUERY_INIT: "learned" (published) -> False, "encoder" -> True."""
    if value not in ("learned", "encoder"):
        raise ValueError(f"MODEL.PANOPTIC_SEGFORMER.THING_QUERY_INIT={value!r}: expected 'learned' (the published "
                         "learned reference points) or 'encoder' (reference boxes selected among the encoder's "
                         "proposals)")
    return value == "encoder"


def thing_and_stuff_ids(cfg) -> Tuple[List[int], List[int]]:
    """Contiguous ids of the thing classes and of the stuff classes (all others in [0, K)), from
    the metadata of the first training (else test) dataset."""
    num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    names = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    if not names:
        raise ValueError("PanopticSegFormer needs DATASETS.TRAIN or DATASETS.TEST to know its thing classes")
    metadata = MetadataCatalog.get(names[0])
    mapping = metadata.get("thing_dataset_id_to_contiguous_id", None)
    if mapping is None:
        raise ValueError(
            f"PanopticSegFormer needs the thing classes, but the metadata of {names[0]!r} has no "
            "thing_dataset_id_to_contiguous_id; register the dataset with panoptic metadata"
        )
    thing_ids = sorted(set(mapping.values()))
    bad = [i for i in thing_ids if not 0 <= i < num_classes]
    if bad:
        raise ValueError(
            f"The thing classes of {names[0]!r} have contiguous ids {bad} outside "
            f"[0, MODEL.SEM_SEG_HEAD.NUM_CLASSES={num_classes})"
        )
    stuff_ids = [i for i in range(num_classes) if i not in set(thing_ids)]
    return thing_ids, stuff_ids


@META_ARCH_REGISTRY.register()
class PanopticSegFormer(SegmentationMetaArch):
    """Thing queries located by a deformable DETR decoder and one class-fixed query per stuff
    class, decoded into masks from attention maps; trained with deep supervision, merged mask-wise."""

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        encoder: nn.Module,
        location_decoder: LocationDecoder,
        mask_decoder: nn.Module,
        criterion: PanopticSegFormerCriterion,
        loss_weights: Dict[str, float],
        thing_ids: Sequence[int],
        stuff_ids: Sequence[int],
        size_divisibility: int,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        semantic_on: bool,
        panoptic_on: bool,
        instance_on: bool,
        num_test_things: int = 100,
        merge_params: Dict[str, float] = None,
        activation_checkpointing: Sequence[str] = (),
        train_channels_last: Optional[bool] = None,
        precision: str = "fp32",
        optimize_inference: bool = True,
    ):
        """
        Args:
            backbone: a detectron2 Backbone.
            encoder: backbone features -> multi-level tokens (PSF_ENCODER_REGISTRY).
            location_decoder: the thing queries' decoder with box refinement.
            mask_decoder: thing and stuff queries -> class and mask logits per layer
                (PSF_MASK_DECODER_REGISTRY).
            criterion: the losses; ``loss_weights`` weights them.
            thing_ids, stuff_ids: contiguous ids of the thing classes (in thing-index order) and of
                the stuff classes (stuff query k is stuff class ``stuff_ids[k]``).
            size_divisibility: images are padded to a multiple of this (0 or less: the backbone's).
            pixel_mean, pixel_std: per-channel normalization of the input image.
            semantic_on, panoptic_on, instance_on: which results inference returns.
            num_test_things: (query, class) pairs of the location decoder kept at inference.
            merge_params: keyword arguments of ``mask_wise_merge`` (alpha, beta, thresholds).
            activation_checkpointing: dotted names of submodules whose activations are recomputed
                in the backward instead of kept (``training_optimization.checkpoint_activations``).
            train_channels_last: MODEL.TRAIN_CHANNELS_LAST: True, False, or None for where it
                pays (``channels_last_training``).
            precision: "fp32", "bf16" or "fp16" (MODEL.MASK_FORMER.TEST.PRECISION): the network
                runs under bfloat16 / float16 autocast in inference with "bf16" / "fp16"; the
                merging stays float32. fp16 outputs that overflowed are a FloatingPointError.
            optimize_inference: run inference with the layers' inference kernels
                (``layers.inference_kernels``: linear layers fused with their activation,
                gathered deformable attention), with the mask decoder making the masks of its
                last layers only (those inference reads), and, in bf16 and fp16, through the optimised path, as
                MaskFormer does: the backbone's frozen batch norms folded into its convolutions,
                channels-last convolutions, low-precision copies of the weights kept beside the model
                (``prepare_for_inference``) rather than cast again by autocast at every call;
                False runs the modules as built (under autocast in bf16 / fp16). fp32 inference
                runs the modules themselves as built: there the cached weights and channels-last
                convolutions measured 0.95x the time at 1.10x the peak memory (R50 at 512 x 512,
                docs/speed.md).
        """
        super().__init__()
        self.backbone = backbone
        self.encoder = encoder
        self.location_decoder = location_decoder
        hidden_dim = location_decoder.hidden_dim
        # one query per stuff class: positional part (first C channels) and content (last C)
        self.stuff_query = nn.Embedding(len(stuff_ids), 2 * hidden_dim)
        self.mask_decoder = mask_decoder
        # inference reads the last layer's masks only: the optimised path asks a decoder that can
        # skip the other layers' outputs to do so
        self._last_layer_kwargs = {"all_layers": False} if takes_all_layers(mask_decoder) else {}
        self.criterion = criterion
        self.loss_weights = loss_weights
        self.thing_ids = list(thing_ids)
        self.stuff_ids = list(stuff_ids)
        self.num_classes = len(self.thing_ids) + len(self.stuff_ids)
        self.size_divisibility = size_divisibility if size_divisibility > 0 else backbone.size_divisibility
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        # contiguous id -> (is thing, index among things / stuff)
        self.register_buffer("_thing_index", torch.full((self.num_classes,), -1, dtype=torch.long), False)
        self.register_buffer("_stuff_index", torch.full((self.num_classes,), -1, dtype=torch.long), False)
        self._thing_index[self.thing_ids] = torch.arange(len(self.thing_ids))
        self._stuff_index[self.stuff_ids] = torch.arange(len(self.stuff_ids))
        self.set_task_switches(semantic_on, panoptic_on, instance_on)
        self.num_test_things = num_test_things
        self.merge_params = dict(merge_params or {})
        inference_dtype(precision)  # validates
        self.precision = precision
        self.optimize_inference = optimize_inference
        self.set_train_channels_last(train_channels_last)
        checkpoint_activations(self, activation_checkpointing)

    @classmethod
    def from_config(cls, cfg):
        psf = cfg.MODEL.PANOPTIC_SEGFORMER
        thing_ids, stuff_ids = thing_and_stuff_ids(cfg)
        backbone = build_backbone(cfg)
        encoder = build_psf_encoder(cfg, backbone.output_shape())
        proposals, denoising = None, None
        if psf.DN_GROUPS != 0:  # DenoisingQueries refuses a negative number
            denoising = DenoisingQueries(psf.HIDDEN_DIM, len(thing_ids), psf.NHEADS, psf.DN_GROUPS,
                                         psf.DN_BOX_NOISE, psf.DN_LABEL_NOISE)
        if thing_queries_from_encoder(psf.THING_QUERY_INIT):
            proposals = EncoderProposals(psf.HIDDEN_DIM, len(thing_ids), psf.NUM_THING_QUERIES,
                                         psf.THING_QUERY_NMS_THRESHOLD)
        location_decoder = LocationDecoder(
            num_queries=psf.NUM_THING_QUERIES, hidden_dim=psf.HIDDEN_DIM, num_layers=psf.DEC_LAYERS,
            num_classes=len(thing_ids), nheads=psf.NHEADS, dim_feedforward=psf.DIM_FEEDFORWARD,
            dropout=psf.DROPOUT, num_levels=psf.NUM_FEATURE_LEVELS, n_points=psf.N_POINTS,
            query_pos_from_boxes=thing_query_pos_from_boxes(psf.THING_QUERY_POS), proposals=proposals,
            denoising=denoising,
        )
        criterion = PanopticSegFormerCriterion(
            class_weight=psf.CLASS_WEIGHT, l1_weight=psf.BOX_L1_WEIGHT, giou_weight=psf.GIOU_WEIGHT,
            dice_weight=psf.DICE_WEIGHT, alpha=psf.FOCAL_ALPHA, gamma=psf.FOCAL_GAMMA,
            mask_focal_weight=psf.MASK_FOCAL_WEIGHT, class_loss=psf.CLASS_LOSS,
        )
        tasks = cls.output_tasks(cfg)
        test = psf.TEST
        return {
            "backbone": backbone,
            "encoder": encoder,
            "location_decoder": location_decoder,
            "mask_decoder": build_psf_mask_decoder(cfg, len(thing_ids)),
            "criterion": criterion,
            "loss_weights": criterion.weight_dict(psf.DEC_LAYERS, psf.THING_MASK_DEC_LAYERS,
                                                  psf.STUFF_MASK_DEC_LAYERS, encoder_proposals=proposals is not None,
                                                  denoising=denoising is not None),
            "thing_ids": thing_ids,
            "stuff_ids": stuff_ids,
            "size_divisibility": cfg.MODEL.MASK_FORMER.SIZE_DIVISIBILITY,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "activation_checkpointing": cfg.MODEL.ACTIVATION_CHECKPOINTING,
            "train_channels_last": cfg.MODEL.TRAIN_CHANNELS_LAST,
            **task_switches(tasks),
            "num_test_things": test.NUM_THINGS,
            "merge_params": mask_merge_params(cfg),
            "precision": cfg.MODEL.MASK_FORMER.TEST.PRECISION,
        }

    def forward(self, batched_inputs: List[Dict[str, object]]):
        """
        Args:
            batched_inputs: what the dataset mappers return ("image"; "instances" with gt_classes
                and gt_masks in training; optional "height", "width").
        Returns:
            training: dict of weighted losses; inference: per image "sem_seg", "panoptic_seg"
            and/or "instances", as MaskFormer returns them.
        """
        images = self.preprocess_images(batched_inputs)
        if self.training:
            targets = self.prepare_targets(batched_inputs, images)
            memory, location, stuff_query, stuff_pos = self.locate(images, targets)
            masks = self.training_masks(location, stuff_query, stuff_pos, memory)
            with tiled_upsampled_mask_losses(self.optimize_training):
                losses = self.criterion({"location": location, "masks": masks}, targets)
            return {k: v * self.loss_weights[k] for k, v in losses.items() if k in self.loss_weights}

        # the optimised path reads cached copies of some weights: no gradients reach them
        optimized = self.optimize_inference and not torch.is_grad_enabled()
        weights = self.prepare_for_inference() if optimized and self.precision != "fp32" else None
        with contextlib.ExitStack() as stack:
            if weights is not None:
                stack.enter_context(weights.active())
            stack.enter_context(inference_kernels(optimized))
            stack.enter_context(self.inference_autocast())
            memory, location, stuff_query, stuff_pos = self.locate(images, None, weights)
            scores, query_idx, thing_classes = self.select_things(location["pred_logits"][-1].float())
            hidden = torch.gather(location["hidden"], 1,
                                  query_idx[..., None].expand(-1, -1, location["hidden"].shape[-1]))
            query_pos = torch.gather(location["query_pos"], 1,
                                     query_idx[..., None].expand(-1, -1, location["query_pos"].shape[-1]))
            # the optimised path makes the outputs of the last layers only, the ones read below
            masks = _run_module(weights, self.mask_decoder, "mask_decoder", hidden, query_pos, stuff_query,
                                stuff_pos, memory, **(self._last_layer_kwargs if optimized else {}))
        masks = {kind: [{k: v.float() for k, v in layer.items()} for layer in layers] for kind, layers in masks.items()}
        self.check_low_precision_outputs([location["pred_logits"][-1]]
                                         + [v for layers in masks.values() for v in layers[-1].values()])
        return self.inference(scores, thing_classes, masks, batched_inputs, images)

    def locate(self, images: ImageList, targets: Optional[List[Dict[str, Tensor]]],
               weights: Optional[InferenceWeights] = None):
        """Backbone, encoder and location decoder; with ``weights`` (active), as the optimised
        inference path runs them (channels-last images, the cached weights).

        Returns:
            the encoder's tokens (MultiLevelTokens), the location decoder's outputs, and the stuff
            queries' content and positional parts (B x Ns x C each).
        """
        padding_mask = torch.ones(images.tensor.shape[0], *images.tensor.shape[-2:], dtype=torch.bool,
                                  device=self.device)
        for i, (h, w) in enumerate(images.image_sizes):
            padding_mask[i, :h, :w] = False
        if weights is None:
            features = self.backbone_features(images.tensor)
        else:
            channels_last = images.tensor.contiguous(memory_format=torch.channels_last)
            features = weights.call(self.backbone, "backbone", channels_last)
        memory = _run_module(weights, self.encoder, "encoder", features, padding_mask)
        location = _run_module(weights, self.location_decoder, "location_decoder", memory, targets)
        batch = images.tensor.shape[0]
        stuff_pos, stuff_query = self.stuff_query.weight.split(location["hidden"].shape[-1], dim=1)
        return memory, location, stuff_query[None].expand(batch, -1, -1), stuff_pos[None].expand(batch, -1, -1)

    def training_masks(self, location: Dict[str, object], stuff_query: Tensor, stuff_pos: Tensor,
                       memory) -> Dict[str, List[Dict[str, Tensor]]]:
        """The mask decoder's outputs in training. Denoising queries (when the location decoder
        made them) pass the thing mask decoder with the matched ones; their outputs come back
        apart, under "denoising_things". The thing queries do not attend to each other in
        ``AttentionMaskDecoder``, so the two sets do not see each other."""
        denoising = location.get("denoising")
        if denoising is None:
            return self.mask_decoder(location["hidden"], location["query_pos"], stuff_query, stuff_pos, memory)
        num_queries = location["hidden"].shape[1]
        masks = self.mask_decoder(torch.cat([location["hidden"], denoising["hidden"]], dim=1),
                                  torch.cat([location["query_pos"], denoising["query_pos"]], dim=1),
                                  stuff_query, stuff_pos, memory)
        things = masks["things"]
        masks["things"] = [{k: v[:, :num_queries] for k, v in layer.items()} for layer in things]
        masks["denoising_things"] = [{k: v[:, num_queries:] for k, v in layer.items()} for layer in things]
        return masks

    def select_things(self, thing_logits: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """The top-k (query, thing class) pairs by sigmoid score.

        Args:
            thing_logits: B x N x C_thing.
        Returns:
            scores B x k, query indices B x k, thing-class indices B x k (k = min(NUM_THINGS, N C)).
        """
        batch, num_queries, num_classes = thing_logits.shape
        k = min(self.num_test_things, num_queries * num_classes)
        scores, flat = thing_logits.sigmoid().flatten(1).topk(k, dim=1)
        return scores, flat // num_classes, flat % num_classes

    def prepare_targets(self, batched_inputs, images: ImageList) -> List[Dict[str, Tensor]]:
        """Split each image's segments into things (with boxes from their masks, normalized
        cx, cy, w, h) and stuff, masks zero-padded to the batch's padded size."""
        if any("instances" not in x for x in batched_inputs):
            raise ValueError("PanopticSegFormer training needs 'instances' in every input (gt_classes and "
                             "gt_masks from the dataset mapper); check INPUT.DATASET_MAPPER_NAME")
        h_pad, w_pad = images.tensor.shape[-2:]
        targets = []
        for x, (h, w) in zip(batched_inputs, images.image_sizes):
            gt = x["instances"].to(self.device)
            gt_masks = gt.gt_masks if isinstance(gt.gt_masks, Tensor) else gt.gt_masks.tensor
            masks = torch.zeros((gt_masks.shape[0], h_pad, w_pad), dtype=torch.bool, device=self.device)
            masks[:, : gt_masks.shape[1], : gt_masks.shape[2]] = gt_masks.bool()
            classes = gt.gt_classes.long()
            if classes.numel() and (classes.min() < 0 or classes.max() >= self.num_classes):
                raise ValueError(f"gt_classes {classes.tolist()} outside [0, {self.num_classes}) in "
                                 f"{x.get('file_name', 'an input')}")
            is_thing = self._thing_index[classes] >= 0
            thing_masks = masks[is_thing]
            boxes = BitMasks(thing_masks).get_bounding_boxes().tensor
            scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=self.device)
            boxes = box_convert(boxes / scale, "xyxy", "cxcywh")
            targets.append({
                "labels": self._thing_index[classes[is_thing]],
                "boxes": boxes,
                "masks": thing_masks,
                "stuff_labels": self._stuff_index[classes[~is_thing]],
                "stuff_masks": masks[~is_thing],
            })
        return targets

    def inference(self, thing_scores: Tensor, thing_classes: Tensor, masks: Dict[str, List[Dict[str, Tensor]]],
                  batched_inputs, images: ImageList) -> List[Dict[str, object]]:
        """Per image: mask probabilities at the output size, then the enabled outputs."""
        thing_masks = masks["things"][-1]["pred_masks"]
        stuff_masks = masks["stuff"][-1]["pred_masks"]
        stuff_scores = masks["stuff"][-1]["pred_logits"][..., 0].sigmoid()
        thing_ids = torch.as_tensor(self.thing_ids, device=self.device)
        stuff_ids = torch.as_tensor(self.stuff_ids, device=self.device)
        results = []
        for i, (x, image_size) in enumerate(zip(batched_inputs, images.image_sizes)):
            height, width = x.get("height", image_size[0]), x.get("width", image_size[1])
            logits = torch.cat([thing_masks[i], stuff_masks[i]]).float()
            logits = F.interpolate(logits[None], size=images.tensor.shape[-2:], mode="bilinear",
                                   align_corners=False)[0]
            probs = _resize_to_output(logits, image_size, height, width)
            # in place when it is a whole tensor of ours (the same values): one N x H x W less
            probs = probs.sigmoid_() if probs.is_contiguous() else probs.sigmoid()
            labels = torch.cat([thing_ids[thing_classes[i]], stuff_ids])
            scores = torch.cat([thing_scores[i], stuff_scores[i]]).float()
            result: Dict[str, object] = {}
            if self.semantic_on:
                result[SEMANTIC.output_key] = self.semantic_scores(labels, scores, probs)
            # the binary masks, their areas and inner probability mass, once for both outputs
            binarized = None
            if self.panoptic_on or self.instance_on:
                binarized = binarize_masks(probs, self.merge_params.get("mask_threshold", 0.5))
            if self.panoptic_on:
                result[PANOPTIC.output_key] = mask_wise_merge(labels, scores, probs, self.thing_ids,
                                                              binarized=binarized, **self.merge_params)
            if self.instance_on:
                num_things = thing_classes.shape[1]
                result[INSTANCE.output_key] = self.instances(
                    labels[:num_things], scores[:num_things], probs[:num_things],
                    tuple(t[:num_things] for t in binarized))
            results.append(result)
        return results

    def semantic_scores(self, labels: Tensor, scores: Tensor, probs: Tensor) -> Tensor:
        """K x H x W: for each class, the highest ``score * probability`` among its masks (0 where
        the class has none). ``SEMANTIC_MASKS_PER_CHUNK`` masks at a time, in one scratch block: no
        N x H x W product is made (R50 COCO at 512 x 512, 153 masks: 82 -> 56 ms and 160 MB
        less); a maximum gives the same result in any order.

        Args:
            labels, scores: N class ids and N scores of the masks.
            probs: N x H x W mask probabilities.
        """
        sem_seg = probs.new_zeros((self.num_classes,) + probs.shape[1:])
        chunk = SEMANTIC_MASKS_PER_CHUNK
        scratch = probs.new_empty((min(chunk, probs.shape[0]),) + probs.shape[1:])
        for start in range(0, probs.shape[0], chunk):
            part = probs[start:start + chunk]
            weighted = torch.mul(part, scores[start:start + chunk, None, None], out=scratch[: part.shape[0]])
            index = labels[start:start + chunk, None, None].expand_as(weighted)
            sem_seg.scatter_reduce_(0, index, weighted, reduce="amax", include_self=True)
        return sem_seg

    def instances(self, labels: Tensor, scores: Tensor, probs: Tensor,
                  binarized: Optional[Tuple[Tensor, Tensor, Tensor]] = None) -> Instances:
        """The thing masks as instances, scored by the mask-wise merging confidence
        ``p ** alpha * q ** beta`` and sorted by it.

        Args:
            labels, scores: N class ids and N scores of the masks.
            probs: N x H x W mask probabilities.
            binarized: ``binarize_masks(probs, mask_threshold)`` when the caller has it, or None.
        """
        params = self.merge_params
        # binary = probs > threshold, its area and sum(probs * binary), by the merge's vectorised code
        if binarized is None:
            binarized = binarize_masks(probs, params.get("mask_threshold", 0.5))
        binary, area, prob_in_mask = binarized
        quality = prob_in_mask / (area + 1)
        confidence = scores ** params.get("alpha", 1.0) * quality ** params.get("beta", 2.0)
        order = confidence.argsort(descending=True)
        result = Instances(probs.shape[-2:])
        result.pred_masks = binary[order]
        flat = result.pred_masks.view(torch.uint8)  # a uint8 max is vectorised, a bool any() is not
        result.pred_boxes = Boxes(boxes_from_profiles(flat.amax(1) > 0, flat.amax(2) > 0))
        result.scores = confidence[order]
        result.pred_classes = labels[order]
        return result
