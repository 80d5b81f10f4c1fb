"""HungarianMatcher and the pairwise mask costs against plain-formula costs and brute force, the
batched matching against image-by-image matching, and the PyTorch assignment solver against
scipy's."""
import itertools
import math

import pytest
import torch

import mask_former.modeling.matcher as matcher_module
from mask_former.layers import interleaved_rows
from mask_former.modeling.criterion import build_matcher
from mask_former.modeling.mask_losses import bce_cost, brier_cost, dice_cost, sigmoid_focal_cost
from mask_former.modeling.matcher import HungarianMatcher
from model_utils import tiny_cfg


# ---------------------------------------------------------------- plain per-pixel formulas
def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def focal_pixel(x, y, alpha=0.25, gamma=2.0):
    p = sigmoid(x)
    if y == 1:
        return alpha * (1 - p) ** gamma * -math.log(p)
    return (1 - alpha) * p**gamma * -math.log(1 - p)


def bce_pixel(x, y):
    p = sigmoid(x)
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def brier_pixel(x, y):
    return (sigmoid(x) - y) ** 2


PIXEL_LOSSES = {"focal": focal_pixel, "bce": bce_pixel, "brier": brier_pixel}


def dice_of(xs, ys):
    ps = [sigmoid(x) for x in xs]
    return 1 - (2 * sum(p * y for p, y in zip(ps, ys)) + 1) / (sum(ps) + sum(ys) + 1)


def nearest_resize(mask, h, w):
    """Nested list H x W -> h x w: output (i, j) reads (floor(i * H / h), floor(j * W / w))."""
    H, W = len(mask), len(mask[0])
    return [[mask[(i * H) // h][(j * W) // w] for j in range(w)] for i in range(h)]


def flat(mask):
    return [v for row in mask for v in row]


def reference_cost(logits, pred_masks, labels, tgt_masks, w_class, w_mask, w_dice, kind):
    """Q x T cost as nested lists, computed pixel by pixel from Python floats."""
    h, w = len(pred_masks[0]), len(pred_masks[0][0])
    cost = []
    for q, row in enumerate(logits):
        exps = [math.exp(v) for v in row]
        probs = [e / sum(exps) for e in exps]
        xs = flat(pred_masks[q])
        cost_row = []
        for label, tgt in zip(labels, tgt_masks):
            ys = flat(nearest_resize(tgt, h, w))
            total = 0.0
            if w_class:
                total += w_class * -probs[label]
            if w_mask:
                pixel = PIXEL_LOSSES[kind]
                total += w_mask * sum(pixel(x, y) for x, y in zip(xs, ys)) / len(xs)
            if w_dice:
                total += w_dice * dice_of(xs, ys)
            cost_row.append(total)
        cost.append(cost_row)
    return cost


def brute_force(cost):
    """Over all injective assignments: the minimal total cost and the list of optimal
    assignments (each a set of (query, target) pairs)."""
    num_queries, num_targets = len(cost), len(cost[0])
    if num_targets <= num_queries:
        assignments = [
            set(zip(queries, range(num_targets)))
            for queries in itertools.permutations(range(num_queries), num_targets)
        ]
    else:
        assignments = [
            set(zip(range(num_queries), tgts))
            for tgts in itertools.permutations(range(num_targets), num_queries)
        ]
    totals = [sum(cost[q][t] for q, t in pairs) for pairs in assignments]
    best = min(totals)
    return best, [pairs for pairs, total in zip(assignments, totals) if total - best < 1e-9]


def random_case(generator, batch_sizes_t, num_queries, num_classes, h, w, scale=2):
    logits = torch.randn(len(batch_sizes_t), num_queries, num_classes + 1, generator=generator) * 2
    masks = torch.randn(len(batch_sizes_t), num_queries, h, w, generator=generator) * 2
    targets = []
    for num_targets in batch_sizes_t:
        labels = torch.randint(0, num_classes, (num_targets,), generator=generator)
        size = (num_targets, int(h * scale), int(w * scale))
        tgt = torch.rand(size, generator=generator) > 0.5
        targets.append({"labels": labels, "masks": tgt})
    return {"pred_logits": logits, "pred_masks": masks}, targets


def check_against_brute_force(matcher, outputs, targets, weights, kind):
    indices = matcher(outputs, targets)
    assert len(indices) == len(targets)
    for b, (target, (src, tgt)) in enumerate(zip(targets, indices)):
        num_queries, num_targets = outputs["pred_logits"].shape[1], len(target["labels"])
        assert src.dtype == torch.int64 and tgt.dtype == torch.int64
        assert len(src) == len(tgt) == min(num_queries, num_targets)
        assert len(set(src.tolist())) == len(src) and len(set(tgt.tolist())) == len(tgt)
        cost = reference_cost(
            outputs["pred_logits"][b].float().tolist(),
            outputs["pred_masks"][b].float().tolist(),
            target["labels"].tolist(),
            target["masks"].int().tolist(),
            *weights,
            kind,
        )
        best_cost, optimal = brute_force(cost)
        got_pairs = set(zip(src.tolist(), tgt.tolist()))
        got_cost = sum(cost[q][t] for q, t in got_pairs)
        assert got_cost == pytest.approx(best_cost, rel=1e-5, abs=1e-5), f"image {b}"
        # several optima only in ties (class-only costs with repeated labels)
        assert got_pairs in optimal, f"image {b}"


@pytest.mark.parametrize("kind", ["focal", "bce", "brier"])
@pytest.mark.parametrize(
    "weights",
    [(1.0, 20.0, 1.0), (1.0, 1.0, 1.0), (2.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)],
)
# the mask costs over all 12 (or 4) pixels at once, in chunks of 5 (the last one shorter), and 1 by 1
@pytest.mark.parametrize("chunk_points", [0, 5, 1])
def test_matches_brute_force(kind, weights, chunk_points):
    generator = torch.Generator()
    matcher = HungarianMatcher(*weights, mask_cost_type=kind, chunk_points=chunk_points)
    for seed in range(3):
        generator.manual_seed(seed)
        num_queries = 3 + seed  # 3..5, plus the 6-query case below
        outputs, targets = random_case(generator, [2, 4, 1], num_queries, 3, 3, 4)
        check_against_brute_force(matcher, outputs, targets, weights, kind)
    generator.manual_seed(100)
    outputs, targets = random_case(generator, [4, 3], 6, 5, 2, 2)
    check_against_brute_force(matcher, outputs, targets, weights, kind)


def test_more_targets_than_queries():
    generator = torch.Generator().manual_seed(3)
    outputs, targets = random_case(generator, [4, 3], 2, 3, 2, 3)
    matcher = HungarianMatcher()
    indices = matcher(outputs, targets)
    assert [len(src) for src, _ in indices] == [2, 2]
    check_against_brute_force(matcher, outputs, targets, (1.0, 20.0, 1.0), "focal")


def test_non_integer_resize_ratio():
    # targets 6 x 6 -> predictions 4 x 4: nearest reads rows/cols 0, 1, 3, 4
    generator = torch.Generator().manual_seed(5)
    outputs, targets = random_case(generator, [3], 4, 2, 4, 4, scale=1.5)
    check_against_brute_force(HungarianMatcher(), outputs, targets, (1.0, 20.0, 1.0), "focal")


def test_zero_targets_give_empty_indices():
    generator = torch.Generator().manual_seed(0)
    outputs, targets = random_case(generator, [0, 2], 4, 3, 2, 2)
    indices = HungarianMatcher()(outputs, targets)
    src, tgt = indices[0]
    assert src.shape == (0,) and tgt.shape == (0,)
    assert src.dtype == torch.int64 and tgt.dtype == torch.int64
    assert len(indices[1][0]) == 2


def test_half_inputs_match_in_float32():
    generator = torch.Generator().manual_seed(11)
    outputs, targets = random_case(generator, [3, 4], 5, 3, 3, 3)
    half = {k: v.half() for k, v in outputs.items()}
    targets = [{"labels": t["labels"], "masks": t["masks"].half()} for t in targets]
    # the reference is computed from the half values, in double precision
    check_against_brute_force(HungarianMatcher(), half, targets, (1.0, 20.0, 1.0), "focal")


def test_bool_and_float_target_masks_agree():
    generator = torch.Generator().manual_seed(2)
    outputs, targets = random_case(generator, [3, 2], 5, 3, 3, 3)
    float_targets = [{"labels": t["labels"], "masks": t["masks"].float()} for t in targets]
    matcher = HungarianMatcher()
    for (s1, t1), (s2, t2) in zip(matcher(outputs, targets), matcher(outputs, float_targets)):
        assert s1.tolist() == s2.tolist() and t1.tolist() == t2.tolist()


def test_class_only_matching_follows_labels():
    # hand-made: query 2 is sure of class 0, query 0 of class 1, query 1 is "no object"
    logits = torch.tensor([[[-5.0, 5.0, 0.0], [0.0, 0.0, 9.0], [5.0, -5.0, 0.0]]])
    outputs = {"pred_logits": logits, "pred_masks": torch.zeros(1, 3, 2, 2)}
    targets = [{"labels": torch.tensor([0, 1]), "masks": torch.zeros(2, 4, 4, dtype=torch.bool)}]
    src, tgt = HungarianMatcher(1.0, 0.0, 0.0)(outputs, targets)[0]
    assert sorted(zip(src.tolist(), tgt.tolist())) == [(0, 1), (2, 0)]


@pytest.mark.parametrize(
    "field,weights,term",
    [
        ("pred_logits", (1.0, 20.0, 1.0), "class"),
        ("pred_masks", (1.0, 20.0, 1.0), "mask"),
        ("pred_masks", (1.0, 0.0, 1.0), "dice"),
    ],
)
def test_nan_raises_naming_image_and_term(field, weights, term):
    generator = torch.Generator().manual_seed(1)
    outputs, targets = random_case(generator, [2, 2, 2], 3, 3, 2, 2)
    outputs[field][1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=rf"'{term}' cost of image 1 in the batch"):
        HungarianMatcher(*weights)(outputs, targets)


def test_inf_mask_logit_raises_for_mask_cost():
    generator = torch.Generator().manual_seed(1)
    outputs, targets = random_case(generator, [1, 2], 3, 3, 2, 2)
    outputs["pred_masks"][0, 2, 1, 1] = float("inf")
    with pytest.raises(ValueError, match=r"'mask' cost of image 0"):
        HungarianMatcher()(outputs, targets)


def test_zero_weight_removes_term():
    # NaN masks are never looked at when both mask weights are 0
    generator = torch.Generator().manual_seed(1)
    outputs, targets = random_case(generator, [2], 3, 3, 2, 2)
    outputs["pred_masks"][:] = float("nan")
    src, _ = HungarianMatcher(1.0, 0.0, 0.0)(outputs, targets)[0]
    assert len(src) == 2


@pytest.mark.parametrize(
    "kind,cost_fn",
    [("focal", sigmoid_focal_cost), ("bce", bce_cost), ("brier", brier_cost), ("dice", dice_cost)],
)
def test_pairwise_costs_against_pixel_loops(kind, cost_fn):
    generator = torch.Generator().manual_seed(4)
    inputs = torch.randn(4, 6, generator=generator, dtype=torch.float64) * 3
    targets = (torch.rand(3, 6, generator=generator) > 0.4).double()
    got = cost_fn(inputs, targets)
    assert got.shape == (4, 3)
    for q in range(4):
        for t in range(3):
            xs, ys = inputs[q].tolist(), targets[t].tolist()
            if kind == "dice":
                expected = dice_of(xs, ys)
            else:
                expected = sum(PIXEL_LOSSES[kind](x, y) for x, y in zip(xs, ys)) / len(xs)
            assert got[q, t].item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("kind,cost_fn", [("focal", sigmoid_focal_cost), ("bce", bce_cost)])
def test_pairwise_costs_in_float32_at_extreme_logits(kind, cost_fn):
    """Logits of +-60 (sigmoid saturates in float32) and near 0: the float32 cost is within 1e-5 of
    the pixel loops in float64."""
    generator = torch.Generator().manual_seed(5)
    inputs = torch.cat([torch.randn(3, 8, generator=generator, dtype=torch.float64) * 60,
                        torch.randn(2, 8, generator=generator, dtype=torch.float64) * 1e-3])
    targets = (torch.rand(3, 8, generator=generator) > 0.5).double()

    def neg_log_sigmoid(x):  # -log(sigmoid(x)), stable in float64 for any x
        return math.log1p(math.exp(-x)) if x > 0 else -x + math.log1p(math.exp(x))

    def pixel(x, y):
        p = 1 / (1 + math.exp(-x))
        pos, neg = neg_log_sigmoid(x), neg_log_sigmoid(-x)  # -log(p), -log(1 - p)
        if kind == "bce":
            return y * pos + (1 - y) * neg
        return 0.25 * (1 - p) ** 2 * pos if y == 1 else 0.75 * p**2 * neg

    got = cost_fn(inputs.float(), targets.float())
    for q in range(inputs.shape[0]):
        for t in range(3):
            xs, ys = inputs[q].tolist(), targets[t].tolist()
            expected = sum(pixel(x, y) for x, y in zip(xs, ys)) / len(xs)
            assert got[q, t].item() == pytest.approx(expected, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("cost_fn", [sigmoid_focal_cost, bce_cost, brier_cost, dice_cost])
def test_builtin_costs_take_a_batch(cost_fn):
    """B x Q x P and B x T x P give each image's Q x T cost (the matcher calls them so, without vmap)."""
    generator = torch.Generator().manual_seed(6)
    inputs = torch.randn(3, 5, 40, generator=generator) * 4
    targets = (torch.rand(3, 2, 40, generator=generator) > 0.5).float()
    batched = cost_fn(inputs, targets)
    assert batched.shape == (3, 5, 2)
    for b in range(3):
        torch.testing.assert_close(batched[b], cost_fn(inputs[b], targets[b]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (0.6, 1.5), (0.4, 0.0)])
@pytest.mark.parametrize("grad", [False, True])
def test_focal_cost_alpha_gamma_against_pixel_loops(alpha, gamma, grad):
    """Both code paths (gamma 2 and any other gamma; in place without autograd, out of place with
    it) against the per-pixel focal loss written out."""
    generator = torch.Generator().manual_seed(8)
    inputs = (torch.randn(4, 6, generator=generator, dtype=torch.float64) * 3).requires_grad_(grad)
    targets = (torch.rand(3, 6, generator=generator) > 0.4).double()
    got = sigmoid_focal_cost(inputs, targets, alpha=alpha, gamma=gamma)
    assert (got.grad_fn is not None) == grad
    for q in range(4):
        for t in range(3):
            xs, ys = inputs[q].tolist(), targets[t].tolist()
            expected = sum(focal_pixel(x, y, alpha, gamma) for x, y in zip(xs, ys)) / len(xs)
            assert got[q, t].item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_focal_cost_is_differentiable():
    """Without autograd the focal cost updates its intermediates in place; with it, it is the same
    function and its gradient passes gradcheck."""
    generator = torch.Generator().manual_seed(7)
    inputs = torch.randn(3, 7, generator=generator, dtype=torch.float64, requires_grad=True)
    targets = (torch.rand(2, 7, generator=generator) > 0.5).double()
    assert torch.autograd.gradcheck(lambda x: sigmoid_focal_cost(x, targets), (inputs,))
    differentiable = sigmoid_focal_cost(inputs, targets)
    assert differentiable.grad_fn is not None
    with torch.no_grad():
        in_place = sigmoid_focal_cost(inputs, targets)
    torch.testing.assert_close(in_place, differentiable.detach())


def test_constructor_validation():
    with pytest.raises(ValueError, match="focal, bce, brier"):
        HungarianMatcher(mask_cost_type="dice")
    with pytest.raises(ValueError, match="'l1'"):
        HungarianMatcher(mask_cost_type="l1")
    with pytest.raises(ValueError, match="cost_mask must be a finite number >= 0"):
        HungarianMatcher(cost_mask=-1.0)
    with pytest.raises(ValueError, match="all 0"):
        HungarianMatcher(0.0, 0.0, 0.0)


def test_bad_targets_raise():
    generator = torch.Generator().manual_seed(0)
    outputs, targets = random_case(generator, [2, 1], 3, 3, 2, 2)
    with pytest.raises(ValueError, match="1 target dicts for a batch of 2 images"):
        HungarianMatcher()(outputs, targets[:1])
    targets[1]["labels"] = torch.tensor([3])  # K = 3 classes: labels must be < 3
    with pytest.raises(ValueError, match=r"targets\[1\]\['labels'\] must lie in \[0, 3\)"):
        HungarianMatcher()(outputs, targets)
    with pytest.raises(KeyError, match="pred_masks"):
        HungarianMatcher()({"pred_logits": outputs["pred_logits"]}, targets)


def test_matching_is_float32_under_autocast():
    # query 1 beats query 0 by a margin that bfloat16 matrix products would round away (a tie
    # that linear_sum_assignment would break in favor of query 0)
    pred_masks = torch.ones(1, 2, 8, 8)
    pred_masks[0, 1, 0, 0] = 1.05
    outputs = {"pred_logits": torch.zeros(1, 2, 3), "pred_masks": pred_masks}
    targets = [{"labels": torch.tensor([0]), "masks": torch.ones(1, 8, 8, dtype=torch.bool)}]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        src, tgt = HungarianMatcher()(outputs, targets)[0]
    assert src.tolist() == [1] and tgt.tolist() == [0]


@pytest.mark.parametrize("kind", ["focal", "bce", "brier"])
def test_batched_matching_equals_image_by_image(kind):
    # one batched cost computation for images with 5, 0, 8 and 1 targets (padded to 8), one with
    # targets of another size, against the matcher called on each image alone
    generator = torch.Generator().manual_seed(9)
    outputs, targets = random_case(generator, [5, 0, 8, 1], 10, 6, 6, 5)
    targets[3]["masks"] = torch.rand(1, 18, 10, generator=generator) > 0.5
    matcher = HungarianMatcher(1.0, 20.0, 1.0, mask_cost_type=kind)
    cost = matcher.batched_cost(outputs, targets)
    assert cost.shape == (4, 10, 8) and cost.dtype == torch.float32
    batched = matcher(outputs, targets)
    for b, target in enumerate(targets):
        alone = {key: value[b : b + 1] for key, value in outputs.items()}
        alone_cost = matcher.batched_cost(alone, [target])
        count = len(target["labels"])
        torch.testing.assert_close(cost[b, :, :count], alone_cost[0], rtol=1e-6, atol=1e-6)
        (src, tgt), (alone_src, alone_tgt) = batched[b], matcher(alone, [target])[0]
        assert src.tolist() == alone_src.tolist() and tgt.tolist() == alone_tgt.tolist(), f"image {b}"


def test_nan_in_an_image_without_targets_is_ignored():
    # image 0 has no targets: its (NaN) predictions are never matched, as before batching
    generator = torch.Generator().manual_seed(10)
    outputs, targets = random_case(generator, [0, 2], 3, 3, 2, 2)
    outputs["pred_masks"][0] = float("nan")
    indices = HungarianMatcher()(outputs, targets)
    assert len(indices[0][0]) == 0 and len(indices[1][0]) == 2


@pytest.mark.parametrize("num_points", [0, 20])
def test_torch_solver_gives_scipys_assignment(num_points):
    # continuous random costs: the optimum is unique, so both exact solvers return it
    generator = torch.Generator().manual_seed(12)
    for batch_sizes_t in ([5, 0, 8, 1], [12, 3], [0, 0]):
        outputs, targets = random_case(generator, batch_sizes_t, 10, 6, 6, 5)
        scipy_matcher = HungarianMatcher(num_points=num_points)
        torch_matcher = HungarianMatcher(num_points=num_points, solver="torch")
        torch.manual_seed(0)
        expected = scipy_matcher(outputs, targets)
        torch.manual_seed(0)
        got = torch_matcher(outputs, targets)
        for b, ((src, tgt), (src_t, tgt_t)) in enumerate(zip(expected, got)):
            assert src_t.dtype == tgt_t.dtype == torch.int64
            assert src_t.tolist() == src.tolist() and tgt_t.tolist() == tgt.tolist(), f"image {b}"


def test_torch_solver_is_optimal_on_ties():
    # class-only costs with repeated labels: several optima, the same total cost
    generator = torch.Generator().manual_seed(13)
    outputs, targets = random_case(generator, [4, 3], 5, 2, 2, 2)
    matcher = HungarianMatcher(2.0, 0.0, 0.0, solver="torch")
    check_against_brute_force(matcher, outputs, targets, (2.0, 0.0, 0.0), "focal")


def test_chunked_costs_equal_costs_over_all_pixels_at_once():
    # the built-in pointwise costs (all take a batch), each with the dice cost
    generator = torch.Generator().manual_seed(14)
    outputs, targets = random_case(generator, [3, 0, 5], 7, 4, 9, 11)
    for kind in ("focal", "bce", "brier"):
        whole = HungarianMatcher(1.0, 20.0, 1.0, mask_cost_type=kind).batched_cost(outputs, targets)
        for chunk_points in (1, 10, 98, 99, 100):  # 99 = 9 x 11 pixels
            chunked = HungarianMatcher(1.0, 20.0, 1.0, mask_cost_type=kind, chunk_points=chunk_points)
            got = chunked.batched_cost(outputs, targets)
            torch.testing.assert_close(got[0, :, :3], whole[0, :, :3], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got[2], whole[2], rtol=1e-5, atol=1e-5)


def test_chunk_points_validation_and_config_key():
    cfg = tiny_cfg()
    assert cfg.MODEL.MASK_FORMER.MATCHER_CHUNK_POINTS == 2048
    assert build_matcher(cfg).chunk_points == 2048
    cfg.MODEL.MASK_FORMER.MATCHER_CHUNK_POINTS = 0
    assert build_matcher(cfg).chunk_points == 0
    for bad in (-1, 2.5, True):
        cfg.MODEL.MASK_FORMER.MATCHER_CHUNK_POINTS = bad
        with pytest.raises(ValueError, match=rf"MATCHER_CHUNK_POINTS={bad!r}: expected an int >= 0"):
            build_matcher(cfg)
        with pytest.raises(ValueError, match=rf"chunk_points must be an int >= 0, got {bad!r}"):
            HungarianMatcher(chunk_points=bad)


def test_matcher_solver_config_key():
    cfg = tiny_cfg()
    assert cfg.MODEL.MASK_FORMER.MATCHER_SOLVER == "scipy"
    assert build_matcher(cfg).solver == "scipy"
    cfg.MODEL.MASK_FORMER.MATCHER_SOLVER = "torch"
    assert build_matcher(cfg).solver == "torch"
    cfg.MODEL.MASK_FORMER.MATCHER_SOLVER = "lapjv"
    with pytest.raises(ValueError, match=r"MATCHER_SOLVER='lapjv': expected one of 'scipy', 'torch'"):
        build_matcher(cfg)
    with pytest.raises(ValueError, match="solver must be one of 'scipy', 'torch'"):
        HungarianMatcher(solver="lapjv")


# ---------------------------------------------------------------- several decoder layers in one call
def layer_cases(generator, num_layers, batch_sizes_t, num_queries, num_classes, h, w):
    """num_layers outputs of the same shapes (decoder layers) and one set of targets."""
    layers = []
    for _ in range(num_layers):
        outputs, targets = random_case(generator, batch_sizes_t, num_queries, num_classes, h, w)
        layers.append(outputs)
    return layers, targets  # the last draw's targets, shared by all layers


@pytest.mark.parametrize("chunk_points", [0, 5])
@pytest.mark.parametrize("kind", ["focal", "bce"])
def test_layers_matched_together_against_brute_force(kind, chunk_points):
    # every pixel: each layer's assignment is the optimum of its own costs, by plain formulas
    generator = torch.Generator().manual_seed(21)
    layers, targets = layer_cases(generator, 3, [2, 0, 3], 4, 3, 3, 3)
    matcher = HungarianMatcher(1.0, 20.0, 1.0, mask_cost_type=kind, chunk_points=chunk_points)
    together = matcher(layers, targets)
    assert len(together) == 3
    for layer, outputs in enumerate(layers):
        check_against_brute_force(lambda o, t, layer=layer: together[layer], outputs, targets, (1.0, 20.0, 1.0), kind)


@pytest.mark.parametrize("solver", ["scipy", "torch"])
@pytest.mark.parametrize("num_points,chunk_points", [(0, 0), (0, 7), (30, 0), (30, 8), (30, 2048)])
def test_layers_matched_together_equal_layer_by_layer(num_points, chunk_points, solver):
    # the same assignments and costs as one call per layer; with points, the same points (on a
    # CPU, one draw for all layers gives the numbers of one draw per layer, in order)
    generator = torch.Generator().manual_seed(22)
    layers, targets = layer_cases(generator, 4, [5, 0, 3], 9, 4, 6, 5)
    matcher = HungarianMatcher(num_points=num_points, chunk_points=chunk_points, solver=solver)
    torch.manual_seed(7)
    one_by_one = [matcher(outputs, targets) for outputs in layers]
    torch.manual_seed(7)
    costs = torch.stack([matcher.batched_cost(outputs, targets) for outputs in layers])
    torch.manual_seed(7)
    together = matcher(layers, targets)
    torch.manual_seed(7)
    torch.testing.assert_close(matcher.batched_cost(layers, targets), costs, rtol=1e-5, atol=1e-5)
    for layer, (expected, got) in enumerate(zip(one_by_one, together)):
        for b, ((src, tgt), (src_g, tgt_g)) in enumerate(zip(expected, got)):
            assert src_g.tolist() == src.tolist() and tgt_g.tolist() == tgt.tolist(), (layer, b)


def test_layers_matched_together_name_the_layer_with_a_nan():
    generator = torch.Generator().manual_seed(23)
    layers, targets = layer_cases(generator, 3, [2, 2], 3, 3, 2, 2)
    layers[2]["pred_masks"][1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'mask' cost of image 1 in the batch of decoder layer 2 \(of 3"):
        HungarianMatcher()(layers, targets)


def test_layers_of_different_shapes_are_refused():
    generator = torch.Generator().manual_seed(24)
    layers, targets = layer_cases(generator, 2, [2], 3, 3, 4, 4)
    layers[1]["pred_masks"] = layers[1]["pred_masks"][..., :3]
    with pytest.raises(ValueError, match=r"HungarianMatcher \(layer 1\): the layers matched together must have"):
        HungarianMatcher()(layers, targets)
    with pytest.raises(ValueError, match="empty list"):
        HungarianMatcher()([], targets)
    with pytest.raises(TypeError, match=r"HungarianMatcher \(layer 1\): expected a dict of outputs .*got Tensor"):
        HungarianMatcher()([layers[0], layers[1]["pred_masks"]], targets)


@pytest.mark.parametrize("kind", ["focal", "bce"])
def test_layers_side_by_side_are_read_in_one_call_and_match_as_contiguous_copies(monkeypatch, kind):
    # the training path's logits of all layers lie side by side at each pixel (b x h x w x (L q)
    # memory): all layers' points are read from that memory at once, with the costs (to float
    # rounding) and assignments of the same logits copied to contiguous tensors, read layer by layer

    found = []

    def recording_interleaved_rows(tables):
        rows = interleaved_rows(tables)
        found.append(rows is not None)
        return rows

    monkeypatch.setattr(matcher_module, "interleaved_rows", recording_interleaved_rows)
    generator = torch.Generator().manual_seed(25)
    layers, targets = layer_cases(generator, 3, [4, 0, 2], 6, 4, 5, 7)
    memory = torch.stack([layer["pred_masks"] for layer in layers]).permute(1, 3, 4, 0, 2).contiguous()
    side_by_side = [dict(layer, pred_masks=maps) for layer, maps in zip(layers, memory.permute(3, 0, 4, 1, 2))]
    # in the criterion's order: the last layer first
    layers, side_by_side = [layers[2], *layers[:2]], [side_by_side[2], *side_by_side[:2]]
    matcher = HungarianMatcher(1.0, 20.0, 1.0, mask_cost_type=kind, num_points=40, chunk_points=30)
    torch.manual_seed(9)
    expected_costs = matcher.batched_cost(layers, targets)
    torch.manual_seed(9)
    expected = matcher(layers, targets)
    assert found == [False, False]
    torch.manual_seed(9)
    torch.testing.assert_close(matcher.batched_cost(side_by_side, targets), expected_costs, rtol=1e-6, atol=1e-6)
    torch.manual_seed(9)
    got = matcher(side_by_side, targets)
    assert found == [False, False, True, True]
    for layer in range(3):
        for (src, tgt), (src_g, tgt_g) in zip(expected[layer], got[layer]):
            assert src_g.tolist() == src.tolist() and tgt_g.tolist() == tgt.tolist()


@pytest.mark.parametrize("cost_fn, pixel", [(sigmoid_focal_cost, focal_pixel), (brier_cost, brier_pixel)])
def test_costs_given_the_sigmoid_use_it_and_leave_it_unchanged(cost_fn, pixel):
    # the matcher passes the dice cost's sigmoid to the mask costs that take it (MaskLossType
    # .cost_takes_prob): without autograd the focal cost updates its intermediates in place
    generator = torch.Generator().manual_seed(26)
    inputs = torch.randn(2, 3, 10, generator=generator) * 3
    targets = (torch.rand(2, 4, 10, generator=generator) > 0.5).float()
    prob = inputs.sigmoid()
    kept = prob.clone()
    with torch.no_grad():
        cost = cost_fn(inputs, targets, prob=prob)
    assert torch.equal(prob, kept)
    expected = [[[sum(pixel(x, y) for x, y in zip(inputs[b, q].tolist(), targets[b, t].tolist())) / 10
                  for t in range(4)] for q in range(3)] for b in range(2)]
    torch.testing.assert_close(cost, torch.tensor(expected), rtol=1e-5, atol=1e-6)
    # a different "sigmoid" is used as given (the costs do not recompute it)
    assert not torch.allclose(cost_fn(inputs, targets, prob=prob * 0.5), cost)
