"""MaskFormer's set criterion: classification and mask losses of Hungarian-matched predictions,
and :func:`build_criterion`, which makes it (with its matcher and loss weights) from a config."""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.projects.point_rend.point_features import (
    get_uncertain_point_coords_with_randomness,
    point_sample,
)
from detectron2.utils import comm
from torch import Tensor, nn

from .mask_losses import MASK_LOSSES, get_mask_loss
from .matcher import POINT_SAMPLE_KWARGS, SOLVERS, HungarianMatcher, check_outputs, check_targets
from .upsampled_mask_losses import tiled_upsampled_mask_losses_enabled, upsampled_mask_losses

__all__ = [
    "SetCriterion",
    "build_criterion",
    "build_matcher",
    "build_loss_weights",
    "point_uncertainty",
    "matched_mask_logits",
    "matched_target_masks",
    "stacked_target_masks",
    "without_mask_factors",
]


class SetCriterion(nn.Module):
    """Losses of MaskFormer's (class, mask) predictions against the targets.

    Per layer (the final output and each entry of ``outputs["aux_outputs"]``):
    1. the matcher assigns queries to targets (a matcher whose ``matches_layers_together`` is
       true, as :class:`HungarianMatcher`'s is, gets all layers in one call);
    2. ``loss_ce``: cross-entropy over K+1 classes, unmatched queries supervised with the
       "no object" class K, whose weight is ``eos_coef``;
    3. the mask losses of the matched pairs: "focal" -> ``loss_mask``, "bce" -> ``loss_bce``,
       "brier" -> ``loss_brier``, "dice" -> ``loss_dice``, each normalized by the number of target
       masks in the batch. With ``num_points=0`` (the paper's losses) they cover every pixel of
       the (padded) target size, the predicted masks upsampled (bilinear) to it; with
       ``num_points=K > 0`` they cover K points per mask, chosen as Mask2Former does (PointRend's
       uncertainty-based importance sampling): ``oversample_ratio * K`` uniformly random
       candidates, the ``importance_sample_ratio * K`` most uncertain of them (prediction logit
       closest to 0) plus uniformly random points for the rest; predictions and targets are
       both read there bilinearly.

    Where a layer's outputs also hold the factors of its mask logits, ``mask_embed`` B x Q x C and
    ``mask_features`` B x C x h x w (``pred_masks`` = ``einsum("bqc,bchw->bqhw")``, as
    MaskFormer's transformer decoder gives them in training), the matched pairs' logits are
    recomputed from them (:func:`matched_mask_logits`): the mask losses' backward then runs
    through the M matched queries only, not through a zero-filled gradient of all Q queries' logits
    and the product's backward at every pixel (the same losses and gradients to float rounding).

    Losses are returned unweighted; ``weight_dict`` holds the weight of each returned key (the
    meta-architecture applies them and drops keys without a weight). The inputs are checked once
    for all layers, so the matcher need not check them again (see :func:`build_matcher`).
    """

    def __init__(
        self,
        num_classes: int,
        matcher: nn.Module,
        eos_coef: float,
        mask_losses: Sequence[str] = ("focal", "dice"),
        weight_dict: Optional[Dict[str, float]] = None,
        num_points: int = 0,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
    ):
        """
        Args:
            num_classes: K, the number of classes without "no object".
            matcher: module mapping (outputs, targets) to per-image (query indices, target
                indices), e.g. :class:`HungarianMatcher`. If its attribute
                ``matches_layers_together`` is true, it is called once with the list of all
                layers' outputs and returns a list of those per layer.
            eos_coef: cross-entropy weight of the "no object" class.
            mask_losses: names of the mask losses, one or more of ``MASK_LOSSES`` ("focal", "bce",
                "brier", "dice", ...).
            weight_dict: weight of each loss key (with the ``_i`` suffixes of deep supervision).
            num_points: 0 for mask losses over every pixel; K > 0 for losses over K sampled points
                per mask (drawn from torch's global generator: deterministic under
                ``torch.manual_seed``).
            oversample_ratio: (num_points > 0) candidate points per point, >= 1.
            importance_sample_ratio: (num_points > 0) fraction in [0, 1] of the points taken as
                the most uncertain candidates; the others are uniformly random.
        """
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"SetCriterion: num_classes must be an int >= 1, got {num_classes!r}")
        if not isinstance(eos_coef, (int, float)) or not (0 <= eos_coef < float("inf")):
            raise ValueError(
                f"SetCriterion: eos_coef must be a finite number >= 0, got {eos_coef!r}"
            )
        if isinstance(mask_losses, str) or len(mask_losses) == 0:
            raise ValueError(
                "SetCriterion: mask_losses must be a non-empty list of names from "
                f"{', '.join(repr(n) for n in MASK_LOSSES)}, got {mask_losses!r}"
            )
        if len(set(mask_losses)) != len(mask_losses):
            raise ValueError(f"SetCriterion: mask_losses has duplicate names: {list(mask_losses)}")
        if not _valid_num_points(num_points):
            raise ValueError(f"SetCriterion: num_points must be an int >= 0, got {num_points!r}")
        if not _valid_oversample_ratio(oversample_ratio):
            raise ValueError(
                f"SetCriterion: oversample_ratio must be a finite number >= 1, got {oversample_ratio!r}"
            )
        if not _valid_importance_sample_ratio(importance_sample_ratio):
            raise ValueError(
                "SetCriterion: importance_sample_ratio must be a number in [0, 1], got "
                f"{importance_sample_ratio!r}"
            )
        self.mask_losses = {
            name: get_mask_loss(name, where="SetCriterion mask_losses") for name in mask_losses
        }

        self.num_classes = num_classes
        self.matcher = matcher
        self.eos_coef = float(eos_coef)
        self.weight_dict = dict(weight_dict or {})
        self.num_points = num_points
        self.oversample_ratio = float(oversample_ratio)
        self.importance_sample_ratio = float(importance_sample_ratio)
        # the published checkpoints hold this buffer as "criterion.empty_weight"
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = self.eos_coef
        self.register_buffer("empty_weight", empty_weight)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, eos_coef={self.eos_coef}, "
            f"mask_losses={list(self.mask_losses)}, num_points={self.num_points}"
            + (
                f", oversample_ratio={self.oversample_ratio}, "
                f"importance_sample_ratio={self.importance_sample_ratio}"
                if self.num_points
                else ""
            )
        )

    def forward(self, outputs: Dict, targets: Sequence[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        """
        Args:
            outputs: ``pred_logits`` B x Q x (K+1), ``pred_masks`` B x Q x h x w (mask logits),
                optionally their factors ``mask_embed`` B x Q x C and ``mask_features``
                B x C x h x w, and optionally ``aux_outputs``: a list of dicts with the same keys,
                one per intermediate decoder layer.
            targets: one dict per image: ``labels`` (T,) int64 in [0, K) and ``masks``
                T x H x W (bool or float in {0, 1}); H, W may differ between images.

        Returns:
            Unweighted scalar float32 losses: ``loss_ce`` and one key per mask loss, plus the
            same keys with suffix ``_i`` for ``aux_outputs[i]``.
        """
        layers = [("", outputs)]
        for i, aux_outputs in enumerate(outputs.get("aux_outputs") or []):
            layers.append((f"_{i}", aux_outputs))
        for suffix, layer_outputs in layers:
            where = "SetCriterion" + (f" (aux_outputs[{suffix[1:]}])" if suffix else "")
            check_outputs(layer_outputs, where)
            check_mask_factors(layer_outputs, where)
            if layer_outputs["pred_logits"].shape[-1] != self.num_classes + 1:
                raise ValueError(
                    f"{where}: pred_logits has {layer_outputs['pred_logits'].shape[-1]} class "
                    f"scores per query, expected num_classes + 1 = {self.num_classes + 1}"
                )
        pred_logits = outputs["pred_logits"]
        check_targets(targets, pred_logits.shape[0], self.num_classes, "SetCriterion")
        num_masks = self._num_masks(targets, pred_logits.device)
        # the matcher and the mask losses of every layer read the target masks as float32 on the
        # predictions' device: converted once here instead of once per layer and use
        targets = [
            dict(target, masks=target["masks"].to(device=pred_logits.device, dtype=torch.float32))
            for target in targets
        ]

        losses = {}
        # in float32 even under autocast, so that mixed precision training is safe
        with torch.autocast(device_type=pred_logits.device.type, enabled=False):
            layer_outputs_list = [
                {k: out[k] for k in ("pred_logits", "pred_masks", *MASK_FACTOR_KEYS) if k in out}
                for _, out in layers
            ]
            if getattr(self.matcher, "matches_layers_together", False) and len(layers) > 1:
                layer_indices = self.matcher(layer_outputs_list, targets)
            else:
                layer_indices = [self.matcher(layer_outputs, targets) for layer_outputs in layer_outputs_list]
            for indices in layer_indices:
                if len(indices) != len(targets):
                    raise ValueError(
                        f"SetCriterion: the matcher returned {len(indices)} index pairs for "
                        f"{len(targets)} images; expected one (query, target) pair per image"
                    )
            layer_src_masks = matched_mask_logits(layer_outputs_list, layer_indices)
            # the full-resolution losses computed tile by tile read each layer's targets from one
            # table of all targets instead of a copy of the matched ones per layer
            target_table = (
                stacked_target_masks(targets, pred_logits.device)
                if self.num_points == 0 and tiled_upsampled_mask_losses_enabled()
                else None
            )
            for (suffix, _), layer_outputs, indices, src_masks in zip(
                layers, layer_outputs_list, layer_indices, layer_src_masks
            ):
                loss_ce = self.loss_labels(layer_outputs["pred_logits"], targets, indices)
                losses["loss_ce" + suffix] = loss_ce
                mask_losses = self.loss_masks(
                    layer_outputs["pred_masks"], targets, indices, num_masks, src_masks, target_table=target_table
                )
                losses.update({key + suffix: value for key, value in mask_losses.items()})
        return losses

    def loss_labels(
        self,
        pred_logits: Tensor,
        targets: Sequence[Dict[str, Tensor]],
        indices: List[Tuple[Tensor, Tensor]],
    ) -> Tensor:
        """Cross-entropy over K+1 classes, unmatched queries -> "no object" (class K).

        Args:
            pred_logits: B x Q x (K+1).

        Returns:
            Scalar: the mean weighted by ``empty_weight`` of the target classes, as
            ``F.cross_entropy(weight=...)`` computes it.
        """
        pred_logits = pred_logits.float()
        device = pred_logits.device
        target_classes = torch.full(
            pred_logits.shape[:2], self.num_classes, dtype=torch.int64, device=device
        )
        batch_idx, query_idx = self._matched_queries(indices)
        if batch_idx.numel() > 0:
            matched_labels = torch.cat(
                [
                    target["labels"][tgt_idx.to(target["labels"].device)].to(device)
                    for target, (_, tgt_idx) in zip(targets, indices)
                ]
            )
            target_classes[batch_idx.to(device), query_idx.to(device)] = matched_labels
        return F.cross_entropy(
            pred_logits.transpose(1, 2), target_classes, weight=self.empty_weight.float()
        )

    def loss_masks(
        self,
        pred_masks: Tensor,
        targets: Sequence[Dict[str, Tensor]],
        indices: List[Tuple[Tensor, Tensor]],
        num_masks: float,
        src_masks: Optional[Tensor] = None,
        target_table: Optional[Tuple[Tensor, List[int]]] = None,
    ) -> Dict[str, Tensor]:
        """Mask losses of the matched pairs: over every pixel of the (padded) target size, the
        predictions upsampled to it (``num_points`` 0), or over ``num_points`` sampled points.

        Args:
            pred_masks: B x Q x h x w mask logits.
            targets: as in :meth:`forward`; the masks of smaller images are zero-padded at the
                bottom / right to the largest H x W, which the predictions span.
            indices: per image, (query indices, target indices) of the matched pairs.
            num_masks: normalizer (target masks in the batch, averaged over processes, >= 1).
            src_masks: (optional) M x h x w float32, the matched pairs' logits in the order of
                ``indices``, as :func:`matched_mask_logits` gives them; ``pred_masks`` indexed
                by default.
            target_table: (optional, full resolution only) all targets' masks and each image's
                first row in them, as :func:`stacked_target_masks` gives them: the losses then
                read the matched targets from it (no copy of them).

        Returns:
            One scalar per configured mask loss, keyed by its loss key (e.g. ``loss_mask``).
        """
        if not any(len(src) for src, _ in indices):
            # keep pred_masks in the graph so that every parameter gets a (zero) gradient
            return {
                kind.loss_key: pred_masks.float().sum() * 0.0
                for kind in self.mask_losses.values()
            }

        if src_masks is None:
            src_masks = matched_mask_logits([{"pred_masks": pred_masks}], [indices])[0]
        kinds = list(self.mask_losses.values())
        if self.num_points == 0 and target_table is not None:
            table, first_rows = target_table
            rows = torch.cat([first + tgt_idx.to(table.device) for first, (_, tgt_idx) in zip(first_rows, indices)])
            losses = upsampled_mask_losses(src_masks, table, kinds, num_masks, target_rows=rows)
            return {kind.loss_key: loss for kind, loss in zip(kinds, losses)}
        tgt_masks = matched_target_masks(targets, indices, pred_masks.device)
        if self.num_points > 0:
            src_points, tgt_points = self._sample_points(src_masks, tgt_masks)
            return {
                kind.loss_key: kind.loss(src_points, tgt_points, num_masks)
                for kind in self.mask_losses.values()
            }

        losses = upsampled_mask_losses(src_masks, tgt_masks, kinds, num_masks)
        return {kind.loss_key: loss for kind, loss in zip(kinds, losses)}

    def _sample_points(self, src_masks: Tensor, tgt_masks: Tensor) -> Tuple[Tensor, Tensor]:
        """The values of the matched predictions and targets at ``num_points`` points per mask,
        chosen by uncertainty-based importance sampling on the predictions.

        Args:
            src_masks: N x h x w float32 mask logits.
            tgt_masks: N x H x W float32 targets (the same [0, 1]^2 extent as the predictions).

        Returns:
            N x num_points predicted logits (differentiable) and N x num_points target values
            (bilinear, in [0, 1]).
        """
        src_masks = src_masks[:, None]
        with torch.no_grad():
            coords = get_uncertain_point_coords_with_randomness(
                src_masks,
                point_uncertainty,
                self.num_points,
                self.oversample_ratio,
                self.importance_sample_ratio,
            )
            tgt_points = point_sample(tgt_masks[:, None], coords, **POINT_SAMPLE_KWARGS)[:, 0]
        src_points = point_sample(src_masks, coords, **POINT_SAMPLE_KWARGS)[:, 0]
        return src_points, tgt_points

    @staticmethod
    def _matched_queries(indices: List[Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tensor]:
        """(image index, query index) of every matched query, concatenated over the batch."""
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        query_idx = torch.cat([src for src, _ in indices])
        return batch_idx, query_idx

    @staticmethod
    def _num_masks(targets: Sequence[Dict[str, Tensor]], device: torch.device) -> float:
        """Number of target masks per process: the batch total averaged over processes, >= 1."""
        total = float(sum(len(target["labels"]) for target in targets))
        num_masks = torch.tensor([total], dtype=torch.float32, device=device)
        world_size = comm.get_world_size()
        if world_size > 1:
            torch.distributed.all_reduce(num_masks)
        return torch.clamp(num_masks / world_size, min=1).item()


MASK_FACTOR_KEYS = ("mask_embed", "mask_features")


def check_mask_factors(outputs: Dict[str, Tensor], caller: str) -> None:
    """Raise a clear error unless ``outputs`` has both or neither of ``mask_embed`` (B x Q x C) and
    ``mask_features`` (B x C x h x w), shaped as the factors of ``pred_masks`` (B x Q x h x w)."""
    present = [key for key in MASK_FACTOR_KEYS if key in outputs]
    if not present:
        return
    if len(present) == 1:
        raise KeyError(
            f"{caller}: outputs has {present[0]!r} but not its other factor; the factors of "
            f"pred_masks are {MASK_FACTOR_KEYS} together"
        )
    embed, features, masks = outputs["mask_embed"], outputs["mask_features"], outputs["pred_masks"]
    batch, queries, height, width = masks.shape
    if (embed.dim() != 3 or features.dim() != 4 or tuple(embed.shape[:2]) != (batch, queries)
            or features.shape[0] != batch or features.shape[1] != embed.shape[2]
            or tuple(features.shape[2:]) != (height, width)):
        raise ValueError(
            f"{caller}: expected mask_embed B x Q x C and mask_features B x C x h x w with pred_masks "
            f"B x Q x h x w = {tuple(masks.shape)}, got mask_embed {tuple(embed.shape)} and "
            f"mask_features {tuple(features.shape)}"
        )


def without_mask_factors(outputs: Dict) -> Dict:
    """``outputs`` (and each of its ``aux_outputs``) without ``mask_embed`` / ``mask_features``:
    the criterion then reads the matched logits from ``pred_masks``, whose backward runs through
    every query (the project's reference training path, as before the factors were used)."""
    stripped = {k: v for k, v in outputs.items() if k not in MASK_FACTOR_KEYS}
    if outputs.get("aux_outputs"):
        stripped["aux_outputs"] = [without_mask_factors(aux) for aux in outputs["aux_outputs"]]
    return stripped


def matched_target_masks(
    targets: Sequence[Dict[str, Tensor]], indices: List[Tuple[Tensor, Tensor]], device: torch.device
) -> Tensor:
    """
    The matched targets' masks, in the order of ``indices``, in one M x H x W float32 tensor on
    ``device``, H x W the largest of the batch: the masks of smaller images are zero-padded at the
    bottom / right, like the images. Where an image's masks are float32 on ``device`` at that
    size (SetCriterion converts them once per step), its matched masks are copied once, straight
    into the result, instead of gathered, padded and concatenated (three copies per decoder layer).

    Args:
        targets: one dict per image with ``masks`` T x H_b x W_b.
        indices: per image, (query indices, target indices) of the matched pairs.
        device: where the result lies.
    """
    height = max(target["masks"].shape[-2] for target in targets)
    width = max(target["masks"].shape[-1] for target in targets)
    num_matched = sum(len(tgt_idx) for _, tgt_idx in indices)
    padded = any(target["masks"].shape[-2:] != (height, width) for target in targets)
    allocate = torch.zeros if padded else torch.empty  # only the padding needs the zeros
    result = allocate(num_matched, height, width, dtype=torch.float32, device=device)
    start = 0
    for target, (_, tgt_idx) in zip(targets, indices):
        masks, rows = target["masks"], result[start : start + len(tgt_idx)]
        tgt_idx = tgt_idx.to(masks.device)
        if masks.shape[-2:] == result.shape[-2:] and masks.dtype == result.dtype and masks.device == result.device:
            torch.index_select(masks, 0, tgt_idx, out=rows)
        else:
            rows[:, : masks.shape[-2], : masks.shape[-1]] = masks.index_select(0, tgt_idx)
        start += len(tgt_idx)
    return result


def stacked_target_masks(targets: Sequence[Dict[str, Tensor]], device: torch.device) -> Tuple[Tensor, List[int]]:
    """
    The masks of all images' targets in one K x H x W float32 tensor on ``device`` (K targets in
    all, H x W the largest of the batch, the masks of smaller images zero-padded at the bottom /
    right as :func:`matched_target_masks` pads them), and the row of each image's first target.
    One image's float32 masks on ``device`` are returned as they are, not copied.
    """
    height = max(target["masks"].shape[-2] for target in targets)
    width = max(target["masks"].shape[-1] for target in targets)
    first_rows, total = [], 0
    for target in targets:
        first_rows.append(total)
        total += target["masks"].shape[0]
    masks = [target["masks"] for target in targets]
    if len(masks) == 1 and masks[0].dtype == torch.float32 and masks[0].device == device:
        return masks[0], first_rows
    if all(m.shape[-2:] == (height, width) for m in masks):
        return torch.cat([m.to(device=device, dtype=torch.float32) for m in masks]), first_rows
    table = torch.zeros(total, height, width, dtype=torch.float32, device=device)
    for first, m in zip(first_rows, masks):
        table[first : first + m.shape[0], : m.shape[-2], : m.shape[-1]] = m
    return table, first_rows


def matched_mask_logits(
    layers: Sequence[Dict[str, Tensor]], layer_indices: Sequence[List[Tuple[Tensor, Tensor]]]
) -> List[Tensor]:
    """
    The mask logits of each layer's matched queries, image by image in the order of its indices.

    Args:
        layers: per decoder layer, outputs with ``pred_masks`` B x Q x h x w and optionally its
            factors ``mask_embed`` B x Q x C and ``mask_features`` B x C x h x w
            (``pred_masks = einsum("bqc,bchw->bqhw", mask_embed, mask_features)``).
        layer_indices: per layer, per image, (query indices, target indices) of the matched pairs.
    Returns:
        Per layer, M_l x h x w float32 (M_l matched pairs in all). Without the factors,
        ``pred_masks`` indexed. Where every layer has them, with the same features, each image's
        matched rows of all layers' ``mask_embed`` times its features in one product (in
        ``pred_masks``' dtype, as the product that made it), so the backward reaches the
        features through those rows only, once per image, instead of through a zero-filled
        Q x h x w gradient per layer and image: for R50 at 512 x 512 (6 layers x 100 queries,
        2 x 8 targets) about 10 GMAC and an 80 MB gradient less per step.
    """
    if len(layers) != len(layer_indices):
        raise ValueError(
            f"matched_mask_logits: got {len(layers)} layers' outputs but {len(layer_indices)} layers' "
            "indices; expected one list of (query, target) index pairs per layer"
        )
    features = layers[0].get("mask_features") if layers else None
    if features is None or any(
        layer.get("mask_embed") is None or layer.get("mask_features") is not features for layer in layers
    ):
        result = []
        for layer, indices in zip(layers, layer_indices):
            pred_masks = layer["pred_masks"]
            batch_idx, query_idx = SetCriterion._matched_queries(indices)
            result.append(pred_masks[batch_idx.to(pred_masks.device), query_idx.to(pred_masks.device)].float())
        return result
    pred_masks = layers[0]["pred_masks"]
    dtype, device = pred_masks.dtype, pred_masks.device
    height, width = pred_masks.shape[-2:]
    pixel_major = not features.is_contiguous() and features.is_contiguous(memory_format=torch.channels_last)
    # per layer, per image: that image's M_lb x hw logits
    pieces: List[List[Tensor]] = [[] for _ in layers]
    for image, image_features in enumerate(features.unbind(0)):
        image_features = image_features.to(dtype)  # C x h x w
        # C x hw: a view of the channels-last features' hw x C memory, or of the planar ones
        pixels = image_features.permute(1, 2, 0).flatten(0, 1).t() if pixel_major else image_features.flatten(1)
        queries = [indices[image][0].to(device) for indices in layer_indices]
        embeds = torch.cat([layer["mask_embed"][image, q] for layer, q in zip(layers, queries)])
        logits = torch.mm(embeds.to(dtype), pixels)
        for layer_pieces, piece in zip(pieces, logits.split([len(q) for q in queries])):
            layer_pieces.append(piece)
    return [torch.cat(layer_pieces).view(-1, height, width).float() for layer_pieces in pieces]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _valid_num_points(value) -> bool:
    """An int >= 0 (0: no point sampling)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _valid_oversample_ratio(value) -> bool:
    """A finite number >= 1."""
    return _is_number(value) and 1 <= value < float("inf")


def _valid_importance_sample_ratio(value) -> bool:
    """A number in [0, 1]."""
    return _is_number(value) and 0 <= value <= 1


def point_uncertainty(logits: Tensor) -> Tensor:
    """Uncertainty of mask logits for importance sampling: ``-|logit|``, highest (0) where the
    prediction is 0.5. Shape-preserving (N x 1 x P -> N x 1 x P)."""
    return -torch.abs(logits)


def build_loss_weights(cfg) -> Dict[str, float]:
    """Weights of the criterion's named losses, repeated with suffix ``_i`` for each of the
    DEC_LAYERS - 1 intermediate decoder layers when deep supervision is on. Each mask loss's
    weight is the config key its :class:`MaskLossType` names."""
    mf = cfg.MODEL.MASK_FORMER
    unknown = [n for n in mf.MASK_LOSSES if n not in MASK_LOSSES]
    if unknown or not mf.MASK_LOSSES:
        raise ValueError(
            f"MODEL.MASK_FORMER.MASK_LOSSES={list(mf.MASK_LOSSES)}: expected a non-empty list of "
            f"{sorted(MASK_LOSSES)}"
        )
    weights = {"loss_ce": mf.CLASS_WEIGHT}
    for name in mf.MASK_LOSSES:
        weights[MASK_LOSSES[name].loss_key] = _mask_loss_weight(cfg, name)
    if mf.DEEP_SUPERVISION:
        last_layer = dict(weights)
        for i in range(mf.DEC_LAYERS - 1):
            weights.update({f"{k}_{i}": v for k, v in last_layer.items()})
    return weights


def _mask_loss_weight(cfg, name: str) -> float:
    key = MASK_LOSSES[name].weight_key
    if key not in cfg.MODEL.MASK_FORMER:
        raise KeyError(
            f"MODEL.MASK_FORMER.{key}, the weight of mask loss {name!r}, is not in the config; add "
            "it (e.g. in the function that registers the loss) before building the model"
        )
    return float(cfg.MODEL.MASK_FORMER[key])


def _point_sampling_args(cfg) -> Dict[str, float]:
    """TRAIN_NUM_POINTS, OVERSAMPLE_RATIO and IMPORTANCE_SAMPLE_RATIO, checked, as the keyword
    arguments of :class:`SetCriterion`."""
    mf = cfg.MODEL.MASK_FORMER
    num_points = mf.TRAIN_NUM_POINTS
    if not _valid_num_points(num_points):
        raise ValueError(
            f"MODEL.MASK_FORMER.TRAIN_NUM_POINTS={num_points!r}: expected an int >= 0 (0 = mask "
            "losses and matching costs over every pixel)"
        )
    ratio = mf.OVERSAMPLE_RATIO
    if not _valid_oversample_ratio(ratio):
        raise ValueError(f"MODEL.MASK_FORMER.OVERSAMPLE_RATIO={ratio!r}: expected a finite number >= 1")
    importance = mf.IMPORTANCE_SAMPLE_RATIO
    if not _valid_importance_sample_ratio(importance):
        raise ValueError(f"MODEL.MASK_FORMER.IMPORTANCE_SAMPLE_RATIO={importance!r}: expected a number in [0, 1]")
    return {
        "num_points": num_points,
        "oversample_ratio": float(ratio),
        "importance_sample_ratio": float(importance),
    }


def _matcher_num_points(cfg) -> int:
    """MATCHER_NUM_POINTS, checked, with -1 resolved to TRAIN_NUM_POINTS."""
    mf = cfg.MODEL.MASK_FORMER
    num_points = mf.MATCHER_NUM_POINTS
    if isinstance(num_points, int) and not isinstance(num_points, bool) and num_points == -1:
        return _point_sampling_args(cfg)["num_points"]
    if not _valid_num_points(num_points):
        raise ValueError(
            f"MODEL.MASK_FORMER.MATCHER_NUM_POINTS={num_points!r}: expected -1 (as "
            "TRAIN_NUM_POINTS), 0 (every pixel) or an int K > 0 (K points per image)"
        )
    return num_points


def build_matcher(cfg) -> HungarianMatcher:
    """The Hungarian matcher, with the same terms and weights as the loss: the first pointwise mask
    loss in MASK_LOSSES gives the mask cost, "dice" the dice cost. The mask costs use
    MATCHER_NUM_POINTS = K > 0 uniformly random points per image (-1, the default: the
    TRAIN_NUM_POINTS of the losses, as Mask2Former; 0: every pixel); MATCHER_SOLVER picks the
    solver and MATCHER_CHUNK_POINTS how many pixels (points) the costs take at a time."""
    mf = cfg.MODEL.MASK_FORMER
    if mf.MATCHER_SOLVER not in SOLVERS:
        raise ValueError(
            f"MODEL.MASK_FORMER.MATCHER_SOLVER={mf.MATCHER_SOLVER!r}: expected one of "
            f"{', '.join(map(repr, SOLVERS))}"
        )
    chunk = mf.MATCHER_CHUNK_POINTS
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
        raise ValueError(f"MODEL.MASK_FORMER.MATCHER_CHUNK_POINTS={chunk!r}: expected an int >= 0 (0: all at once)")
    pointwise = [n for n in mf.MASK_LOSSES if MASK_LOSSES[n].pointwise]
    mask_cost_type = pointwise[0] if pointwise else "focal"
    return HungarianMatcher(
        cost_class=mf.CLASS_WEIGHT,
        cost_mask=_mask_loss_weight(cfg, mask_cost_type) if pointwise else 0.0,
        cost_dice=mf.DICE_WEIGHT if "dice" in mf.MASK_LOSSES else 0.0,
        mask_cost_type=mask_cost_type,
        check_inputs=False,  # SetCriterion checks them once for all decoder layers
        num_points=_matcher_num_points(cfg),
        solver=mf.MATCHER_SOLVER,
        chunk_points=mf.MATCHER_CHUNK_POINTS,
    )


def build_criterion(cfg, num_classes: int) -> SetCriterion:
    """MaskFormer's criterion from MODEL.MASK_FORMER: the matcher, the mask losses, the "no
    object" weight, the loss weights (``criterion.weight_dict``) and the point sampling of the
    mask losses and costs (TRAIN_NUM_POINTS, OVERSAMPLE_RATIO, IMPORTANCE_SAMPLE_RATIO).

    Args:
        num_classes: K, the model's number of classes.
    """
    mf = cfg.MODEL.MASK_FORMER
    weight_dict = build_loss_weights(cfg)  # validates MASK_LOSSES first
    return SetCriterion(
        num_classes,
        matcher=build_matcher(cfg),
        eos_coef=mf.NO_OBJECT_WEIGHT,
        mask_losses=list(mf.MASK_LOSSES),
        weight_dict=weight_dict,
        **_point_sampling_args(cfg),
    )
