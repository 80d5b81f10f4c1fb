"""Hungarian matching between MaskFormer's predicted (class, mask) pairs and the targets."""
import functools
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from ..layers import BilinearPoints, interleaved_rows, raster_order
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


def _pixel_range(pixels: Tensor, start: int, stop: int) -> Tensor:
    """Pixels ``start:stop`` of B x Q x P mask logits, as float32."""
    return pixels[..., start:stop].float()


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
    count; given a list of decoder layers' outputs, those of all layers too (the criterion's deep
    supervision: one call instead of one per layer, whose fixed costs dominate with few points).
    Then each image's assignment is solved on its own (query x valid target) block, by
    ``scipy.optimize.linear_sum_assignment`` on the CPU (``solver="scipy"``) or by
    :func:`linear_sum_assignment_torch`, exact too, for the whole batch in one call on the
    costs' device (``solver="torch"``; no copy of the costs to the CPU, which serialises GPU
    training). Both give optimal assignments; they may differ only between assignments of equal
    total cost. Each image gets min(Q, T) pairs. A weight of 0 removes its term (it is neither
    computed nor checked).
    """

    # SetCriterion passes the outputs of all decoder layers to one call (see forward)
    matches_layers_together = True

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
            chunk_points: the mask costs are summed over this many pixels (points) at a time
                (of L layers matched together, over chunk_points / L pixels of each); 0 takes all
                at once.
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
        # the mask cost reuses the dice cost's sigmoid of the predictions
        self._mask_cost_takes_prob = mask_cost.batched and mask_cost.cost_takes_prob

    def extra_repr(self) -> str:
        return (
            f"cost_class={self.cost_class}, cost_mask={self.cost_mask}, "
            f"cost_dice={self.cost_dice}, mask_cost_type={self.mask_cost_type!r}, "
            f"num_points={self.num_points}, solver={self.solver!r}, chunk_points={self.chunk_points}"
        )

    @torch.no_grad()
    def forward(
        self,
        outputs: Union[Dict[str, Tensor], Sequence[Dict[str, Tensor]]],
        targets: Sequence[Dict[str, Tensor]],
    ) -> Union[List[Tuple[Tensor, Tensor]], List[List[Tuple[Tensor, Tensor]]]]:
        """
        Args:
            outputs: ``pred_logits`` B x Q x (K+1) (last = no object) and ``pred_masks``
                B x Q x h x w (mask logits). Other keys are ignored. Or a list of such dicts,
                one per decoder layer (the same B, Q and h x w), matched to the same targets in
                one batched computation (:attr:`matches_layers_together`): each layer's
                assignment is the one a call with its dict alone gives; with points, each layer
                draws its own, the points that calls layer by layer draw on a CPU.
            targets: one dict per image: ``labels`` (T,) int64 in [0, K), ``masks`` T x H x W
                (bool or float in {0, 1}).

        Returns:
            Per image, ``(query_indices, target_indices)``: two int64 tensors of length min(Q, T),
            on the CPU ("scipy") or the device of the predictions ("torch"); query_indices is
            sorted. For a list of layers, a list of those, one per layer.

        Raises:
            NonFiniteCostError: when a cost term has a NaN or inf (naming the image and the term).
            ValueError, KeyError: on malformed inputs.
        """
        layers = [outputs] if isinstance(outputs, dict) else list(outputs)
        if self.check_inputs:
            self._check_inputs(layers, targets)
        num_targets = [int(target["labels"].shape[0]) for target in targets]
        cost = self._layers_cost(layers, targets)
        indices = self._solve(cost.flatten(0, 1), num_targets * len(layers))
        per_layer = [indices[i * len(targets) : (i + 1) * len(targets)] for i in range(len(layers))]
        return per_layer[0] if isinstance(outputs, dict) else per_layer

    @staticmethod
    def _check_inputs(layers: List[Dict[str, Tensor]], targets: Sequence[Dict[str, Tensor]]) -> None:
        if not layers:
            raise ValueError("HungarianMatcher: got an empty list of decoder layers' outputs")
        for i, layer in enumerate(layers):
            where = "HungarianMatcher" + (f" (layer {i})" if len(layers) > 1 else "")
            if not isinstance(layer, dict):
                raise TypeError(f"{where}: expected a dict of outputs (or a list of them), got {type(layer).__name__}")
            check_outputs(layer, where)
            first, this = layers[0]["pred_masks"].shape, layer["pred_masks"].shape
            if this != first or layer["pred_logits"].shape != layers[0]["pred_logits"].shape:
                raise ValueError(
                    f"{where}: the layers matched together must have the shapes of layer 0, got "
                    f"pred_logits {tuple(layer['pred_logits'].shape)} and pred_masks {tuple(this)} "
                    f"against {tuple(layers[0]['pred_logits'].shape)} and {tuple(first)}"
                )
        num_images, num_classes = layers[0]["pred_logits"].shape[0], layers[0]["pred_logits"].shape[-1] - 1
        check_targets(targets, num_images, num_classes, "HungarianMatcher")

    @torch.no_grad()
    def batched_cost(
        self,
        outputs: Union[Dict[str, Tensor], Sequence[Dict[str, Tensor]]],
        targets: Sequence[Dict[str, Tensor]],
    ) -> Tensor:
        """The matching costs of all images (of all layers) in one batched computation, in float32
        (also under autocast), on the device of ``pred_logits``.

        Args:
            outputs, targets: as in :meth:`forward` (not checked here).

        Returns:
            B x Q x T_max float32 costs, T_max the largest number of targets of an image (L x B x
            Q x T_max for a list of L layers). Only ``cost[..., b, :, :T_b]`` is meaningful; the
            columns of padding targets are not.

        Raises:
            NonFiniteCostError: naming the first image (and its first term) with a NaN or inf cost.
        """
        if isinstance(outputs, dict):
            return self._layers_cost([outputs], targets)[0]
        return self._layers_cost(list(outputs), targets)

    def _layers_cost(self, layers: List[Dict[str, Tensor]], targets: Sequence[Dict[str, Tensor]]) -> Tensor:
        """L x B x Q x T_max costs of the L layers' outputs (see :meth:`batched_cost`)."""
        pred_logits = layers[0]["pred_logits"]
        device = pred_logits.device
        num_layers, (num_images, num_queries) = len(layers), pred_logits.shape[:2]
        num_targets = [int(target["labels"].shape[0]) for target in targets]
        max_targets = max(num_targets, default=0)
        cost = torch.zeros(num_layers, num_images, num_queries, max_targets, dtype=torch.float32, device=device)
        if max_targets == 0 or num_queries == 0:
            return cost

        terms = []  # (name, weight, L x B x Q x T_max cost), added in this order
        # in float32 even under autocast, so that half-precision training matches the same way
        with torch.autocast(device_type=device.type, enabled=False):
            if self.cost_class > 0:
                labels = torch.zeros(num_images, max_targets, dtype=torch.int64, device=device)
                for b, target in enumerate(targets):
                    labels[b, : num_targets[b]] = target["labels"].to(device)
                logits = torch.stack([layer["pred_logits"] for layer in layers])  # L x B x Q x (K+1)
                prob = logits.float().softmax(-1)
                # -p[target class] stands in for the negative log-likelihood (a constant is
                # irrelevant)
                class_prob = prob.gather(3, labels[None, :, None, :].expand(num_layers, -1, num_queries, -1))
                terms.append(("class", self.cost_class, -class_prob))
            if self.cost_mask > 0 or self.cost_dice > 0:
                mask_cost, dice = self._mask_costs([layer["pred_masks"] for layer in layers], targets, max_targets)
                if self.cost_mask > 0:
                    terms.append(("mask", self.cost_mask, mask_cost.view(cost.shape)))
                if self.cost_dice > 0:
                    terms.append(("dice", self.cost_dice, dice.view(cost.shape)))
            for _, weight, term in terms:
                cost += weight * term
        self._check_finite(cost, terms, num_targets)
        return cost

    def _mask_costs(
        self, pred_masks: List[Tensor], targets: Sequence[Dict[str, Tensor]], max_targets: int
    ) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """The pointwise mask cost and the dice cost (None where its weight is 0), both
        (L * B) x Q x T_max, summed over the pixels (points) in chunks: ``chunk_points / L``
        pixels of all L layers at a time, as many values as ``chunk_points`` of one layer.

        Args:
            pred_masks: one B x Q x h x w tensor of mask logits per layer, L in all.
        """
        num_layers = len(pred_masks)
        num_images, _, height, width = pred_masks[0].shape
        if self.num_points > 0:
            # (x, y) in [0, 1]^2, one set per layer and image, shared by its queries and targets
            # (drawn at once: on a CPU the numbers that one draw per layer gives)
            coords = torch.rand(num_layers * num_images, self.num_points, 2, device=pred_masks[0].device)
            # read in the order of the logits' pixels, not as drawn: the sums over the points are
            # the same to float rounding
            coords = raster_order(coords, height, width)
            all_points = BilinearPoints(coords, height, width)
            layer_points = [
                all_points.select_images(layer * num_images, (layer + 1) * num_images) for layer in range(num_layers)
            ]
            tables = [points.pixel_table(masks) for points, masks in zip(layer_points, pred_masks)]
            # the training path's logits of all layers lie side by side at each pixel: all layers'
            # points in one read, laid out as read_predictions' concatenation would lay them out
            # (no call per layer, no concatenation)
            interleaved = interleaved_rows(tables) if num_layers > 1 else None
            if interleaved is not None:
                all_rows, slots = interleaved
                readers = [functools.partial(all_points.interleave(slots).sample_table, all_rows)]
            else:
                readers = [functools.partial(p.sample_table, table) for p, table in zip(layer_points, tables)]
            target_values = self._target_values(targets, max_targets, pred_masks[0], coords)
        else:
            readers = [functools.partial(_pixel_range, masks.flatten(2)) for masks in pred_masks]
            # the same for every layer
            target_values = self._target_values(targets, max_targets, pred_masks[0], None)

        def read_predictions(start: int, stop: int) -> Tensor:
            """(L * B) x Q x (stop - start) float32 predictions of pixels (points) start:stop, layer-major."""
            if len(readers) == 1:
                return readers[0](start, stop)
            # concatenated in the layout of the reads (point samples: B x n x Q memory)
            return torch.cat([read(start, stop).transpose(1, 2) for read in readers]).transpose(1, 2)

        num_pixels = target_values.shape[-1]
        chunk = max(self.chunk_points // num_layers, 1) if self.chunk_points else max(num_pixels, 1)
        mask_cost = dice_products = prob_sums = None
        # one empty chunk when there are no pixels: the costs of no pixels, as before chunking
        for start in range(0, max(num_pixels, 1), chunk):
            stop = min(start + chunk, num_pixels)
            pred, target_chunk = read_predictions(start, stop), target_values[..., start:stop]
            if target_chunk.shape[0] != pred.shape[0]:  # every pixel: the targets of each layer
                target_chunk = target_chunk.repeat(num_layers, 1, 1)
            prob = pred.sigmoid() if self.cost_dice > 0 else None
            if self.cost_mask > 0:
                # the chunks' pixel means, weighted by their share of the pixels
                if prob is not None and self._mask_cost_takes_prob:
                    cost = self._mask_cost(pred, target_chunk, prob=prob)
                else:
                    cost = self._mask_cost(pred, target_chunk)
                if stop - start != num_pixels:
                    cost = cost.mul_((stop - start) / num_pixels)
                mask_cost = cost if mask_cost is None else mask_cost.add_(cost)
            if self.cost_dice > 0:
                products, sums = target_products(prob, target_chunk), prob.sum(-1)
                dice_products = products if dice_products is None else dice_products.add_(products)
                prob_sums = sums if prob_sums is None else prob_sums.add_(sums)
        dice = None
        if self.cost_dice > 0:
            target_sums = target_values.sum(-1)
            if target_sums.shape[0] != prob_sums.shape[0]:
                target_sums = target_sums.repeat(num_layers, 1)
            dice = dice_cost_from_sums(dice_products, prob_sums, target_sums)
        return mask_cost, dice

    @staticmethod
    def _target_values(
        targets: Sequence[Dict[str, Tensor]],
        max_targets: int,
        pred_masks: Tensor,
        coords: Optional[Tensor],
    ) -> Tensor:
        """Float32 target values, zero rows for the padding targets: B x T_max x (h * w), the
        targets resized (nearest) to the h x w of ``pred_masks``, when ``coords`` is None;
        otherwise (L * B) x T_max x P, the targets sampled bilinearly at the (L * B) x P x 2 points
        ``coords`` of L layers (by :class:`BilinearPoints`: the values of detectron2's
        ``point_sample`` with :data:`POINT_SAMPLE_KWARGS`; entry ``l * B + b`` reads image b)."""
        device = pred_masks.device
        num_images = len(targets)
        if coords is None:
            num_rows, num_pixels = num_images, pred_masks.shape[-2] * pred_masks.shape[-1]
        else:
            num_rows, num_pixels = coords.shape[:2]
        tgt = torch.zeros(num_rows, max_targets, num_pixels, dtype=torch.float32, device=device)
        for b, target in enumerate(targets):
            masks = target["masks"].to(device=device)
            if masks.shape[0] == 0:
                continue
            if coords is not None:
                # the points of image b in every layer, read in one call, from a pixel-major float32
                # copy of the masks (the T values of a pixel side by side, where grid_sample reads
                # T planes: 0.3x its time for 8 masks of 512 x 512 at 6 x 12,544 points)
                points = BilinearPoints(coords[b::num_images].reshape(1, -1, 2), *masks.shape[-2:])
                values = points.sample(masks[None])[0]  # T x (L * P)
                tgt[b::num_images, : masks.shape[0]] = values.view(masks.shape[0], -1, num_pixels).transpose(0, 1)
            else:
                values = F.interpolate(masks[:, None].float(), size=pred_masks.shape[-2:], mode="nearest").flatten(1)
                tgt[b, : masks.shape[0]] = values
        return tgt

    @staticmethod
    def _check_finite(cost: Tensor, terms: List[Tuple[str, float, Tensor]], num_targets: List[int]) -> None:
        """Raise :class:`NonFiniteCostError` when a valid entry of ``cost`` (L x B x Q x T_max) is
        NaN or inf, naming the first such image (and layer, when L > 1) and its first non-finite
        term (one device sync when all is well)."""
        valid = torch.arange(cost.shape[-1], device=cost.device)[None, :] < torch.tensor(
            num_targets, device=cost.device
        )[:, None]
        if torch.isfinite(cost).all(dim=2).logical_or(~valid).all():
            return
        for layer in range(cost.shape[0]):
            in_layer = f" of decoder layer {layer} (of {cost.shape[0]} matched together)" if cost.shape[0] > 1 else ""
            for b, count in enumerate(num_targets):
                if torch.isfinite(cost[layer, b, :, :count]).all():
                    continue
                for name, _, term in terms:
                    if not torch.isfinite(term[layer, b, :, :count]).all():
                        raise NonFiniteCostError(
                            f"HungarianMatcher: the {name!r} cost of image {b} in the batch{in_layer} has "
                            "NaN or inf values (non-finite predictions?); cannot solve the assignment"
                        )
                raise NonFiniteCostError(
                    f"HungarianMatcher: the weighted sum of the costs of image {b} in the batch{in_layer} "
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
