"""Point-sampled mask losses and matching costs (MODEL.MASK_FORMER.TRAIN_NUM_POINTS > 0) against
the full-resolution ones, their determinism under a seed, and TRAIN_NUM_POINTS = 0 reproducing
the full-resolution path bit for bit."""
import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model
from scipy.optimize import linear_sum_assignment

import mask_former.modeling.criterion as criterion_module
from mask_former.modeling.criterion import SetCriterion, build_criterion, point_uncertainty
from mask_former.modeling.mask_losses import MASK_LOSSES, dice_cost, sigmoid_focal_cost
from mask_former.modeling.matcher import HungarianMatcher
from model_utils import tiny_cfg, zoo_cfg
from test_criterion import FixedMatcher, outputs_with_aux
from test_model import make_batch

ALL_MASK_LOSSES = ("focal", "bce", "brier", "dice")
LOSS_KEYS = ("loss_mask", "loss_bce", "loss_brier", "loss_dice")


def constant_case(generator, num_images=2, num_queries=4, num_targets=(3, 2), size=4, scale=4):
    """Every predicted mask a constant logit (h x w = size x size), every target mask all ones or
    all zeros (scale times larger): any point reads the same values as any pixel."""
    logits = torch.randn(num_images, num_queries, 4, generator=generator)
    values = torch.randn(num_images, num_queries, 1, 1, generator=generator) * 3
    pred_masks = values.expand(-1, -1, size, size).contiguous()
    targets = []
    for count in num_targets:
        full = torch.rand(count, 1, 1, generator=generator) > 0.5
        masks = full.expand(-1, size * scale, size * scale).contiguous()
        targets.append({"labels": torch.randint(0, 3, (count,), generator=generator), "masks": masks})
    return {"pred_logits": logits, "pred_masks": pred_masks}, targets


def random_case(generator, labels, num_queries, num_logits, mask_size, target_size):
    """Random outputs (B = len(labels) images, mask logits of mask_size x mask_size) and targets
    (image b: ``labels[b]``, random binary masks of target_size x target_size)."""
    outputs = {
        "pred_logits": torch.randn(len(labels), num_queries, num_logits, generator=generator),
        "pred_masks": torch.randn(len(labels), num_queries, mask_size, mask_size, generator=generator) * 2,
    }
    targets = [
        {"labels": torch.tensor(image_labels),
         "masks": torch.rand(len(image_labels), target_size, target_size, generator=generator) > 0.5}
        for image_labels in labels
    ]
    return outputs, targets


# ---------------------------------------------------------------- losses
def test_point_loss_equals_full_loss_on_constant_masks():
    generator = torch.Generator().manual_seed(0)
    outputs, targets = constant_case(generator)
    indices = [([0, 2, 3], [1, 0, 2]), ([1, 3], [0, 1])]
    num_pixels = 16 * 16  # dice's +1 smoothing counts points: as many points as pixels
    full = SetCriterion(3, FixedMatcher(indices), 0.1, mask_losses=ALL_MASK_LOSSES)(outputs, targets)
    torch.manual_seed(0)
    points = SetCriterion(3, FixedMatcher(indices), 0.1, mask_losses=ALL_MASK_LOSSES, num_points=num_pixels)(
        outputs, targets
    )
    assert set(points) == set(full) == {"loss_ce", *LOSS_KEYS}
    for key in full:
        assert points[key].dtype == torch.float32
        assert points[key].item() == pytest.approx(full[key].item(), rel=1e-5, abs=1e-7), key


def test_point_loss_at_the_target_pixel_centers_equals_full_loss(monkeypatch):
    # Any masks, the points placed at every pixel center of the target grid (shuffled): bilinear
    # sampling then reads exactly the bilinear upsampling of the full-resolution loss, which
    # checks the coordinate conventions (x/y order, align_corners, the border).
    generator = torch.Generator().manual_seed(1)
    pred_logits = torch.randn(2, 3, 4, generator=generator)
    pred_masks = torch.randn(2, 3, 3, 5, generator=generator) * 3  # not square: x/y must not swap
    height, width = 12, 20
    targets = []
    for labels in ([0, 2], [1]):
        masks = torch.rand(len(labels), height, width, generator=generator) > 0.5
        targets.append({"labels": torch.tensor(labels), "masks": masks})
    indices = [([2, 0], [0, 1]), ([1], [0])]
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    centers = torch.stack([(xs.flatten() + 0.5) / width, (ys.flatten() + 0.5) / height], dim=1)

    def pixel_centers(coarse_logits, uncertainty_func, num_points, oversample_ratio, importance_sample_ratio):
        assert num_points == height * width and uncertainty_func is point_uncertainty
        order = torch.randperm(num_points, generator=generator)
        return centers[order][None].expand(coarse_logits.shape[0], -1, -1)

    monkeypatch.setattr(criterion_module, "get_uncertain_point_coords_with_randomness", pixel_centers)
    outputs = {"pred_logits": pred_logits, "pred_masks": pred_masks}
    full = SetCriterion(3, FixedMatcher(indices), 0.1, mask_losses=ALL_MASK_LOSSES)(outputs, targets)
    points = SetCriterion(
        3, FixedMatcher(indices), 0.1, mask_losses=ALL_MASK_LOSSES, num_points=height * width
    )(outputs, targets)
    for key in LOSS_KEYS:
        assert points[key].item() == pytest.approx(full[key].item(), rel=1e-5), key


def test_point_loss_on_piecewise_constant_masks_at_block_interiors(monkeypatch):
    # Predictions and targets constant over 4 blocks of 8 x 8 pixels (full resolution, so the
    # full-resolution loss is the mean of the 4 block losses); the points, 16 per block, lie
    # where bilinear sampling reads one block only: the point loss equals the full loss.
    size, block = 16, 8
    pred = torch.tensor([[2.0, -1.0], [0.5, -3.0]]).repeat_interleave(block, 0).repeat_interleave(block, 1)
    tgt = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).repeat_interleave(block, 0).repeat_interleave(block, 1)
    outputs = {"pred_logits": torch.zeros(1, 1, 3), "pred_masks": pred[None, None]}
    targets = [{"labels": torch.tensor([0]), "masks": tgt[None].bool()}]
    inner = (torch.arange(4) + 2.5) / size  # pixel centers 2..5 of the first block, per axis
    grid = torch.stack(torch.meshgrid(inner, inner, indexing="xy"), dim=-1).reshape(-1, 2)
    coords = torch.cat([grid + torch.tensor([dx, dy]) for dx in (0, 0.5) for dy in (0, 0.5)])[None]

    monkeypatch.setattr(criterion_module, "get_uncertain_point_coords_with_randomness", lambda *args: coords)
    mean_losses = ("focal", "bce", "brier")  # dice's smoothing counts points: 64 != 256
    full = SetCriterion(2, FixedMatcher([([0], [0])]), 0.1, mask_losses=mean_losses)(outputs, targets)
    points = SetCriterion(2, FixedMatcher([([0], [0])]), 0.1, mask_losses=mean_losses, num_points=64)(
        outputs, targets
    )
    for key in ("loss_mask", "loss_bce", "loss_brier"):
        assert points[key].item() == pytest.approx(full[key].item(), rel=1e-6), key


def test_importance_sampling_prefers_uncertain_points():
    # logit 0 (most uncertain) in one 8 x 8 quarter of a 16 x 16 mask, +8 elsewhere: with 3
    # candidates per point, the quarter holds about as many candidates as importance points
    pred = torch.full((1, 1, 16, 16), 8.0)
    pred[..., :8, :8] = 0.0
    target = torch.ones(1, 16, 16)

    def mean_abs_logit(importance):
        criterion = SetCriterion(
            2, FixedMatcher([([0], [0])]), 0.1, mask_losses=("bce",), num_points=1000,
            importance_sample_ratio=importance,
        )
        torch.manual_seed(0)
        src_points, _ = criterion._sample_points(pred[0], target)
        return src_points.abs().mean().item()

    uniform = mean_abs_logit(0.0)
    assert 5.0 < uniform < 6.5  # about 3 / 4 of the points in the confident +8 region
    assert mean_abs_logit(0.75) < 0.5 * uniform


def test_sampling_is_deterministic_under_a_seed():
    generator = torch.Generator().manual_seed(2)
    outputs, targets = random_case(generator, ([0, 1], [2]), num_queries=5, num_logits=4, mask_size=8,
                                   target_size=32)
    criterion = SetCriterion(3, HungarianMatcher(num_points=50), 0.1, mask_losses=ALL_MASK_LOSSES, num_points=50)

    def run(seed):
        torch.manual_seed(seed)
        return criterion(outputs, targets), criterion.matcher.batched_cost(outputs, targets)

    (losses_a, cost_a), (losses_b, cost_b), (losses_c, cost_c) = run(0), run(0), run(1)
    assert all(torch.equal(losses_a[k], losses_b[k]) for k in losses_a)
    assert torch.equal(cost_a, cost_b)
    assert any(not torch.equal(losses_a[k], losses_c[k]) for k in LOSS_KEYS)
    assert not torch.equal(cost_a, cost_c)


def test_point_sampling_stays_float32_under_autocast():
    # the same points (same seed) and the same float32 values with and without bfloat16 autocast
    generator = torch.Generator().manual_seed(8)
    outputs, targets = random_case(generator, ([0, 2], [1]), num_queries=6, num_logits=4, mask_size=8,
                                   target_size=32)
    criterion = SetCriterion(3, HungarianMatcher(num_points=40), 0.1, mask_losses=ALL_MASK_LOSSES, num_points=40)
    torch.manual_seed(0)
    expected = criterion(outputs, targets)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = criterion(outputs, targets)
    for key in expected:
        assert got[key].dtype == torch.float32
        assert torch.equal(got[key], expected[key]), key


def test_point_losses_get_gradients_only_for_matched_masks():
    generator = torch.Generator().manual_seed(3)
    pred_masks = (torch.randn(1, 3, 4, 4, generator=generator) * 2).requires_grad_()
    outputs = {"pred_logits": torch.randn(1, 3, 3, generator=generator), "pred_masks": pred_masks}
    targets = [{"labels": torch.tensor([1]), "masks": torch.rand(1, 16, 16, generator=generator) > 0.5}]
    criterion = SetCriterion(2, FixedMatcher([([1], [0])]), 0.1, num_points=32)
    losses = criterion(outputs, targets)
    (losses["loss_mask"] + losses["loss_dice"]).backward()
    assert pred_masks.grad[0, 1].abs().sum() > 0
    assert pred_masks.grad[0, [0, 2]].abs().sum() == 0


# ---------------------------------------------------------------- matching costs
def test_point_costs_equal_full_costs_on_constant_masks():
    generator = torch.Generator().manual_seed(4)
    outputs, targets = constant_case(generator, num_targets=(3, 0), size=4)
    torch.manual_seed(0)
    full = HungarianMatcher().batched_cost(outputs, targets)
    points = HungarianMatcher(num_points=16).batched_cost(outputs, targets)  # 4 x 4 pixels
    assert points.shape == full.shape == (2, 4, 3)
    torch.testing.assert_close(points[0], full[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_points", [0, 7, 40])
def test_point_costs_are_the_cost_functions_at_shared_points(chunk_points):
    generator = torch.Generator().manual_seed(5)
    outputs, targets = random_case(generator, ([0, 1, 1], [1]), num_queries=4, num_logits=3, mask_size=6,
                                   target_size=24)
    matcher = HungarianMatcher(1.0, 20.0, 1.0, num_points=40, chunk_points=chunk_points)
    torch.manual_seed(7)
    cost = matcher.batched_cost(outputs, targets)
    torch.manual_seed(7)
    coords = torch.rand(2, 40, 2)  # the matcher's draw: one set per image
    for b, target in enumerate(targets):
        grid = 2 * coords[b][None, None] - 1
        pred = F.grid_sample(outputs["pred_masks"][b][None], grid, align_corners=False, padding_mode="border")[0, :, 0]
        tgt = F.grid_sample(target["masks"].float()[None], grid, align_corners=False, padding_mode="border")[0, :, 0]
        prob = outputs["pred_logits"][b].softmax(-1)
        expected = -prob[:, target["labels"]] + 20.0 * sigmoid_focal_cost(pred, tgt) + dice_cost(pred, tgt)
        torch.testing.assert_close(cost[b, :, : len(target["labels"])], expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- TRAIN_NUM_POINTS = 0 is the full-resolution path
def reference_full_resolution(outputs, targets, mask_losses, eos_coef=0.1):
    """The full-resolution matcher and losses written plainly, image by image (the path before
    point sampling and batched matching existed)."""
    num_classes = outputs["pred_logits"].shape[-1] - 1
    losses = {}
    layers = [("", outputs)] + [(f"_{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs", []))]
    num_masks = max(float(sum(len(t["labels"]) for t in targets)), 1.0)
    pointwise = [n for n in mask_losses if MASK_LOSSES[n].pointwise]
    for suffix, layer in layers:
        indices = []
        for b, target in enumerate(targets):
            if len(target["labels"]) == 0:
                indices.append((torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)))
                continue
            prob = layer["pred_logits"][b].softmax(-1)
            cost = torch.zeros(prob.shape[0], len(target["labels"]))
            cost += 1.0 * -prob[:, target["labels"]]
            pred = layer["pred_masks"][b].flatten(1)
            tgt = F.interpolate(target["masks"].float()[:, None], size=layer["pred_masks"].shape[-2:], mode="nearest")
            tgt = tgt.flatten(1)
            if pointwise:
                cost += 20.0 * MASK_LOSSES[pointwise[0]].cost(pred, tgt)
            if "dice" in mask_losses:
                cost += 1.0 * dice_cost(pred, tgt)
            q, t = linear_sum_assignment(cost.numpy())
            indices.append((torch.as_tensor(q, dtype=torch.int64), torch.as_tensor(t, dtype=torch.int64)))
        target_classes = torch.full(layer["pred_logits"].shape[:2], num_classes, dtype=torch.int64)
        weight = torch.ones(num_classes + 1)
        weight[-1] = eos_coef
        batch_idx = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(indices)])
        query_idx = torch.cat([q for q, _ in indices])
        if len(batch_idx):
            target_classes[batch_idx, query_idx] = torch.cat([t["labels"][ti] for t, (_, ti) in zip(targets, indices)])
        losses["loss_ce" + suffix] = F.cross_entropy(
            layer["pred_logits"].transpose(1, 2), target_classes, weight=weight
        )
        height = max(t["masks"].shape[-2] for t in targets)
        width = max(t["masks"].shape[-1] for t in targets)
        tgt = torch.cat([
            F.pad(t["masks"][ti].float(), (0, width - t["masks"].shape[-1], 0, height - t["masks"].shape[-2]))
            for t, (_, ti) in zip(targets, indices)
        ]).flatten(1)
        src = F.interpolate(layer["pred_masks"][batch_idx, query_idx][:, None], size=(height, width),
                            mode="bilinear", align_corners=False).flatten(1)
        for name in mask_losses:
            losses[MASK_LOSSES[name].loss_key + suffix] = MASK_LOSSES[name].loss(src, tgt, num_masks)
    return losses


@pytest.mark.parametrize("mask_losses", [["focal", "dice"], ["bce", "brier", "dice"], ["dice"]])
def test_zero_points_is_bit_identical_to_the_full_resolution_path(mask_losses):
    generator = torch.Generator().manual_seed(6)
    outputs = outputs_with_aux(generator, 3, 12, 6, 8, 6, num_aux=2, logit_scale=2.0, mask_scale=3.0)
    targets = []
    for b, count in enumerate((4, 0, 7)):  # images of different sizes, one without targets
        masks = torch.rand(count, 32 - 8 * (b == 2), 24, generator=generator) > 0.6
        targets.append({"labels": torch.randint(0, 5, (count,), generator=generator), "masks": masks})
    cfg = tiny_cfg(5)
    cfg.MODEL.MASK_FORMER.MASK_LOSSES = mask_losses
    cfg.MODEL.MASK_FORMER.DEC_LAYERS = 3
    criterion = build_criterion(cfg, 5)
    assert criterion.num_points == 0 and criterion.matcher.num_points == 0

    rng_before = torch.get_rng_state()
    losses = criterion(outputs, targets)
    assert torch.equal(torch.get_rng_state(), rng_before), "the full-resolution path draws no random numbers"
    expected = reference_full_resolution(outputs, targets, mask_losses)
    assert set(losses) == set(expected)
    for key in expected:
        assert torch.equal(losses[key], expected[key]), (key, losses[key].item(), expected[key].item())


# ---------------------------------------------------------------- config and model
def test_config_defaults_keep_the_published_losses():
    cfg = zoo_cfg("ade20k-150/maskformer_R50_bs16_160k.yaml")
    mf = cfg.MODEL.MASK_FORMER
    assert (mf.TRAIN_NUM_POINTS, mf.OVERSAMPLE_RATIO, mf.IMPORTANCE_SAMPLE_RATIO) == (0, 3.0, 0.75)
    criterion = build_criterion(cfg, 150)
    assert criterion.num_points == 0 and criterion.matcher.num_points == 0


def test_config_keys_reach_criterion_and_matcher():
    cfg = tiny_cfg()
    cfg.MODEL.MASK_FORMER.TRAIN_NUM_POINTS = 100
    cfg.MODEL.MASK_FORMER.OVERSAMPLE_RATIO = 2.0
    cfg.MODEL.MASK_FORMER.IMPORTANCE_SAMPLE_RATIO = 0.5
    criterion = build_criterion(cfg, 3)
    assert (criterion.num_points, criterion.oversample_ratio, criterion.importance_sample_ratio) == (100, 2.0, 0.5)
    assert criterion.matcher.num_points == 100


def test_matcher_num_points_follows_train_num_points_unless_set():
    cfg = tiny_cfg()
    assert cfg.MODEL.MASK_FORMER.MATCHER_NUM_POINTS == -1
    # (TRAIN_NUM_POINTS, MATCHER_NUM_POINTS) -> (the losses' points, the matcher's points)
    for train, matcher, expected in [(0, -1, (0, 0)), (100, -1, (100, 100)), (100, 0, (100, 0)),
                                      (0, 64, (0, 64)), (100, 25, (100, 25))]:
        cfg.MODEL.MASK_FORMER.TRAIN_NUM_POINTS = train
        cfg.MODEL.MASK_FORMER.MATCHER_NUM_POINTS = matcher
        criterion = build_criterion(cfg, 3)
        assert (criterion.num_points, criterion.matcher.num_points) == expected, (train, matcher)


def test_sampled_matching_leaves_full_resolution_losses():
    # MATCHER_NUM_POINTS > 0 with TRAIN_NUM_POINTS 0: the matcher reads 16 random points, the
    # losses every pixel, for the pairs the matcher chose
    cfg = tiny_cfg()
    cfg.MODEL.MASK_FORMER.MATCHER_NUM_POINTS = 16
    criterion = build_criterion(cfg, 3)
    outputs, targets = random_case(torch.Generator().manual_seed(5), [[0, 2, 1], [2, 2]], 6, 4, 8, 16)
    chosen = []
    criterion.matcher.register_forward_hook(lambda module, args, result: chosen.append(result))
    torch.manual_seed(3)
    losses = criterion(outputs, targets)
    generator_state = torch.get_rng_state()

    # the points the matcher drew: its first draw after the seed, one set per image
    torch.manual_seed(3)
    coords = torch.rand(2, 16, 2)
    assert torch.equal(generator_state, torch.get_rng_state())  # the losses drew nothing more
    mf = cfg.MODEL.MASK_FORMER
    assert list(mf.MASK_LOSSES) == ["focal", "dice"]
    for b, (queries, target_ids) in enumerate(chosen[0]):
        pred = F.grid_sample(outputs["pred_masks"][b : b + 1], coords[b : b + 1, :, None] * 2 - 1,
                             align_corners=False, padding_mode="border")[0, :, :, 0]
        tgt = F.grid_sample(targets[b]["masks"][None].float(), coords[b : b + 1, :, None] * 2 - 1,
                            align_corners=False, padding_mode="border")[0, :, :, 0]
        prob = outputs["pred_logits"][b].softmax(-1)[:, targets[b]["labels"]]
        total = (-mf.CLASS_WEIGHT * prob + mf.MASK_WEIGHT * sigmoid_focal_cost(pred, tgt)
                 + mf.DICE_WEIGHT * dice_cost(pred, tgt))
        rows, cols = linear_sum_assignment(total.numpy())
        assert queries.tolist() == rows.tolist() and target_ids.tolist() == cols.tolist(), b

    pairs = [(q.tolist(), t.tolist()) for q, t in chosen[0]]
    expected = SetCriterion(3, FixedMatcher(pairs), mf.NO_OBJECT_WEIGHT, mask_losses=list(mf.MASK_LOSSES),
                            num_points=0)(outputs, targets)
    for key in expected:
        assert torch.equal(losses[key], expected[key]), key


@pytest.mark.parametrize("value", [-2, 10.5, True, "64"])
def test_bad_matcher_num_points_names_the_key(value):
    cfg = tiny_cfg()
    cfg.MODEL.MASK_FORMER.MATCHER_NUM_POINTS = value
    with pytest.raises(ValueError, match=rf"MATCHER_NUM_POINTS={value!r}: expected -1 \(as TRAIN_NUM_POINTS\)"):
        build_criterion(cfg, 3)


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("TRAIN_NUM_POINTS", -1, r"TRAIN_NUM_POINTS=-1: expected an int >= 0"),
        ("TRAIN_NUM_POINTS", 10.5, r"TRAIN_NUM_POINTS=10.5"),
        ("OVERSAMPLE_RATIO", 0.5, r"OVERSAMPLE_RATIO=0.5: expected a finite number >= 1"),
        ("IMPORTANCE_SAMPLE_RATIO", 1.5, r"IMPORTANCE_SAMPLE_RATIO=1.5: expected a number in \[0, 1\]"),
    ],
)
def test_bad_config_values_name_the_key(key, value, message):
    cfg = tiny_cfg()
    cfg.MODEL.MASK_FORMER[key] = value
    with pytest.raises(ValueError, match=message):
        build_criterion(cfg, 3)


def test_constructor_validation():
    with pytest.raises(ValueError, match="num_points must be an int >= 0"):
        SetCriterion(2, HungarianMatcher(), 0.1, num_points=-5)
    with pytest.raises(ValueError, match="oversample_ratio must be a finite number >= 1"):
        SetCriterion(2, HungarianMatcher(), 0.1, num_points=5, oversample_ratio=0.0)
    with pytest.raises(ValueError, match=r"importance_sample_ratio must be a number in \[0, 1\]"):
        SetCriterion(2, HungarianMatcher(), 0.1, num_points=5, importance_sample_ratio=-0.1)
    with pytest.raises(ValueError, match="num_points must be an int >= 0"):
        HungarianMatcher(num_points=True)


def test_model_trains_with_point_sampling():
    cfg = tiny_cfg()
    cfg.MODEL.MASK_FORMER.TRAIN_NUM_POINTS = 64
    torch.manual_seed(0)
    model = build_model(cfg).train()
    losses = model(make_batch())
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    grad = model.sem_seg_head.pixel_decoder.mask_features.weight.grad
    assert grad is not None and grad.abs().sum() > 0
