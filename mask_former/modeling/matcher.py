"""Hungarian matching between MaskFormer's predicted (class, mask) pairs and the targets."""
import functools
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.projects.point_rend.point_features import point_sample
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from ..layers import BilinearPoints
from .assignment import linear_sum_assignment_torch
from .mask_losses import dice_cost_from_sums, get_mask_loss, target_products

__all__ = [
    "HungarianMatcher",
    "NonFiniteCostError",
    "POINT_SAMPLE_KWARGS",
    "SOLVERS",
    "check_outputs",
    "check_targets",
]

# How point-sampled mask losses and costs read masks at points (detectron2's point_sample, i.e.
# F.grid_sample): bilinear, pixel centers at (i + 0.5) / size like F.interpolate(...,
# align_corners=False), and points within half a pixel of the border read the border pixels (as
# the full-resolution upsampling does) instead of fading to zero.
POINT_SAMPLE_KWARGS = {"align_corners": False, "padding_mode": "border"}

# The assignment solvers of HungarianMatcher (MODEL.MASK_FORMER.MATCHER_SOLVER)
SOLVERS = ("scipy", "torch")


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

    The mask costs are computed either on every pixel of the prediction, the target masks resized
    (nearest) to the prediction size (``num_points=0``), or on ``num_points`` points drawn uniformly
    at random per image and shared by its predictions and targets, both sampled bilinearly there
    (``num_points > 0``, as Mask2Former does). They are sums over the pixels (points), taken
    ``chunk_points`` at a time so that the intermediates of a chunk (B x Q x chunk_points values)
    stay in the cache instead of making a dozen passes over B x Q x P values in memory; the
    result is the same up to float rounding. The costs of all images of a batch are computed in
    one batched call, on the device of the predictions, with the targets padded to the largest
    count; then each image's assignment is solved on its own (query x valid target) block, by
    ``scipy.optimize.linear_sum_assignment`` on the CPU (``solver="scipy"``) or by
    :func:`linear_sum_assignment_torch`, exact too, for the whole batch in one call on the
    costs' device (``solver="torch"``; no copy of the costs to the CPU, which serialises GPU
    training). Both give optimal assignments; they may differ only between assignments of equal
    total cost. Each image gets min(Q, T) pairs. A weight of 0 removes its term (it is neither
    computed nor checked).
    """

    def __init__(
        self,
        cost_class: float = 1.0,
        cost_mask: float = 20.0,
        cost_dice: float = 1.0,
        mask_cost_type: str = "focal",
        check_inputs: bool = True,
        num_points: int = 0,
        solver: str = "scipy",
        chunk_points: int = 0,
    ):
        """
        Args:
            cost_class: weight of the classification cost.
            cost_mask: weight of the pointwise mask cost.
            cost_dice: weight of the dice cost.
            mask_cost_type: the pointwise mask cost, one of "focal", "bce", "brier".
            check_inputs: validate the shapes and labels of every call; a caller that has already
                checked them (the set criterion, once for all decoder layers) passes False.
            num_points: 0 to compute the mask costs on every pixel of the predictions; K > 0 to
                compute them on K uniformly random points per image (drawn from torch's global
                generator, so deterministic under ``torch.manual_seed``).
            solver: "scipy" or "torch", the assignment solver.
            chunk_points: the mask costs are summed over this many pixels (points) at a time;
                0 takes all at once.
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
        if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 0:
            raise ValueError(f"HungarianMatcher: num_points must be an int >= 0, got {num_points!r}")
        if isinstance(chunk_points, bool) or not isinstance(chunk_points, int) or chunk_points < 0:
            raise ValueError(f"HungarianMatcher: chunk_points must be an int >= 0, got {chunk_points!r}")
        if solver not in SOLVERS:
            raise ValueError(
                f"HungarianMatcher: solver must be one of {', '.join(map(repr, SOLVERS))}, got {solver!r}"
            )
        self.cost_class = float(cost_class)
        self.cost_mask = float(cost_mask)
        self.cost_dice = float(cost_dice)
        self.mask_cost_type = mask_cost_type
        self.check_inputs = check_inputs
        self.num_points = num_points
        self.solver = solver
        self.chunk_points = chunk_points
        mask_cost = get_mask_loss(mask_cost_type, pointwise_only=True, where="HungarianMatcher mask_cost_type")
        # the costs take one image (Q x P, T x P); vmap maps those that do not take a batch
        self._mask_cost = mask_cost.cost if mask_cost.batched else torch.vmap(mask_cost.cost)

    def extra_repr(self) -> str:
        return (
            f"cost_class={self.cost_class}, cost_mask={self.cost_mask}, "
            f"cost_dice={self.cost_dice}, mask_cost_type={self.mask_cost_type!r}, "
            f"num_points={self.num_points}, solver={self.solver!r}, chunk_points={self.chunk_points}"
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
            Per image, ``(query_indices, target_indices)``: two int64 tensors of length min(Q, T),
            on the CPU ("scipy") or the device of the predictions ("torch"); query_indices is
            sorted.

        Raises:
            NonFiniteCostError: when a cost term has a NaN or inf (naming the image and the term).
            ValueError, KeyError: on malformed inputs.
        """
        if self.check_inputs:
            check_outputs(outputs, "HungarianMatcher")
            num_images, num_classes = outputs["pred_logits"].shape[0], outputs["pred_logits"].shape[-1] - 1
            check_targets(targets, num_images, num_classes, "HungarianMatcher")
        cost = self.batched_cost(outputs, targets)
        return self._solve(cost, [int(target["labels"].shape[0]) for target in targets])

    @torch.no_grad()
    def batched_cost(
        self, outputs: Dict[str, Tensor], targets: Sequence[Dict[str, Tensor]]
    ) -> Tensor:
        """The matching costs of all images in one batched computation, in float32 (also under
        autocast), on the device of ``pred_logits``.

        Args:
            outputs, targets: as in :meth:`forward` (not checked here).

        Returns:
            B x Q x T_max float32 costs, T_max the largest number of targets of an image. Only
            ``cost[b, :, :T_b]`` is meaningful; the columns of padding targets are not.

        Raises:
            NonFiniteCostError: naming the first image (and its first term) with a NaN or inf cost.
        """
        pred_logits, pred_masks = outputs["pred_logits"], outputs["pred_masks"]
        device = pred_logits.device
        num_images, num_queries = pred_logits.shape[:2]
        num_targets = [int(target["labels"].shape[0]) for target in targets]
        max_targets = max(num_targets, default=0)
        cost = torch.zeros(num_images, num_queries, max_targets, dtype=torch.float32, device=device)
        if max_targets == 0 or num_queries == 0:
            return cost

        terms = []  # (name, weight, B x Q x T_max cost), added in this order
        # in float32 even under autocast, so that half-precision training matches the same way
        with torch.autocast(device_type=device.type, enabled=False):
            if self.cost_class > 0:
                labels = torch.zeros(num_images, max_targets, dtype=torch.int64, device=device)
                for b, target in enumerate(targets):
                    labels[b, : num_targets[b]] = target["labels"].to(device)
                prob = pred_logits.float().softmax(-1)
                # -p[target class] stands in for the negative log-likelihood (a constant is
                # irrelevant)
                class_prob = prob.gather(2, labels[:, None, :].expand(-1, num_queries, -1))
                terms.append(("class", self.cost_class, -class_prob))
            if self.cost_mask > 0 or self.cost_dice > 0:
                mask_cost, dice = self._mask_costs(pred_masks, targets, max_targets)
                if self.cost_mask > 0:
                    terms.append(("mask", self.cost_mask, mask_cost))
                if self.cost_dice > 0:
                    terms.append(("dice", self.cost_dice, dice))
            for _, weight, term in terms:
                cost += weight * term
        self._check_finite(cost, terms, num_targets)
        return cost

    def _mask_costs(
        self, pred_masks: Tensor, targets: Sequence[Dict[str, Tensor]], max_targets: int
    ) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """The pointwise mask cost and the dice cost (None where its weight is 0), both B x Q x
        T_max, summed over the pixels (points) ``chunk_points`` at a time.

        Args:
            pred_masks: B x Q x h x w mask logits.
        """
        num_images, _, height, width = pred_masks.shape
        if self.num_points > 0:
            # (x, y) in [0, 1]^2, one set per image, shared by its queries and targets
            coords = torch.rand(num_images, self.num_points, 2, device=pred_masks.device)
            points = BilinearPoints(coords, height, width)
            read_predictions = functools.partial(points.sample_table, points.pixel_table(pred_masks))
            target_values = self._target_values(targets, max_targets, pred_masks, coords)
        else:
            pixels = pred_masks.flatten(2)

            def read_predictions(start: int, stop: int) -> Tensor:
                return pixels[..., start:stop].float()

            target_values = self._target_values(targets, max_targets, pred_masks, None)
        num_pixels = target_values.shape[-1]
        chunk = self.chunk_points or max(num_pixels, 1)
        mask_cost = dice_products = prob_sums = None
        # one empty chunk when there are no pixels: the costs of no pixels, as before chunking
        for start in range(0, max(num_pixels, 1), chunk):
            stop = min(start + chunk, num_pixels)
            pred, target_chunk = read_predictions(start, stop), target_values[..., start:stop]
            if self.cost_mask > 0:
                # the chunks' pixel means, weighted by their share of the pixels
                cost = self._mask_cost(pred, target_chunk)
                if stop - start != num_pixels:
                    cost = cost.mul_((stop - start) / num_pixels)
                mask_cost = cost if mask_cost is None else mask_cost.add_(cost)
            if self.cost_dice > 0:
                prob = pred.sigmoid()
                products, sums = target_products(prob, target_chunk), prob.sum(-1)
                dice_products = products if dice_products is None else dice_products.add_(products)
                prob_sums = sums if prob_sums is None else prob_sums.add_(sums)
        dice = None
        if self.cost_dice > 0:
            dice = dice_cost_from_sums(dice_products, prob_sums, target_values.sum(-1))
        return mask_cost, dice

    @staticmethod
    def _target_values(
        targets: Sequence[Dict[str, Tensor]],
        max_targets: int,
        pred_masks: Tensor,
        coords: Optional[Tensor],
    ) -> Tensor:
        """B x T_max x P float32 target values, zero rows for the padding targets: the targets
        resized (nearest) to the h x w of ``pred_masks`` (P = h * w) when ``coords`` is None,
        otherwise sampled bilinearly at the B x P x 2 points ``coords`` (by ``point_sample``: the
        values :class:`BilinearPoints` gives)."""
        device = pred_masks.device
        num_pixels = coords.shape[1] if coords is not None else pred_masks.shape[-2] * pred_masks.shape[-1]
        tgt = torch.zeros(len(targets), max_targets, num_pixels, dtype=torch.float32, device=device)
        for b, target in enumerate(targets):
            masks = target["masks"].to(device=device, dtype=torch.float32)
            if masks.shape[0] == 0:
                continue
            if coords is not None:
                values = point_sample(masks[None], coords[b : b + 1], **POINT_SAMPLE_KWARGS)[0]
            else:
                values = F.interpolate(masks[:, None], size=pred_masks.shape[-2:], mode="nearest").flatten(1)
            tgt[b, : masks.shape[0]] = values
        return tgt

    @staticmethod
    def _check_finite(cost: Tensor, terms: List[Tuple[str, float, Tensor]], num_targets: List[int]) -> None:
        """Raise :class:`NonFiniteCostError` when a valid entry of ``cost`` is NaN or inf, naming the
        first such image and its first non-finite term (one device sync when all is well)."""
        valid = torch.arange(cost.shape[-1], device=cost.device)[None, :] < torch.tensor(
            num_targets, device=cost.device
        )[:, None]
        if torch.isfinite(cost).all(dim=1).logical_or(~valid).all():
            return
        for b, count in enumerate(num_targets):
            if torch.isfinite(cost[b, :, :count]).all():
                continue
            for name, _, term in terms:
                if not torch.isfinite(term[b, :, :count]).all():
                    raise NonFiniteCostError(
                        f"HungarianMatcher: the {name!r} cost of image {b} in the batch has NaN or "
                        "inf values (non-finite predictions?); cannot solve the assignment"
                    )
            raise NonFiniteCostError(
                f"HungarianMatcher: the weighted sum of the costs of image {b} in the batch "
                "overflows to inf; cannot solve the assignment"
            )

    def _solve(self, cost: Tensor, num_targets: List[int]) -> List[Tuple[Tensor, Tensor]]:
        """Per image, the optimal assignment on its Q x T_b block of ``cost`` (B x Q x T_max)."""
        if self.solver == "torch" and cost.shape[1] > 0 and cost.shape[2] > 0:
            return linear_sum_assignment_torch(cost, num_targets)
        cost = cost.cpu()  # one copy for the whole batch
        indices = []
        for b, count in enumerate(num_targets):
            if count == 0 or cost.shape[1] == 0:
                empty = torch.empty(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
                continue
            query_indices, target_indices = linear_sum_assignment(cost[b, :, :count].numpy())
            indices.append(
                (
                    torch.as_tensor(query_indices, dtype=torch.int64),
                    torch.as_tensor(target_indices, dtype=torch.int64),
                )
            )
        return indices
