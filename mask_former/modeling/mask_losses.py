"""Mask losses and matching costs shared by the Hungarian matcher and the set criterion.

Three families of functions, one per kind of mask loss:

- ``*_loss(inputs, targets, num_masks)``: the loss of N matched (prediction, target) pairs,
  ``inputs`` and ``targets`` both N x P (P = pixels per mask). Pointwise losses (focal, bce,
  brier) are averaged over the pixels of each mask; every loss is summed over the masks and
  divided by ``num_masks`` (the number of target masks in the batch, averaged over processes).
- ``*_cost(inputs, targets)``: the same quantity for every (query, target) pair, as a Q x T
  matrix, without the division by ``num_masks``. ``inputs`` is Q x P, ``targets`` is T x P. The
  matcher maps a cost over the images of a batch with ``torch.vmap``, so a cost must be a plain
  tensor function (no ``.item()``, no branching on values); a cost that also takes a batch
  (B x Q x P, B x T x P -> B x Q x T), as the built-in ones do, declares ``batched=True`` in its
  :class:`MaskLossType` and is called on the whole batch at once instead. A pointwise cost must
  be the mean over the P pixels of a per-pixel term: the matcher may compute it over chunks of
  the pixels and average the chunks' costs, weighted by their sizes.
- ``*_pixel_sums(inputs, targets)`` and ``*loss_from_sums(sums, num_pixels, num_masks)``: the
  loss as a function of per-mask sums over the pixels (N x S), which add up over any split of the
  pixels; the full-resolution losses are computed tile by tile from them
  (``upsampled_mask_losses.py``). Optional for a registered loss.

``inputs`` are mask logits (before the sigmoid) and ``targets`` are binary masks as float in
{0, 1}. The costs are computed with matrix products; the focal cost relies on the targets being
binary (the focal weighting is not linear in soft targets), the others are exact for any
target in [0, 1].

``MASK_LOSSES`` maps the names used by ``MODEL.MASK_FORMER.MASK_LOSSES`` ("focal", "bce",
"brier", "dice") to a :class:`MaskLossType`: these functions, the key of the loss in the
criterion's output and the config key of its weight. A new mask loss is one call of
:func:`register_mask_loss` (plus its weight key in the config).
"""
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "sigmoid_focal_loss",
    "sigmoid_focal_cost",
    "bce_loss",
    "bce_cost",
    "brier_loss",
    "brier_cost",
    "dice_loss",
    "dice_cost",
    "dice_cost_from_sums",
    "dice_pixel_sums",
    "dice_loss_from_sums",
    "sigmoid_focal_pixel_sums",
    "bce_pixel_sums",
    "brier_pixel_sums",
    "mean_loss_from_sums",
    "sigmoid_focal_pixel_sums_grad",
    "bce_pixel_sums_grad",
    "brier_pixel_sums_grad",
    "dice_pixel_sums_grad",
    "target_products",
    "MaskLossType",
    "MASK_LOSSES",
    "register_mask_loss",
    "get_mask_loss",
]

FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0


def target_products(values: Tensor, targets: Tensor) -> Tensor:
    """``values @ targets^T``: Q x T (or B x Q x T) sums over the P pixels of ``values`` (Q x P)
    times ``targets`` (T x P), computed as ``(targets @ values^T)^T``: the same sums. With the
    few targets as the rows of the product it was faster on a CPU for the matcher's point-sampled
    values (2 images x 100 queries x 12,544 points, points-major as ``BilinearPoints`` writes
    them, 8 targets: 0.33 against 0.54 ms); for contiguous values it is slower (0.61 against 0.43
    ms), but the matcher's time at full resolution did not change measurably (0.99x)."""
    return torch.matmul(targets, values.transpose(-1, -2)).transpose(-1, -2)


def sigmoid_focal_loss(
    inputs: Tensor,
    targets: Tensor,
    num_masks: float,
    alpha: float = FOCAL_ALPHA,
    gamma: float = FOCAL_GAMMA,
) -> Tensor:
    """Sigmoid focal loss (Lin et al., 2017) of matched pairs.

    Args:
        inputs: N x P mask logits.
        targets: N x P binary targets (float).
        num_masks: normalizer of the sum over masks.
        alpha: weight of the positive pixels (negatives get ``1 - alpha``); < 0 disables it.
        gamma: focusing exponent on ``1 - p_t``.

    Returns:
        Scalar: sum over masks of the per-mask pixel mean, divided by ``num_masks``.
    """
    return _sigmoid_focal_terms(inputs, targets, alpha, gamma).mean(1).sum() / num_masks


def _sigmoid_focal_terms(inputs: Tensor, targets: Tensor, alpha: float, gamma: float) -> Tensor:
    """The per-pixel focal loss, N x P."""
    prob = inputs.sigmoid()
    ce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def sigmoid_focal_pixel_sums(inputs: Tensor, targets: Tensor) -> Tensor:
    """N x 1: each mask's sum over its pixels of the focal loss (:func:`mean_loss_from_sums` of it
    is :func:`sigmoid_focal_loss`)."""
    return _sigmoid_focal_terms(inputs, targets, FOCAL_ALPHA, FOCAL_GAMMA).sum(1, keepdim=True)


def sigmoid_focal_pixel_sums_grad(inputs: Tensor, targets: Tensor, coefficients: Tensor) -> Tensor:
    """N x P: the gradient with respect to ``inputs`` of ``(coefficients * sigmoid_focal_pixel_sums(inputs,
    targets)).sum()`` (``coefficients`` N x 1), in closed form: with p = sigmoid(x),
    ce = BCE(x, y), m = 1 - p_t and a the alpha weight, d(a ce m^g)/dx = a ((p - y) m^g +
    g ce m^(g-1) dm/dx), dm/dx = p (1 - p) (1 - 2y)."""
    prob = inputs.sigmoid()
    ce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    one_minus_prob = 1 - prob
    m = prob * (1 - targets) + one_minus_prob * targets  # 1 - p_t
    dm = prob * one_minus_prob * (1 - 2 * targets)
    grad = m ** (FOCAL_GAMMA - 1) * ((prob - targets) * m + FOCAL_GAMMA * ce * dm)
    if FOCAL_ALPHA >= 0:
        grad = grad * (FOCAL_ALPHA * targets + (1 - FOCAL_ALPHA) * (1 - targets))
    return grad * coefficients[:, :1]


def mean_loss_from_sums(sums: Tensor, num_pixels: int, num_masks: float) -> Tensor:
    """A pointwise loss from each mask's sum over its ``num_pixels`` pixels (N x 1): the sum over the
    masks of the per-mask pixel mean, divided by ``num_masks``."""
    return (sums[:, 0] / num_pixels).sum() / num_masks


def sigmoid_focal_cost(
    inputs: Tensor,
    targets: Tensor,
    alpha: float = FOCAL_ALPHA,
    gamma: float = FOCAL_GAMMA,
    prob: Optional[Tensor] = None,
) -> Tensor:
    """Pixel-mean sigmoid focal loss of every (query, target) pair.

    With ``pos``/``neg`` the focal loss of a pixel as foreground/background, the cost is
    ``(pos @ t^T + neg @ (1 - t)^T) / P``; the passes over the Q x P values are the matcher's main
    work when masks are large, so they are few.

    Args:
        inputs: Q x P mask logits (or B x Q x P).
        targets: T x P binary targets (float in {0, 1}) (or B x T x P).
        prob: ``inputs.sigmoid()`` when the caller has it already (the matcher, for the dice
            cost too); it is not modified.

    Returns:
        Q x T cost matrix (or B x Q x T).
    """
    num_pixels = inputs.shape[-1]
    # Without autograd (the matcher), the intermediate Q x P tensors are updated in place (fewer
    # allocations of large tensors), and alpha scales the Q x T products, not the Q x P terms.
    in_place = not (torch.is_grad_enabled() and inputs.requires_grad)
    if prob is None:
        prob = inputs.sigmoid()
    # -log(1 - p) = softplus(x) without overflow, and -log(p) = softplus(-x) = softplus(x) - x: one
    # softplus for both (the subtraction's rounding, at most an ulp of x, is scaled by (1 - p)^gamma,
    # which is tiny where x is large)
    softplus = F.softplus(inputs)
    if gamma == 2:
        focal_neg = prob * softplus
        focal_neg = focal_neg.mul_(prob) if in_place else focal_neg * prob
        focal_pos = torch.rsub(prob, 1)
        focal_pos = focal_pos.square_() if in_place else focal_pos.square()
    else:
        focal_neg = prob.pow(gamma) * softplus
        focal_pos = torch.rsub(prob, 1).pow(gamma)
    if in_place:
        focal_pos.mul_(softplus.sub_(inputs))
    else:
        focal_pos = focal_pos * (softplus - inputs)
    # two products rather than (pos - neg) @ t^T + sum(neg): that form cancels large terms where
    # the logits are large, in float32 (the matcher's dtype)
    pos_cost, neg_cost = target_products(focal_pos, targets), target_products(focal_neg, 1 - targets)
    if alpha >= 0:
        pos_cost, neg_cost = pos_cost * alpha, neg_cost * (1 - alpha)
    return (pos_cost + neg_cost) / num_pixels


def bce_loss(inputs: Tensor, targets: Tensor, num_masks: float) -> Tensor:
    """Binary cross-entropy of matched pairs.

    Args:
        inputs: N x P mask logits.
        targets: N x P targets in [0, 1].
        num_masks: normalizer of the sum over masks.

    Returns:
        Scalar: sum over masks of the per-mask pixel mean, divided by ``num_masks``.
    """
    loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    return loss.mean(1).sum() / num_masks


def bce_pixel_sums(inputs: Tensor, targets: Tensor) -> Tensor:
    """N x 1: each mask's sum over its pixels of the binary cross-entropy."""
    return F.binary_cross_entropy_with_logits(inputs, targets, reduction="none").sum(1, keepdim=True)


def bce_cost(inputs: Tensor, targets: Tensor) -> Tensor:
    """Pixel-mean binary cross-entropy of every (query, target) pair.

    Args:
        inputs: Q x P mask logits (or B x Q x P).
        targets: T x P targets in [0, 1] (or B x T x P).

    Returns:
        Q x T cost matrix (or B x Q x T).
    """
    num_pixels = inputs.shape[-1]
    cost = target_products(F.softplus(-inputs), targets) + target_products(F.softplus(inputs), 1 - targets)
    return cost / num_pixels


def bce_pixel_sums_grad(inputs: Tensor, targets: Tensor, coefficients: Tensor) -> Tensor:
    """N x P: the gradient of ``(coefficients * bce_pixel_sums(inputs, targets)).sum()``:
    (sigmoid(x) - y) times each mask's coefficient (N x 1)."""
    return (inputs.sigmoid() - targets) * coefficients[:, :1]


def brier_loss(inputs: Tensor, targets: Tensor, num_masks: float) -> Tensor:
    """Brier score ``(sigmoid(x) - y)^2`` of matched pairs.

    Args:
        inputs: N x P mask logits.
        targets: N x P targets in [0, 1].
        num_masks: normalizer of the sum over masks.

    Returns:
        Scalar: sum over masks of the per-mask pixel mean, divided by ``num_masks``.
    """
    loss = (inputs.sigmoid() - targets) ** 2
    return loss.mean(1).sum() / num_masks


def brier_pixel_sums(inputs: Tensor, targets: Tensor) -> Tensor:
    """N x 1: each mask's sum over its pixels of the Brier score."""
    return ((inputs.sigmoid() - targets) ** 2).sum(1, keepdim=True)


def brier_cost(inputs: Tensor, targets: Tensor, prob: Optional[Tensor] = None) -> Tensor:
    """Pixel-mean Brier score of every (query, target) pair.

    Args:
        inputs: Q x P mask logits (or B x Q x P).
        targets: T x P targets in [0, 1] (or B x T x P).
        prob: ``inputs.sigmoid()`` when the caller has it already; it is not modified.

    Returns:
        Q x T cost matrix (or B x Q x T).
    """
    num_pixels = inputs.shape[-1]
    if prob is None:
        prob = inputs.sigmoid()
    # sum (p - y)^2 = sum p^2 - 2 sum p*y + sum y^2
    cost = (prob**2).sum(-1)[..., :, None] - 2 * target_products(prob, targets) + (targets**2).sum(-1)[..., None, :]
    # the expansion can round to slightly below zero
    return cost.clamp(min=0) / num_pixels


def brier_pixel_sums_grad(inputs: Tensor, targets: Tensor, coefficients: Tensor) -> Tensor:
    """N x P: the gradient of ``(coefficients * brier_pixel_sums(inputs, targets)).sum()``:
    2 (p - y) p (1 - p), p = sigmoid(x), times each mask's coefficient (N x 1)."""
    prob = inputs.sigmoid()
    return (2 * (prob - targets) * prob * (1 - prob)) * coefficients[:, :1]


def dice_loss(inputs: Tensor, targets: Tensor, num_masks: float) -> Tensor:
    """Dice loss ``1 - (2 sum(p*y) + 1) / (sum(p) + sum(y) + 1)`` of matched pairs, p = sigmoid(x).

    Args:
        inputs: N x P mask logits.
        targets: N x P targets in [0, 1].
        num_masks: normalizer of the sum over masks.

    Returns:
        Scalar: sum over masks of the per-mask dice loss, divided by ``num_masks``.
    """
    prob = inputs.sigmoid()
    numerator = 2 * (prob * targets).sum(1)
    denominator = prob.sum(1) + targets.sum(1)
    loss = 1 - (numerator + 1) / (denominator + 1)
    return loss.sum() / num_masks


def dice_pixel_sums(inputs: Tensor, targets: Tensor) -> Tensor:
    """N x 3: each mask's sums over its pixels of ``sigmoid(x) * y``, ``sigmoid(x)`` and ``y``, from
    which :func:`dice_loss_from_sums` gives :func:`dice_loss`."""
    prob = inputs.sigmoid()
    return torch.stack([(prob * targets).sum(1), prob.sum(1), targets.sum(1)], 1)


def dice_pixel_sums_grad(inputs: Tensor, targets: Tensor, coefficients: Tensor) -> Tensor:
    """N x P: the gradient of ``(coefficients * dice_pixel_sums(inputs, targets)).sum()``
    (``coefficients`` N x 3): p (1 - p) (c_0 y + c_1), p = sigmoid(x); the targets' sum has none."""
    prob = inputs.sigmoid()
    return prob * (1 - prob) * (coefficients[:, 0:1] * targets + coefficients[:, 1:2])


def dice_loss_from_sums(sums: Tensor, num_pixels: int, num_masks: float) -> Tensor:
    """:func:`dice_loss` from :func:`dice_pixel_sums` (N x 3); ``num_pixels`` is not needed."""
    loss = 1 - (2 * sums[:, 0] + 1) / (sums[:, 1] + sums[:, 2] + 1)
    return loss.sum() / num_masks


def dice_cost(inputs: Tensor, targets: Tensor) -> Tensor:
    """Dice loss of every (query, target) pair.

    Args:
        inputs: Q x P mask logits (or B x Q x P).
        targets: T x P targets in [0, 1] (or B x T x P).

    Returns:
        Q x T cost matrix (or B x Q x T).
    """
    prob = inputs.sigmoid()
    return dice_cost_from_sums(target_products(prob, targets), prob.sum(-1), targets.sum(-1))


def dice_cost_from_sums(products: Tensor, input_sums: Tensor, target_sums: Tensor) -> Tensor:
    """:func:`dice_cost` from its sums over the pixels, which add up over any split of the pixels
    (the matcher sums them over chunks of points).

    Args:
        products: Q x T sums of ``sigmoid(inputs)[q] * targets[t]`` (or B x Q x T).
        input_sums: (Q,) sums of ``sigmoid(inputs)`` (or B x Q).
        target_sums: (T,) sums of the targets (or B x T).

    Returns:
        Q x T cost matrix (or B x Q x T).
    """
    denominator = input_sums[..., :, None] + target_sums[..., None, :]
    return 1 - (2 * products + 1) / (denominator + 1)


@dataclass(frozen=True)
class MaskLossType:
    """One kind of mask loss: its matched-pair loss, its pairwise cost, its output key and the
    config key of its weight."""

    loss: Callable[[Tensor, Tensor, float], Tensor]
    cost: Callable[[Tensor, Tensor], Tensor]
    # key of this loss in SetCriterion's output ("loss_mask" is the original name of focal)
    loss_key: str
    # True for per-pixel losses (usable as the matcher's mask cost); False for dice
    pointwise: bool
    # key under MODEL.MASK_FORMER of this loss's weight (also its matching-cost weight)
    weight_key: str
    # True when ``cost`` also takes a batch (B x Q x P, B x T x P -> B x Q x T); otherwise the
    # matcher maps it over the images with torch.vmap
    batched: bool = False
    # True when ``cost`` takes ``prob=sigmoid(inputs)`` as a keyword and leaves it unchanged: the
    # matcher then computes the sigmoid once for this cost and the dice cost
    cost_takes_prob: bool = False
    # Optional: the loss as a function of per-mask sums over the pixels, which add up over any split
    # of the pixels (the full-resolution losses then run tile by tile, upsampled_mask_losses.py):
    # ``pixel_sums(inputs, targets)`` N x P, N x P -> N x S sums, and
    # ``loss_from_sums(sums, num_pixels, num_masks)`` -> the value of ``loss``
    pixel_sums: Optional[Callable[[Tensor, Tensor], Tensor]] = None
    loss_from_sums: Optional[Callable[[Tensor, int, float], Tensor]] = None
    # Optional, with pixel_sums: ``pixel_sums_grad(inputs, targets, coefficients)`` N x P, the gradient
    # with respect to ``inputs`` of ``(coefficients * pixel_sums(inputs, targets)).sum()``
    # (coefficients N x S) in closed form; the tiled losses' backward otherwise runs autograd on
    # pixel_sums
    pixel_sums_grad: Optional[Callable[[Tensor, Tensor, Tensor], Tensor]] = None

    def __post_init__(self):
        if (self.pixel_sums is None) != (self.loss_from_sums is None):
            raise ValueError("MaskLossType: pixel_sums and loss_from_sums go together; got only one of them")
        if self.pixel_sums_grad is not None and self.pixel_sums is None:
            raise ValueError("MaskLossType: pixel_sums_grad needs pixel_sums")


# Every mask loss, by the name MODEL.MASK_FORMER.MASK_LOSSES uses. Add one with register_mask_loss.
MASK_LOSSES: Dict[str, MaskLossType] = {}


def register_mask_loss(name: str, loss_type: MaskLossType) -> MaskLossType:
    """
    Make a mask loss available to MODEL.MASK_FORMER.MASK_LOSSES under ``name``.

    Args:
        name: the name configs use.
        loss_type: its functions, output key and weight key (the weight key must exist under
            MODEL.MASK_FORMER when a model is built with this loss; add it to the config first).
    Raises:
        ValueError: when the name or the output key is already taken.
    """
    if name in MASK_LOSSES:
        raise ValueError(f"A mask loss named {name!r} is already registered")
    taken = {kind.loss_key: other for other, kind in MASK_LOSSES.items()}
    if loss_type.loss_key in taken or loss_type.loss_key == "loss_ce":
        raise ValueError(
            f"Mask loss {name!r}: loss_key {loss_type.loss_key!r} is already used by "
            f"{taken.get(loss_type.loss_key, 'the classification loss')!r}"
        )
    MASK_LOSSES[name] = loss_type
    return loss_type


register_mask_loss(
    "focal",
    MaskLossType(
        sigmoid_focal_loss, sigmoid_focal_cost, "loss_mask", True, "MASK_WEIGHT", batched=True, cost_takes_prob=True,
        pixel_sums=sigmoid_focal_pixel_sums, pixel_sums_grad=sigmoid_focal_pixel_sums_grad,
        loss_from_sums=mean_loss_from_sums,
    ),
)
register_mask_loss(
    "bce",
    MaskLossType(
        bce_loss, bce_cost, "loss_bce", True, "BCE_WEIGHT", batched=True,
        pixel_sums=bce_pixel_sums, pixel_sums_grad=bce_pixel_sums_grad,
        loss_from_sums=mean_loss_from_sums,
    ),
)
register_mask_loss(
    "brier",
    MaskLossType(
        brier_loss, brier_cost, "loss_brier", True, "BRIER_WEIGHT", batched=True, cost_takes_prob=True,
        pixel_sums=brier_pixel_sums, pixel_sums_grad=brier_pixel_sums_grad,
        loss_from_sums=mean_loss_from_sums,
    ),
)
register_mask_loss(
    "dice",
    MaskLossType(
        dice_loss, dice_cost, "loss_dice", False, "DICE_WEIGHT", batched=True,
        pixel_sums=dice_pixel_sums, pixel_sums_grad=dice_pixel_sums_grad,
        loss_from_sums=dice_loss_from_sums,
    ),
)


def get_mask_loss(
    name: str, pointwise_only: bool = False, where: str = "mask loss"
) -> MaskLossType:
    """Look up a mask loss by name.

    Args:
        name: a name of ``MASK_LOSSES`` ("focal", "bce", "brier", "dice" and any registered one).
        pointwise_only: accept only per-pixel losses (all but "dice").
        where: what asked for it, for the error message (e.g. "HungarianMatcher mask_cost_type").

    Raises:
        ValueError: naming the value and listing the valid names.
    """
    valid = tuple(n for n, kind in MASK_LOSSES.items() if kind.pointwise or not pointwise_only)
    if not isinstance(name, str) or name not in valid:
        raise ValueError(f"{where}: unknown mask loss {name!r}; valid names: {', '.join(valid)}")
    return MASK_LOSSES[name]
