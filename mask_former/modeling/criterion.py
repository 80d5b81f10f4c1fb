"""MaskFormer's set criterion: classification and mask losses of Hungarian-matched predictions."""
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.utils import comm
from torch import Tensor, nn

from .mask_losses import get_mask_loss
from .matcher import check_outputs, check_targets

__all__ = ["SetCriterion"]


class SetCriterion(nn.Module):
    """Losses of MaskFormer's (class, mask) predictions against the targets.

    Per layer (the final output and each entry of ``outputs["aux_outputs"]``):
    1. the matcher assigns queries to targets;
    2. ``loss_ce``: cross-entropy over K+1 classes, unmatched queries supervised with the
       "no object" class K, whose weight is ``eos_coef``;
    3. the mask losses of the matched pairs, the predicted masks upsampled (bilinear) to the
       target size: "focal" -> ``loss_mask``, "bce" -> ``loss_bce``, "brier" -> ``loss_brier``,
       "dice" -> ``loss_dice``, each normalized by the number of target masks in the batch.

    Losses are returned unweighted; the meta-architecture applies the weights.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: nn.Module,
        eos_coef: float,
        mask_losses: Sequence[str] = ("focal", "dice"),
    ):
        """
        Args:
            num_classes: K, the number of classes without "no object".
            matcher: module mapping (outputs, targets) to per-image (query indices, target
                indices), e.g. :class:`HungarianMatcher`.
            eos_coef: cross-entropy weight of the "no object" class.
            mask_losses: names of the mask losses, one or more of "focal", "bce", "brier", "dice".
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
                f"'focal', 'bce', 'brier', 'dice', got {mask_losses!r}"
            )
        if len(set(mask_losses)) != len(mask_losses):
            raise ValueError(f"SetCriterion: mask_losses has duplicate names: {list(mask_losses)}")
        self.mask_losses = {
            name: get_mask_loss(name, where="SetCriterion mask_losses") for name in mask_losses
        }

        self.num_classes = num_classes
        self.matcher = matcher
        self.eos_coef = float(eos_coef)
        # the published checkpoints hold this buffer as "criterion.empty_weight"
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = self.eos_coef
        self.register_buffer("empty_weight", empty_weight)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, eos_coef={self.eos_coef}, "
            f"mask_losses={list(self.mask_losses)}"
        )

    def forward(self, outputs: Dict, targets: Sequence[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        """
        Args:
            outputs: ``pred_logits`` B x Q x (K+1), ``pred_masks`` B x Q x h x w (mask logits),
                and optionally ``aux_outputs``: a list of dicts with the same two keys, one per
                intermediate decoder layer.
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
            if layer_outputs["pred_logits"].shape[-1] != self.num_classes + 1:
                raise ValueError(
                    f"{where}: pred_logits has {layer_outputs['pred_logits'].shape[-1]} class "
                    f"scores per query, expected num_classes + 1 = {self.num_classes + 1}"
                )
        pred_logits = outputs["pred_logits"]
        check_targets(targets, pred_logits.shape[0], self.num_classes, "SetCriterion")
        num_masks = self._num_masks(targets, pred_logits.device)

        losses = {}
        # in float32 even under autocast, so that mixed precision training is safe
        with torch.autocast(device_type=pred_logits.device.type, enabled=False):
            for suffix, layer_outputs in layers:
                layer_outputs = {k: layer_outputs[k] for k in ("pred_logits", "pred_masks")}
                indices = self.matcher(layer_outputs, targets)
                if len(indices) != len(targets):
                    raise ValueError(
                        f"SetCriterion: the matcher returned {len(indices)} index pairs for "
                        f"{len(targets)} images; expected one (query, target) pair per image"
                    )
                loss_ce = self.loss_labels(layer_outputs["pred_logits"], targets, indices)
                losses["loss_ce" + suffix] = loss_ce
                mask_losses = self.loss_masks(
                    layer_outputs["pred_masks"], targets, indices, num_masks
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
    ) -> Dict[str, Tensor]:
        """Mask losses of the matched pairs, predictions upsampled to the (padded) target size.

        Args:
            pred_masks: B x Q x h x w mask logits.
            num_masks: normalizer (target masks in the batch, averaged over processes, >= 1).

        Returns:
            One scalar per configured mask loss, keyed by its loss key (e.g. ``loss_mask``).
        """
        batch_idx, query_idx = self._matched_queries(indices)
        if batch_idx.numel() == 0:
            # keep pred_masks in the graph so that every parameter gets a (zero) gradient
            return {
                kind.loss_key: pred_masks.float().sum() * 0.0
                for kind in self.mask_losses.values()
            }

        device = pred_masks.device
        height = max(target["masks"].shape[-2] for target in targets)
        width = max(target["masks"].shape[-1] for target in targets)
        # targets of smaller images are zero-padded at the bottom / right, like the images
        tgt_masks = []
        for target, (_, tgt_idx) in zip(targets, indices):
            masks = target["masks"][tgt_idx.to(target["masks"].device)]
            masks = masks.to(device=device, dtype=torch.float32)
            padding = (0, width - masks.shape[-1], 0, height - masks.shape[-2])
            tgt_masks.append(F.pad(masks, padding))
        tgt_flat = torch.cat(tgt_masks).flatten(1)

        src_masks = pred_masks[batch_idx.to(device), query_idx.to(device)].float()
        src_masks = F.interpolate(
            src_masks[:, None], size=(height, width), mode="bilinear", align_corners=False
        )
        src_flat = src_masks.flatten(1)
        return {
            kind.loss_key: kind.loss(src_flat, tgt_flat, num_masks)
            for kind in self.mask_losses.values()
        }

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
