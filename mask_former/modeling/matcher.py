"""Hungarian matching between MaskFormer's predicted (class, mask) pairs and the targets."""
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from .mask_losses import dice_cost, get_mask_loss

__all__ = ["HungarianMatcher", "check_outputs", "check_targets"]




class NonFiniteCostError(ValueError):
    """A matching cost is NaN or infinite: the predictions (or targets) are not finite."""

def check_outputs(outputs: Dict[str, Tensor], caller: str) -> None:
    """Raise a clear error unless ``outputs`` has ``pred_logits`` (B x Q x K+1) and
    ``pred_masks`` (B x Q x h x w) with matching B and Q."""
    for key in ("pred_logits", "pred_masks"):
        if key not in outputs:
            raise KeyError(f"{caller}: outputs has no {key!r}; keys: {sorted(outputs)}")
    logits, masks = outputs["pred_logits"], outputs["pred_masks"]
    if logits.dim() != 3 or masks.dim() != 4 or logits.shape[:2] != masks.shape[:2]:
        raise ValueError(
            f"{caller}: expected pred_logits B x Q x (K+1) and pred_masks B x Q x h x w, got "
            f"shapes {tuple(logits.shape)} and {tuple(masks.shape)}"
        )


def check_targets(
    targets: Sequence[Dict[str, Tensor]], num_images: int, num_classes: int, caller: str
) -> None:
    """Raise a clear error unless ``targets`` has one dict per image with ``labels`` (T,) in
    [0, num_classes) and ``masks`` (T x H x W)."""
    if len(targets) != num_images:
        raise ValueError(
            f"{caller}: got {len(targets)} target dicts for a batch of {num_images} images; "
            "expected one per image"
        )
    for i, target in enumerate(targets):
        for key in ("labels", "masks"):
            if key not in target:
                raise KeyError(f"{caller}: targets[{i}] has no {key!r}; keys: {sorted(target)}")
        labels, masks = target["labels"], target["masks"]
        if labels.dim() != 1 or labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(
                f"{caller}: targets[{i}]['labels'] must be an integer tensor of shape (T,), got "
                f"dtype {labels.dtype} and shape {tuple(labels.shape)}"
            )
        if masks.dim() != 3 or masks.shape[0] != labels.shape[0]:
            raise ValueError(
                f"{caller}: targets[{i}]['masks'] must be T x H x W with T = {labels.shape[0]} "
                f"(the number of labels), got shape {tuple(masks.shape)}"
            )
        if labels.numel() > 0:
            low, high = int(labels.min()), int(labels.max())
            if low < 0 or high >= num_classes:
                raise ValueError(
                    f"{caller}: targets[{i}]['labels'] must lie in [0, {num_classes}) "
                    f"(the {num_classes} classes), got values in [{low}, {high}]"
                )


class HungarianMatcher(nn.Module):
    """One-to-one assignment of predictions to targets minimizing a weighted matching cost.

    For each image, the cost of assigning query q to target t is::

        cost_class * (-softmax(pred_logits)[q, label_t])
        + cost_mask * pointwise_mask_cost(pred_mask_q, mask_t)   # focal, bce or brier
        + cost_dice * dice_cost(pred_mask_q, mask_t)

    with the target masks resized (nearest) to the prediction size, and the assignment is solved
    with ``scipy.optimize.linear_sum_assignment``. Each image gets min(Q, T) pairs. A weight of 0
    removes its term (it is neither computed nor checked).
    """

    def __init__(
        self,
        cost_class: float = 1.0,
        cost_mask: float = 20.0,
        cost_dice: float = 1.0,
        mask_cost_type: str = "focal",
    ):
        """
        Args:
            cost_class: weight of the classification cost.
            cost_mask: weight of the pointwise mask cost.
            cost_dice: weight of the dice cost.
            mask_cost_type: the pointwise mask cost, one of "focal", "bce", "brier".
        """
        super().__init__()
        weights = {"cost_class": cost_class, "cost_mask": cost_mask, "cost_dice": cost_dice}
        for name, value in weights.items():
            if not isinstance(value, (int, float)) or not (0 <= value < float("inf")):
                raise ValueError(
                    f"HungarianMatcher: {name} must be a finite number >= 0, got {value!r}"
                )
        if all(value == 0 for value in weights.values()):
            raise ValueError(
                "HungarianMatcher: cost_class, cost_mask and cost_dice are all 0; "
                "at least one must be > 0"
            )
        self.cost_class = float(cost_class)
        self.cost_mask = float(cost_mask)
        self.cost_dice = float(cost_dice)
        self.mask_cost_type = mask_cost_type
        self._mask_cost = get_mask_loss(
            mask_cost_type, pointwise_only=True, where="HungarianMatcher mask_cost_type"
        ).cost

    def extra_repr(self) -> str:
        return (
            f"cost_class={self.cost_class}, cost_mask={self.cost_mask}, "
            f"cost_dice={self.cost_dice}, mask_cost_type={self.mask_cost_type!r}"
        )

    @torch.no_grad()
    def forward(
        self, outputs: Dict[str, Tensor], targets: Sequence[Dict[str, Tensor]]
    ) -> List[Tuple[Tensor, Tensor]]:
        """
        Args:
            outputs: ``pred_logits`` B x Q x (K+1) (last = no object) and ``pred_masks``
                B x Q x h x w (mask logits). Other keys are ignored.
            targets: one dict per image: ``labels`` (T,) int64 in [0, K), ``masks`` T x H x W
                (bool or float in {0, 1}).

        Returns:
            Per image, ``(query_indices, target_indices)``: two int64 CPU tensors of length
            min(Q, T); query_indices is sorted.

        Raises:
            ValueError: when a cost term has a NaN or inf (naming the image and the term), or
                on malformed inputs.
        """
        check_outputs(outputs, "HungarianMatcher")
        pred_logits, pred_masks = outputs["pred_logits"], outputs["pred_masks"]
        num_classes = pred_logits.shape[-1] - 1
        check_targets(targets, pred_logits.shape[0], num_classes, "HungarianMatcher")

        # in float32 even under autocast, so that half-precision training matches the same way
        with torch.autocast(device_type=pred_logits.device.type, enabled=False):
            return [
                self._match_image(index, pred_logits[index], pred_masks[index], target)
                for index, target in enumerate(targets)
            ]

    def _match_image(
        self, index: int, pred_logits: Tensor, pred_masks: Tensor, target: Dict[str, Tensor]
    ) -> Tuple[Tensor, Tensor]:
        """Match one image: pred_logits Q x (K+1), pred_masks Q x h x w."""
        labels = target["labels"].to(pred_logits.device)
        num_queries, num_targets = pred_logits.shape[0], labels.shape[0]
        if num_targets == 0 or num_queries == 0:
            empty = torch.empty(0, dtype=torch.int64)
            return empty, empty.clone()

        device = pred_logits.device
        cost = torch.zeros(num_queries, num_targets, dtype=torch.float32, device=device)
        if self.cost_class > 0:
            prob = pred_logits.float().softmax(-1)
            # -p[target class] stands in for the negative log-likelihood (a constant is irrelevant)
            cost += self.cost_class * self._checked(-prob[:, labels], index, "class")
        if self.cost_mask > 0 or self.cost_dice > 0:
            pred_flat = pred_masks.float().flatten(1)
            tgt_masks = target["masks"].to(device=device, dtype=torch.float32)
            size = pred_masks.shape[-2:]
            tgt_flat = F.interpolate(tgt_masks[:, None], size=size, mode="nearest").flatten(1)
            if self.cost_mask > 0:
                mask_cost = self._mask_cost(pred_flat, tgt_flat)
                cost += self.cost_mask * self._checked(mask_cost, index, "mask")
            if self.cost_dice > 0:
                dice = dice_cost(pred_flat, tgt_flat)
                cost += self.cost_dice * self._checked(dice, index, "dice")

        query_indices, target_indices = linear_sum_assignment(cost.cpu().numpy())
        return (
            torch.as_tensor(query_indices, dtype=torch.int64),
            torch.as_tensor(target_indices, dtype=torch.int64),
        )

    @staticmethod
    def _checked(cost: Tensor, index: int, term: str) -> Tensor:
        if not torch.isfinite(cost).all():
            raise NonFiniteCostError(
                f"HungarianMatcher: the {term!r} cost of image {index} in the batch has NaN or inf "
                "values (non-finite predictions?); cannot solve the assignment"
            )
        return cost
