"""Panoptic SegFormer's matching and losses.

* Location decoder, every layer: thing queries matched to the ground-truth things by the Hungarian
  algorithm on ``class_weight * focal class cost + l1_weight * L1 + giou_weight * (-GIoU)``;
  losses: sigmoid focal class loss (all queries, one-hot targets of the matched ones), box L1 and
  GIoU of the matched pairs.
* Mask decoder, things: one assignment per image (class and box costs of the location decoder's
  last layer + ``dice_weight`` * dice cost of the mask decoder's last layer), used for all its
  layers; losses: focal class loss and dice loss of the matched queries (unmatched thing queries
  get no mask loss).
* Mask decoder, stuff: query k is assigned to stuff class k (no matching); class target 1 when the
  class is in the image, 0 otherwise (focal loss); dice loss for the present classes only.
* Optional, not in the publication (``mask_focal_weight`` > 0, ``MODEL.PANOPTIC_SEGFORMER.
  MASK_FOCAL_WEIGHT``): MaskFormer's per-pixel sigmoid focal loss on the same mask pairs as the dice
  loss (``loss_thing_mask_i``, ``loss_stuff_mask_i``), a dense signal that speeds up the masks of a
  model trained from scratch.
* Optional, not in the publication (``class_loss="iou_aware"``, ``MODEL.PANOPTIC_SEGFORMER.
  CLASS_LOSS``): the thing class losses (location decoder and thing mask decoder) take as target of
  a matched query's class the IoU of its prediction with its ground truth (box IoU in the location
  decoder, IoU of the mask thresholded at 0, at the targets' size, in the mask decoder; detached):
  binary cross-entropy with weight 1 there, and the focal loss's weight ``(1 - alpha) p^gamma`` on
  every other (query, class) pair. The scores then rank predictions by their quality, which
  mask-wise merging relies on. The matching costs stay focal.
* With encoder proposals (``outputs["location"]["encoder"]``): the selected proposals are matched
  and get the location decoder's losses (``loss_enc_class``, ``loss_enc_l1``, ``loss_enc_giou``).
* With denoising queries (``outputs["location"]["denoising"]``): each is paired with the thing it
  was made from (no matching) and gets, per location-decoder layer, the class, L1 and GIoU losses
  (``loss_dn_{class,l1,giou}_i``) and, per thing mask-decoder layer
  (``outputs["masks"]["denoising_things"]``), the thing class and mask losses
  (``loss_dn_thing_{class,dice,mask}_i``); padding queries get none. Their normalizer is the
  number of things times the number of groups.

Every loss is normalized by the number of ground-truth things (or stuff segments) per image in the
batch, averaged over processes. Losses come back unweighted; ``weight_dict`` holds the weights.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.utils import comm
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import box_convert, box_iou, generalized_box_iou, sigmoid_focal_loss

from ..criterion import matched_target_masks
from ..mask_losses import MASK_LOSSES, dice_cost
from ..upsampled_mask_losses import upsampled_mask_losses

__all__ = ["focal_class_cost", "BoxMaskMatcher", "PanopticSegFormerCriterion", "CLASS_LOSSES"]

CLASS_LOSSES = ("focal", "iou_aware")


def focal_class_cost(logits: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Deformable DETR's focal classification cost of every (query, target) pair.

    Args:
        logits: Q x C class logits (sigmoid scores).
        labels: T target classes in [0, C).
    Returns:
        Q x T: focal loss of predicting the target class minus that of not predicting it.
    """
    prob = logits.sigmoid()
    neg = (1 - alpha) * prob ** gamma * F.softplus(logits)  # -log(1 - p) = softplus(x)
    pos = alpha * (1 - prob) ** gamma * F.softplus(-logits)  # -log(p) = softplus(-x)
    return pos[:, labels] - neg[:, labels]


class BoxMaskMatcher(nn.Module):
    """Hungarian matching of thing queries to ground-truth things on class, box and (optionally)
    dice costs; a weight of 0 removes its term."""

    def __init__(self, class_weight: float, l1_weight: float, giou_weight: float, dice_weight: float = 0.0,
                 alpha: float = 0.25, gamma: float = 2.0):
        super().__init__()
        self.class_weight, self.l1_weight = class_weight, l1_weight
        self.giou_weight, self.dice_weight = giou_weight, dice_weight
        self.alpha, self.gamma = alpha, gamma

    def cost_matrix(self, logits: Tensor, boxes: Tensor, target: Dict[str, Tensor],
                    masks: Tensor = None) -> Tensor:
        """
        Args:
            logits: Q x C; boxes: Q x 4 (cx, cy, w, h) in [0, 1].
            target: "labels" (T,), "boxes" T x 4 (cx, cy, w, h) in [0, 1] and, with a dice cost,
                "masks" T x H x W.
            masks: Q x h x w mask logits (for the dice cost).
        Returns:
            Q x T cost (float32).
        """
        logits, boxes = logits.float(), boxes.float()
        cost = self.class_weight * focal_class_cost(logits, target["labels"], self.alpha, self.gamma)
        cost = cost + self.l1_weight * torch.cdist(boxes, target["boxes"], p=1)
        giou = generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"),
                                   box_convert(target["boxes"], "cxcywh", "xyxy"))
        cost = cost - self.giou_weight * giou
        if self.dice_weight > 0 and masks is not None:
            tgt = F.interpolate(target["masks"][:, None].float(), size=masks.shape[-2:], mode="nearest")
            cost = cost + self.dice_weight * dice_cost(masks.float().flatten(1), tgt.flatten(1))
        return cost

    @torch.no_grad()
    def forward(self, logits: Tensor, boxes: Tensor, targets: Sequence[Dict[str, Tensor]],
                masks: Tensor = None) -> List[Tuple[Tensor, Tensor]]:
        """
        Args:
            logits: B x Q x C; boxes: B x Q x 4; masks: optional B x Q x h x w.
        Returns:
            per image (query indices, target indices), int64 CPU tensors of length min(Q, T).
        """
        indices = []
        for i, target in enumerate(targets):
            if len(target["labels"]) == 0 or logits.shape[1] == 0:
                empty = torch.empty(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
                continue
            cost = self.cost_matrix(logits[i], boxes[i], target, None if masks is None else masks[i])
            if not torch.isfinite(cost).all():
                raise FloatingPointError(f"BoxMaskMatcher: non-finite matching cost in image {i} of the batch")
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices


def _gather(indices: List[Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tensor]:
    batch = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    return batch, torch.cat([src for src, _ in indices])


def _average_over_processes(count: float, device) -> float:
    value = torch.tensor([count], dtype=torch.float32, device=device)
    if comm.get_world_size() > 1:
        torch.distributed.all_reduce(value)
    return torch.clamp(value / comm.get_world_size(), min=1).item()


class PanopticSegFormerCriterion(nn.Module):
    """Detection, thing-mask and stuff-mask losses of Panoptic SegFormer (see the module docstring).

    Output keys (unweighted): ``loss_loc_class_i``, ``loss_loc_l1_i``, ``loss_loc_giou_i`` for
    location-decoder layer i, ``loss_thing_class_i``, ``loss_thing_dice_i`` for thing mask-decoder
    layer i, ``loss_stuff_class_i``, ``loss_stuff_dice_i`` for stuff mask-decoder layer i.
    """

    def __init__(self, *, class_weight: float, l1_weight: float, giou_weight: float, dice_weight: float,
                 alpha: float = 0.25, gamma: float = 2.0, mask_focal_weight: float = 0.0,
                 class_loss: str = "focal"):
        super().__init__()
        if not mask_focal_weight >= 0:
            raise ValueError(f"MODEL.PANOPTIC_SEGFORMER.MASK_FOCAL_WEIGHT={mask_focal_weight!r}: expected a "
                             "number >= 0 (0: the published dice-only mask loss)")
        if class_loss not in CLASS_LOSSES:
            raise ValueError(f"MODEL.PANOPTIC_SEGFORMER.CLASS_LOSS={class_loss!r}: expected one of {CLASS_LOSSES}")
        self.alpha, self.gamma = alpha, gamma
        self.iou_aware = class_loss == "iou_aware"
        self.with_mask_focal = mask_focal_weight > 0
        self.box_matcher = BoxMaskMatcher(class_weight, l1_weight, giou_weight, 0.0, alpha, gamma)
        self.mask_matcher = BoxMaskMatcher(class_weight, l1_weight, giou_weight, dice_weight, alpha, gamma)
        self.weights = {"class": class_weight, "l1": l1_weight, "giou": giou_weight, "dice": dice_weight,
                        "mask": mask_focal_weight}

    def weight_dict(self, num_loc_layers: int, num_thing_layers: int, num_stuff_layers: int,
                    encoder_proposals: bool = False, denoising: bool = False) -> Dict[str, float]:
        w = self.weights
        weights = {}
        if encoder_proposals:
            weights.update({"loss_enc_class": w["class"], "loss_enc_l1": w["l1"], "loss_enc_giou": w["giou"]})
        if denoising:
            for i in range(num_loc_layers):
                weights.update({f"loss_dn_class_{i}": w["class"], f"loss_dn_l1_{i}": w["l1"],
                                f"loss_dn_giou_{i}": w["giou"]})
            for i in range(num_thing_layers):
                weights.update({f"loss_dn_thing_class_{i}": w["class"], f"loss_dn_thing_dice_{i}": w["dice"]})
                if self.with_mask_focal:
                    weights[f"loss_dn_thing_mask_{i}"] = w["mask"]
        for i in range(num_loc_layers):
            weights.update({f"loss_loc_class_{i}": w["class"], f"loss_loc_l1_{i}": w["l1"],
                            f"loss_loc_giou_{i}": w["giou"]})
        for kind, num_layers in (("thing", num_thing_layers), ("stuff", num_stuff_layers)):
            for i in range(num_layers):
                weights.update({f"loss_{kind}_class_{i}": w["class"], f"loss_{kind}_dice_{i}": w["dice"]})
                if self.with_mask_focal:
                    weights[f"loss_{kind}_mask_{i}"] = w["mask"]
        return weights

    def focal_class_loss(self, logits: Tensor, target_classes: Tensor, num: float) -> Tensor:
        """Sigmoid focal loss summed over queries and classes, divided by ``num``.

        Args:
            logits: B x Q x C; target_classes: B x Q int64, C for "no class" (all-zero target).
        """
        onehot = F.one_hot(target_classes, logits.shape[-1] + 1)[..., :-1].to(logits.dtype)
        return sigmoid_focal_loss(logits, onehot, alpha=self.alpha, gamma=self.gamma, reduction="sum") / num

    def thing_class_loss(self, logits: Tensor, indices: List[Tuple[Tensor, Tensor]],
                         targets: Sequence[Dict[str, Tensor]], quality: Optional[Tensor], num: float,
                         ignore: Optional[Tensor] = None) -> Tensor:
        """The focal class loss, or with ``class_loss="iou_aware"`` the IoU-aware one (module
        docstring), divided by ``num``.

        Args:
            logits: B x Q x C; indices: the matching; quality: the IoU of each matched pair, in
                the order of ``_gather(indices)`` (used by the IoU-aware loss only).
            ignore: optional B x Q bool, True for queries that get no class loss.
        """
        target_classes = _matched_classes(logits, targets, indices)
        if not self.iou_aware and ignore is None:
            return self.focal_class_loss(logits, target_classes, num)
        if not self.iou_aware:
            onehot = F.one_hot(target_classes, logits.shape[-1] + 1)[..., :-1].to(logits.dtype)
            loss = sigmoid_focal_loss(logits, onehot, alpha=self.alpha, gamma=self.gamma, reduction="none")
        else:
            batch_idx, query_idx = _gather(indices)
            target = torch.zeros_like(logits)
            if batch_idx.numel():
                target[batch_idx, query_idx, target_classes[batch_idx, query_idx]] = quality.detach().to(logits.dtype)
            # a matched pair whose prediction misses its target entirely (IoU 0) counts as a negative
            weight = torch.where(target > 0, torch.ones_like(logits),
                                 (1 - self.alpha) * logits.sigmoid() ** self.gamma)
            loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weight
        if ignore is not None:
            loss = loss.masked_fill(ignore[..., None], 0.0)
        return loss.sum() / num

    def forward(self, outputs: Dict[str, object], targets: Sequence[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        """
        Args:
            outputs: "location" (the LocationDecoder's outputs: lists "pred_logits", "pred_boxes")
                and "masks" (the mask decoder's: "things" and "stuff", lists of per-layer dicts).
            targets: per image "labels" (T,) thing classes in [0, thing classes), "boxes" T x 4,
                "masks" T x H x W (things); "stuff_labels" (U,) stuff indices, "stuff_masks"
                U x H x W.
        Returns:
            the unweighted losses (see the class docstring), float32.
        """
        location, mask_outputs = outputs["location"], outputs["masks"]
        device = location["pred_logits"][-1].device
        num_things = _average_over_processes(sum(len(t["labels"]) for t in targets), device)
        num_stuff = _average_over_processes(sum(len(t["stuff_labels"]) for t in targets), device)
        losses: Dict[str, Tensor] = {}
        with torch.autocast(device_type=device.type, enabled=False):
            for i, (logits, boxes) in enumerate(zip(location["pred_logits"], location["pred_boxes"])):
                logits, boxes = logits.float(), boxes.float()
                indices = self.box_matcher(logits, boxes, targets)
                losses.update(self._location_losses(f"loc_{{}}_{i}", logits, boxes, targets, indices, num_things))
            if "encoder" in location:
                logits = location["encoder"]["pred_logits"].float()
                boxes = location["encoder"]["pred_boxes"].float()
                indices = self.box_matcher(logits, boxes, targets)
                losses.update(self._location_losses("enc_{}", logits, boxes, targets, indices, num_things))
            if "denoising" in location:
                losses.update(self._denoising_losses(location["denoising"], mask_outputs.get("denoising_things", ()),
                                                     targets, num_things))
            things = mask_outputs["things"]
            indices = self.mask_matcher(location["pred_logits"][-1].float(), location["pred_boxes"][-1].float(),
                                        targets, things[-1]["pred_masks"].float())
            for i, layer in enumerate(things):
                losses.update(self._thing_mask_losses(i, layer, targets, indices, num_things))
            for i, layer in enumerate(mask_outputs["stuff"]):
                losses.update(self._stuff_losses(i, layer, targets, num_stuff))
        return losses

    def _location_losses(self, name: str, logits, boxes, targets, indices, num, ignore=None):
        """Class, L1 and GIoU losses, keys ``"loss_" + name.format(kind)``; queries where
        ``ignore`` (B x Q bool) is True get no class loss."""
        batch_idx, query_idx = _gather(indices)
        src_boxes = boxes[batch_idx, query_idx]
        tgt_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).float()
        src_xyxy, tgt_xyxy = box_convert(src_boxes, "cxcywh", "xyxy"), box_convert(tgt_boxes, "cxcywh", "xyxy")
        giou = torch.diag(generalized_box_iou(src_xyxy, tgt_xyxy))
        iou = torch.diag(box_iou(src_xyxy, tgt_xyxy)) if self.iou_aware else None
        return {
            "loss_" + name.format("class"): self.thing_class_loss(logits, indices, targets, iou, num, ignore),
            "loss_" + name.format("l1"): F.l1_loss(src_boxes, tgt_boxes, reduction="sum") / num,
            "loss_" + name.format("giou"): (1 - giou).sum() / num,
        }

    def _denoising_losses(self, denoising, mask_layers, targets, num):
        """Losses of the denoising queries, each paired with its own thing (module docstring)."""
        dn = denoising["batch"]
        num = num * dn.groups
        batch_idx, query_idx = dn.valid.nonzero(as_tuple=True)  # per image: group by group, thing by thing
        # as a matching: image b's valid queries with the indices of their things
        indices = []
        for b, target in enumerate(targets):
            queries = query_idx[batch_idx == b]
            indices.append((queries, torch.arange(len(target["labels"]), device=queries.device).repeat(dn.groups)))
        losses = {}
        for i, (logits, boxes) in enumerate(zip(denoising["pred_logits"], denoising["pred_boxes"])):
            losses.update(self._location_losses(f"dn_{{}}_{i}", logits.float(), boxes.float(), targets, indices,
                                                num, ignore=~dn.valid))
        for i, layer in enumerate(mask_layers):
            layer_losses = self._thing_mask_losses(i, layer, targets, indices, num, ignore=~dn.valid)
            losses.update({k.replace("loss_thing_", "loss_dn_thing_"): v for k, v in layer_losses.items()})
        return losses

    def _thing_mask_losses(self, i, layer, targets, indices, num, ignore=None):
        logits = layer["pred_logits"].float()
        batch_idx, query_idx = _gather(indices)
        tgt_masks = matched_target_masks(targets, indices, logits.device)
        iou = None
        if self.iou_aware and batch_idx.numel():
            src, tgt = _paired_masks(layer["pred_masks"].detach(), batch_idx, query_idx, tgt_masks)
            binary = (src > 0).float()
            iou = (binary * tgt).sum(1) / (binary + tgt).clamp(max=1).sum(1).clamp(min=1)
        losses = {f"loss_thing_class_{i}": self.thing_class_loss(logits, indices, targets, iou, num, ignore)}
        losses.update(self._mask_losses("thing", i, layer["pred_masks"], batch_idx, query_idx, tgt_masks, num))
        return losses

    def _stuff_losses(self, i, layer, targets, num):
        logits = layer["pred_logits"].float()[..., 0]  # B x Ns
        present = torch.zeros_like(logits)
        for b, t in enumerate(targets):
            present[b, t["stuff_labels"]] = 1.0
        batch_idx = torch.cat([torch.full_like(t["stuff_labels"], b) for b, t in enumerate(targets)])
        query_idx = torch.cat([t["stuff_labels"] for t in targets])
        # stuff query k is paired with the image's mask of stuff class k
        stuff_pairs = [(t["stuff_labels"], torch.arange(len(t["stuff_labels"]))) for t in targets]
        tgt_masks = matched_target_masks([{"masks": t["stuff_masks"]} for t in targets], stuff_pairs, logits.device)
        losses = {f"loss_stuff_class_{i}": sigmoid_focal_loss(logits, present, alpha=self.alpha, gamma=self.gamma,
                                                              reduction="sum") / num}
        losses.update(self._mask_losses("stuff", i, layer["pred_masks"], batch_idx, query_idx, tgt_masks, num))
        return losses

    def _mask_losses(self, kind: str, i: int, pred_masks: Tensor, batch_idx: Tensor, query_idx: Tensor,
                     tgt_masks: Tensor, num: float) -> Dict[str, Tensor]:
        """``loss_{kind}_dice_{i}`` (and ``loss_{kind}_mask_{i}``, the per-pixel focal loss, when it
        is on) of the pairs ``pred_masks[batch_idx, query_idx]`` / ``tgt_masks`` (N x H x W, as
        :func:`matched_target_masks` gives them)."""
        if batch_idx.numel() == 0:  # zeros that keep the graph
            zero = pred_masks.float().sum() * 0.0
            losses = {f"loss_{kind}_dice_{i}": zero}
            if self.with_mask_focal:
                losses[f"loss_{kind}_mask_{i}"] = zero
            return losses
        # the predictions upsampled to the targets' size, tile by tile inside
        # tiled_upsampled_mask_losses (the meta-architecture's optimised training)
        src = pred_masks[batch_idx, query_idx].float()
        loss_types = [MASK_LOSSES["dice"]] + ([MASK_LOSSES["focal"]] if self.with_mask_focal else [])
        values = upsampled_mask_losses(src, tgt_masks, loss_types, num)
        losses = {f"loss_{kind}_dice_{i}": values[0]}
        if self.with_mask_focal:
            losses[f"loss_{kind}_mask_{i}"] = values[1]
        return losses


def _matched_classes(logits: Tensor, targets: Sequence[Dict[str, Tensor]],
                     indices: List[Tuple[Tensor, Tensor]]) -> Tensor:
    """B x Q int64 class targets: the matched target's label, C (no class) for unmatched queries."""
    batch_idx, query_idx = _gather(indices)
    target_classes = torch.full(logits.shape[:2], logits.shape[-1], dtype=torch.int64, device=logits.device)
    target_classes[batch_idx, query_idx] = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
    return target_classes


def _paired_masks(pred_masks: Tensor, batch_idx: Tensor, query_idx: Tensor, tgt_masks: Tensor
                  ) -> Tuple[Tensor, Tensor]:
    """The predicted masks ``pred_masks[batch_idx, query_idx]`` and the target masks of the same
    pairs (N x H x W float32, zero-padded to the largest size of the batch, as
    :func:`matched_target_masks` gives them) as float32 N x P rows at one size: the predictions
    (B x Q x h x w logits) upsampled bilinearly to H x W."""
    src = pred_masks[batch_idx, query_idx].float()
    if src.shape[-2:] != tgt_masks.shape[-2:]:
        src = F.interpolate(src[None], size=tgt_masks.shape[-2:], mode="bilinear", align_corners=False)[0]
    return src.flatten(1), tgt_masks.flatten(1)
