"""SetCriterion and the matched-pair mask losses against values computed by hand."""
import math

import pytest
import torch
from torch import nn

from mask_former.modeling.criterion import SetCriterion, matched_mask_logits, matched_target_masks, without_mask_factors
from mask_former.modeling.matcher import HungarianMatcher
from mask_former.modeling.transformer_decoder.standard_transformer_decoder import StandardTransformerDecoder


# ---------------------------------------------------------------- plain formulas
def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def focal_pixel(x, y):
    p = sigmoid(x)
    return 0.25 * (1 - p) ** 2 * -math.log(p) if y == 1 else 0.75 * p**2 * -math.log(1 - p)


def bce_pixel(x, y):
    p = sigmoid(x)
    return -math.log(p) if y == 1 else -math.log(1 - p)


def brier_pixel(x, y):
    return (sigmoid(x) - y) ** 2


def dice_of(xs, ys):
    ps = [sigmoid(x) for x in xs]
    return 1 - (2 * sum(p * y for p, y in zip(ps, ys)) + 1) / (sum(ps) + sum(ys) + 1)


def mean_of(pixel_loss):
    return lambda xs, ys: sum(pixel_loss(x, y) for x, y in zip(xs, ys)) / len(xs)


PER_MASK = {
    "loss_mask": mean_of(focal_pixel),
    "loss_bce": mean_of(bce_pixel),
    "loss_brier": mean_of(brier_pixel),
    "loss_dice": dice_of,
}


def nll(logits, cls):
    return math.log(sum(math.exp(v) for v in logits)) - logits[cls]


def upsample_2x(mask):
    """Bilinear, align_corners=False, n x n -> 2n x 2n: along each axis output 2k reads
    0.25 * x[k-1] + 0.75 * x[k] and 2k+1 reads 0.75 * x[k] + 0.25 * x[k+1] (edges clamped)."""

    def axis(values):
        n = len(values)
        out = []
        for k in range(n):
            out.append(0.25 * values[max(k - 1, 0)] + 0.75 * values[k])
            out.append(0.75 * values[k] + 0.25 * values[min(k + 1, n - 1)])
        return out

    rows = [axis(row) for row in mask]
    columns = [axis([row[j] for row in rows]) for j in range(len(rows[0]))]
    return [[columns[j][i] for j in range(len(columns))] for i in range(len(columns[0]))]


def pad(mask, height, width):
    rows = [list(row) + [0] * (width - len(row)) for row in mask]
    return rows + [[0] * width for _ in range(height - len(rows))]


def flat(mask):
    return [v for row in mask for v in row]


def reference_losses(pred_logits, pred_masks, targets, indices, eos_coef, keys, num_masks):
    """Loop-by-loop losses of one layer; every argument is nested lists / Python numbers."""
    num_classes = len(pred_logits[0][0]) - 1
    matched = {}
    for b, (queries, tgts) in enumerate(indices):
        for q, t in zip(queries, tgts):
            matched[(b, q)] = t
    weighted, weights = 0.0, 0.0
    for b, image_logits in enumerate(pred_logits):
        for q, logits in enumerate(image_logits):
            cls = targets[b]["labels"][matched[(b, q)]] if (b, q) in matched else num_classes
            w = eos_coef if cls == num_classes else 1.0
            weighted += w * nll(logits, cls)
            weights += w
    losses = {"loss_ce": weighted / weights}

    height = max(len(t["masks"][0]) for t in targets if t["masks"])
    width = max(len(t["masks"][0][0]) for t in targets if t["masks"])
    for key in keys:
        total = 0.0
        for (b, q), t in matched.items():
            pred = pred_masks[b][q]
            if len(pred) != height:
                assert 2 * len(pred) == height, "the test helper upsamples by exactly 2"
                pred = upsample_2x(pred)
            xs = flat(pred)
            ys = flat(pad(targets[b]["masks"][t], height, width))
            total += PER_MASK[key](xs, ys)
        losses[key] = total / num_masks
    return losses


class FixedMatcher(nn.Module):
    """Returns the given indices and counts its calls."""

    def __init__(self, indices):
        super().__init__()
        self.indices = indices
        self.calls = 0

    def forward(self, outputs, targets):
        self.calls += 1
        return [(torch.tensor(q).long(), torch.tensor(t).long()) for q, t in self.indices]


def random_targets(generator, labels, height, width):
    """One image's targets: the given labels and random binary masks of the given size."""
    masks = torch.rand(len(labels), height, width, generator=generator) > 0.5
    return {"labels": torch.tensor(labels, dtype=torch.int64), "masks": masks}


ALL_MASK_LOSSES = ("focal", "bce", "brier", "dice")


def as_lists(targets):
    return [{"labels": t["labels"].tolist(), "masks": t["masks"].int().tolist()} for t in targets]


def assert_losses(got, expected):
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key].dtype == torch.float32, key
        assert got[key].item() == pytest.approx(value, rel=1e-5, abs=1e-6), key


# ---------------------------------------------------------------- tests
def test_hand_computed_single_query_pair():
    # K = 2 classes; query 0 predicts class 1 and a mask close to the target, query 1 "no object"
    pred_logits = torch.tensor([[[0.5, 2.0, -1.0], [0.2, -0.3, 1.5]]])
    pred_masks = torch.tensor([[[[2.0, -1.0], [0.5, 1.0]], [[-3.0, -3.0], [-3.0, -3.0]]]])
    target_mask = torch.tensor([[[True, False], [False, True]]])
    targets = [{"labels": torch.tensor([1]), "masks": target_mask}]
    criterion = SetCriterion(2, HungarianMatcher(), 0.1, mask_losses=ALL_MASK_LOSSES)
    losses = criterion({"pred_logits": pred_logits, "pred_masks": pred_masks}, targets)

    # the matcher pairs query 0 with the target; pixels (logit, target): (2,1) (-1,0) (0.5,0) (1,1)
    p0 = 1 / (1 + math.exp(-2.0))
    p1 = 1 / (1 + math.exp(1.0))
    p2 = 1 / (1 + math.exp(-0.5))
    p3 = 1 / (1 + math.exp(-1.0))
    bce = (-math.log(p0) - math.log(1 - p1) - math.log(1 - p2) - math.log(p3)) / 4
    focal = (
        0.25 * (1 - p0) ** 2 * -math.log(p0)
        + 0.75 * p1**2 * -math.log(1 - p1)
        + 0.75 * p2**2 * -math.log(1 - p2)
        + 0.25 * (1 - p3) ** 2 * -math.log(p3)
    ) / 4
    brier = ((p0 - 1) ** 2 + p1**2 + p2**2 + (p3 - 1) ** 2) / 4
    dice = 1 - (2 * (p0 + p3) + 1) / (p0 + p1 + p2 + p3 + 2 + 1)
    # query 0 -> class 1 (weight 1), query 1 -> no object = class 2 (weight 0.1)
    nll_0 = math.log(math.exp(0.5) + math.exp(2.0) + math.exp(-1.0)) - 2.0
    nll_1 = math.log(math.exp(0.2) + math.exp(-0.3) + math.exp(1.5)) - 1.5
    ce = (1.0 * nll_0 + 0.1 * nll_1) / (1.0 + 0.1)

    expected = {"loss_ce": ce, "loss_mask": focal, "loss_bce": bce, "loss_brier": brier}
    expected["loss_dice"] = dice
    assert_losses(losses, expected)


def test_no_object_weighting_is_a_weighted_mean():
    # 4 queries, 1 target matched to query 2; the 3 unmatched queries count with weight 0.1
    rows = [[1.0, 0.0, -1.0], [0.3, 0.3, 0.3], [-2.0, 2.0, 0.0], [0.0, 1.0, 3.0]]
    outputs = {"pred_logits": torch.tensor([rows]), "pred_masks": torch.zeros(1, 4, 2, 2)}
    targets = [{"labels": torch.tensor([1]), "masks": torch.ones(1, 2, 2, dtype=torch.bool)}]
    criterion = SetCriterion(2, FixedMatcher([([2], [0])]), 0.1, mask_losses=("dice",))
    losses = criterion(outputs, targets)

    def log_sum_exp(row):
        return math.log(sum(math.exp(v) for v in row))

    expected = (
        0.1 * (log_sum_exp(rows[0]) - rows[0][2])
        + 0.1 * (log_sum_exp(rows[1]) - rows[1][2])
        + 1.0 * (log_sum_exp(rows[2]) - rows[2][1])
        + 0.1 * (log_sum_exp(rows[3]) - rows[3][2])
    ) / (0.1 + 0.1 + 1.0 + 0.1)
    assert losses["loss_ce"].item() == pytest.approx(expected, rel=1e-6)
    # an all-zero prediction (p = 0.5 everywhere) against an all-ones 2 x 2 target
    assert losses["loss_dice"].item() == pytest.approx(1 - (2 * 2.0 + 1) / (2.0 + 4 + 1), rel=1e-6)


def test_upsampled_predictions_and_padded_targets():
    # predictions 2 x 2; image 0 has 4 x 4 targets, image 1 has 3 x 4 targets padded to 4 x 4
    generator = torch.Generator().manual_seed(0)
    pred_logits = torch.randn(2, 3, 4, generator=generator, requires_grad=True)
    pred_masks = (torch.randn(2, 3, 2, 2, generator=generator) * 2).requires_grad_()
    targets = [random_targets(generator, [2], 4, 4), random_targets(generator, [0, 1], 3, 4)]
    indices = [([2], [0]), ([0, 1], [1, 0])]
    criterion = SetCriterion(3, FixedMatcher(indices), 0.1, mask_losses=ALL_MASK_LOSSES)
    losses = criterion({"pred_logits": pred_logits, "pred_masks": pred_masks}, targets)

    expected = reference_losses(
        pred_logits.tolist(), pred_masks.tolist(), as_lists(targets), indices, 0.1,
        ["loss_mask", "loss_bce", "loss_brier", "loss_dice"], num_masks=3,
    )
    assert_losses(losses, expected)

    sum(losses.values()).backward()
    assert pred_masks.grad is not None and pred_masks.grad.abs().sum() > 0
    assert pred_logits.grad is not None and pred_logits.grad.abs().sum() > 0
    # query 2 of image 1 is unmatched: its mask gets no gradient
    assert pred_masks.grad[1, 2].abs().sum() == 0


@pytest.mark.parametrize("second_dtype", [torch.float32, torch.bool])
def test_matched_target_masks_in_match_order_padded_to_the_largest_image(second_dtype):
    # image 0: three 2 x 3 masks whose pixels count up (mask t holds 100 t + 0..5); image 1: two
    # 3 x 2 masks; the batch's size is 3 x 3
    first = (torch.arange(6.0).view(1, 2, 3) + 100 * torch.arange(3.0).view(3, 1, 1))
    second = torch.tensor([[[1, 0], [0, 1], [1, 1]], [[0, 0], [1, 0], [0, 0]]]).to(second_dtype)
    targets = [{"masks": first}, {"masks": second}]
    indices = [(torch.tensor([0, 4]), torch.tensor([2, 0])), (torch.tensor([1]), torch.tensor([1]))]
    got = matched_target_masks(targets, indices, torch.device("cpu"))
    expected = torch.zeros(3, 3, 3)
    expected[0, :2, :3] = torch.arange(6.0).view(2, 3) + 200
    expected[1, :2, :3] = torch.arange(6.0).view(2, 3)
    expected[2, :3, :2] = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    # one size for the batch: the same masks, nothing padded
    same_size = matched_target_masks([{"masks": first}, {"masks": first.flip(0)}], indices, torch.device("cpu"))
    assert torch.equal(same_size, torch.stack([first[2], first[0], first[1]]))
    # no matches at all
    empty = [(torch.tensor([], dtype=torch.int64), torch.tensor([], dtype=torch.int64))] * 2
    assert matched_target_masks(targets, empty, torch.device("cpu")).shape == (0, 3, 3)


def outputs_with_aux(generator, num_images, num_queries, num_logits, height, width, num_aux,
                     logit_scale=1.0, mask_scale=1.0):
    """Random outputs of the last decoder layer plus ``num_aux`` earlier layers' in
    ``aux_outputs`` (each layer's logits drawn before its masks, the last layer's first)."""

    def layer():
        return {
            "pred_logits": torch.randn(num_images, num_queries, num_logits, generator=generator) * logit_scale,
            "pred_masks": torch.randn(num_images, num_queries, height, width, generator=generator) * mask_scale,
        }

    outputs = layer()
    outputs["aux_outputs"] = [layer() for _ in range(num_aux)]
    return outputs


def test_aux_outputs_get_suffixed_keys():
    generator = torch.Generator().manual_seed(1)
    outputs = outputs_with_aux(generator, 1, 3, 3, 2, 2, num_aux=2)
    targets = [random_targets(generator, [0, 1], 4, 4)]
    indices = [([1, 2], [0, 1])]
    matcher = FixedMatcher(indices)
    losses = SetCriterion(2, matcher, 0.1)(outputs, targets)

    assert matcher.calls == 3
    expected = {}
    layers = [("", outputs), ("_0", outputs["aux_outputs"][0]), ("_1", outputs["aux_outputs"][1])]
    for suffix, layer_outputs in layers:
        layer_losses = reference_losses(
            layer_outputs["pred_logits"].tolist(), layer_outputs["pred_masks"].tolist(),
            as_lists(targets), indices, 0.1, ["loss_mask", "loss_dice"], num_masks=2,
        )
        expected.update({key + suffix: value for key, value in layer_losses.items()})
    assert set(expected) == {
        "loss_ce", "loss_mask", "loss_dice",
        "loss_ce_0", "loss_mask_0", "loss_dice_0",
        "loss_ce_1", "loss_mask_1", "loss_dice_1",
    }
    assert_losses(losses, expected)


def test_matcher_gets_all_layers_in_one_call():
    # HungarianMatcher matches all decoder layers together (one call, one batched cost); each
    # layer's losses use that layer's own assignment, the one a call for it alone gives (the three
    # layers' assignments differ here, so layers mixed up would change the losses)
    generator = torch.Generator().manual_seed(8)
    outputs = outputs_with_aux(generator, 2, 4, 3, 2, 2, num_aux=2, logit_scale=3.0, mask_scale=3.0)
    targets = [random_targets(generator, [0, 1], 4, 4), random_targets(generator, [1], 4, 4)]
    matcher = HungarianMatcher()
    calls = []
    matcher.register_forward_pre_hook(lambda module, args: calls.append(args[0]))
    losses = SetCriterion(2, matcher, 0.1)(outputs, targets)
    assert len(calls) == 1 and isinstance(calls[0], list) and len(calls[0]) == 3

    expected = {}
    layers = [("", outputs), ("_0", outputs["aux_outputs"][0]), ("_1", outputs["aux_outputs"][1])]
    for suffix, layer_outputs in layers:
        alone = HungarianMatcher()({k: layer_outputs[k] for k in ("pred_logits", "pred_masks")}, targets)
        indices = [(src.tolist(), tgt.tolist()) for src, tgt in alone]
        layer_losses = reference_losses(
            layer_outputs["pred_logits"].tolist(), layer_outputs["pred_masks"].tolist(),
            as_lists(targets), indices, 0.1, ["loss_mask", "loss_dice"], num_masks=3,
        )
        expected.update({key + suffix: value for key, value in layer_losses.items()})
    assert_losses(losses, expected)


def test_selected_mask_losses_only():
    generator = torch.Generator().manual_seed(2)
    outputs = {
        "pred_logits": torch.randn(1, 2, 3, generator=generator),
        "pred_masks": torch.randn(1, 2, 3, 3, generator=generator),
    }
    targets = [random_targets(generator, [1], 3, 3)]
    indices = [([1], [0])]
    criterion = SetCriterion(2, FixedMatcher(indices), 0.5, mask_losses=["bce", "brier"])
    losses = criterion(outputs, targets)
    expected = reference_losses(
        outputs["pred_logits"].tolist(), outputs["pred_masks"].tolist(), as_lists(targets),
        indices, 0.5, ["loss_bce", "loss_brier"], num_masks=1,
    )
    assert set(losses) == {"loss_ce", "loss_bce", "loss_brier"}
    assert_losses(losses, expected)


def test_empty_weight_buffer_name_and_value():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.criterion = SetCriterion(3, HungarianMatcher(), 0.1)

    state = Model().state_dict()
    assert list(state) == ["criterion.empty_weight"]
    assert state["criterion.empty_weight"].tolist() == pytest.approx([1.0, 1.0, 1.0, 0.1])


def test_batch_without_targets():
    generator = torch.Generator().manual_seed(3)
    pred_logits = torch.randn(2, 3, 3, generator=generator)
    pred_masks = torch.randn(2, 3, 2, 2, generator=generator, requires_grad=True)
    targets = [random_targets(generator, [], 4, 4) for _ in range(2)]
    criterion = SetCriterion(2, HungarianMatcher(), 0.1)
    losses = criterion({"pred_logits": pred_logits, "pred_masks": pred_masks}, targets)
    # every query -> "no object" (class 2), all weights equal: a plain mean
    rows = [row for image in pred_logits.tolist() for row in image]
    assert losses["loss_ce"].item() == pytest.approx(sum(nll(row, 2) for row in rows) / 6, rel=1e-6)
    assert losses["loss_mask"].item() == 0 and losses["loss_dice"].item() == 0
    (losses["loss_mask"] + losses["loss_dice"]).backward()
    assert pred_masks.grad is not None and pred_masks.grad.abs().sum() == 0


def test_half_inputs_give_float32_losses():
    generator = torch.Generator().manual_seed(4)
    outputs = {
        "pred_logits": torch.randn(1, 3, 3, generator=generator).half(),
        "pred_masks": torch.randn(1, 3, 2, 2, generator=generator).half(),
    }
    targets = [random_targets(generator, [0, 1], 4, 4)]
    indices = [([0, 2], [1, 0])]
    losses = SetCriterion(2, FixedMatcher(indices), 0.1)(outputs, targets)
    expected = reference_losses(
        outputs["pred_logits"].float().tolist(), outputs["pred_masks"].float().tolist(),
        as_lists(targets), indices, 0.1, ["loss_mask", "loss_dice"], num_masks=2,
    )
    assert_losses(losses, expected)


@pytest.mark.parametrize("others,expected_num_masks", [(3.0, 2.0), (0.0, 1.0)])
def test_num_masks_is_averaged_over_processes(monkeypatch, others, expected_num_masks):
    # 2 processes; this one has 1 target, the other `others`: num_masks = (1 + others) / 2, >= 1
    import detectron2.utils.comm as comm

    def fake_all_reduce(tensor):
        tensor += others

    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce", fake_all_reduce)

    generator = torch.Generator().manual_seed(5)
    outputs = {
        "pred_logits": torch.randn(1, 2, 3, generator=generator),
        "pred_masks": torch.randn(1, 2, 2, 2, generator=generator),
    }
    targets = [random_targets(generator, [1], 2, 2)]
    indices = [([0], [0])]
    losses = SetCriterion(2, FixedMatcher(indices), 0.1)(outputs, targets)
    expected = reference_losses(
        outputs["pred_logits"].tolist(), outputs["pred_masks"].tolist(), as_lists(targets),
        indices, 0.1, ["loss_mask", "loss_dice"], num_masks=expected_num_masks,
    )
    assert_losses(losses, expected)


def test_constructor_validation():
    matcher = HungarianMatcher()
    with pytest.raises(ValueError, match=r"'l1'.*focal, bce, brier, dice"):
        SetCriterion(2, matcher, 0.1, mask_losses=("focal", "l1"))
    with pytest.raises(ValueError, match="non-empty"):
        SetCriterion(2, matcher, 0.1, mask_losses=())
    with pytest.raises(ValueError, match="non-empty list"):
        SetCriterion(2, matcher, 0.1, mask_losses="focal")
    with pytest.raises(ValueError, match="duplicate"):
        SetCriterion(2, matcher, 0.1, mask_losses=("dice", "dice"))
    with pytest.raises(ValueError, match="num_classes must be an int >= 1"):
        SetCriterion(0, matcher, 0.1)
    with pytest.raises(ValueError, match="eos_coef must be a finite number >= 0"):
        SetCriterion(2, matcher, -0.1)


def test_forward_validation():
    criterion = SetCriterion(2, HungarianMatcher(), 0.1)
    targets = [{"labels": torch.tensor([1]), "masks": torch.ones(1, 2, 2, dtype=torch.bool)}]
    good = {"pred_logits": torch.zeros(1, 2, 3), "pred_masks": torch.zeros(1, 2, 2, 2)}
    message = r"4 class scores per query, expected num_classes \+ 1 = 3"
    with pytest.raises(ValueError, match=message):
        criterion({"pred_logits": torch.zeros(1, 2, 4), "pred_masks": good["pred_masks"]}, targets)
    with pytest.raises(KeyError, match=r"aux_outputs\[0\].*'pred_masks'"):
        criterion(dict(good, aux_outputs=[{"pred_logits": good["pred_logits"]}]), targets)
    with pytest.raises(ValueError, match=r"targets\[0\]\['labels'\] must lie in \[0, 2\)"):
        criterion(good, [{"labels": torch.tensor([2]), "masks": targets[0]["masks"]}])
    with pytest.raises(ValueError, match=r"T = 1"):
        criterion(good, [{"labels": torch.tensor([1]), "masks": torch.ones(2, 2, 2)}])


def test_losses_are_float32_under_autocast():
    generator = torch.Generator().manual_seed(6)
    outputs = {
        "pred_logits": torch.randn(1, 3, 3, generator=generator),
        "pred_masks": torch.randn(1, 3, 4, 4, generator=generator),
    }
    targets = [random_targets(generator, [0, 1], 8, 8)]
    indices = [([0, 2], [1, 0])]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = SetCriterion(2, FixedMatcher(indices), 0.1)(outputs, targets)
    # 4 x 4 predictions upsampled 2x by the hand formula
    expected = reference_losses(
        outputs["pred_logits"].tolist(), outputs["pred_masks"].tolist(), as_lists(targets),
        indices, 0.1, ["loss_mask", "loss_dice"], num_masks=2,
    )
    assert_losses(losses, expected)


# ---------------------------------------------------------------- the factors of the mask logits
def factored_outputs(generator, num_images, num_queries, num_logits, channels, height, width, num_layers,
                     channels_last=False, shared_features=True, dtype=torch.float64):
    """Outputs of ``num_layers`` decoder layers (the last one's at the top, the others in
    ``aux_outputs``) whose masks are ``einsum("bqc,bchw->bqhw")`` of per-layer embeddings and
    features (shared by the layers, as MaskFormer's decoder gives them), all leaves with gradients."""
    embeds = [torch.randn(num_images, num_queries, channels, generator=generator, dtype=dtype).requires_grad_()
              for _ in range(num_layers)]
    features = [torch.randn(num_images, channels, height, width, generator=generator, dtype=dtype)
                for _ in range(1 if shared_features else num_layers)]
    if channels_last:
        features = [f.contiguous(memory_format=torch.channels_last) for f in features]
    features = [f.requires_grad_() for f in features]
    layers = []
    for i, embed in enumerate(embeds):
        layer_features = features[0 if shared_features else i]
        layers.append({
            "pred_logits": torch.randn(num_images, num_queries, num_logits, generator=generator, dtype=dtype),
            "pred_masks": torch.einsum("bqc,bchw->bqhw", embed, layer_features),
            "mask_embed": embed,
            "mask_features": layer_features,
        })
    outputs = dict(layers[-1], aux_outputs=layers[:-1])
    return outputs, embeds + features


def losses_and_grads(criterion, outputs, targets, leaves, seed=0):
    torch.manual_seed(seed)  # the same sampled points for both ways
    losses = criterion(outputs, targets)
    return losses, torch.autograd.grad(sum(losses.values()), leaves, retain_graph=True)


@pytest.mark.parametrize("num_points", [0, 20])
@pytest.mark.parametrize("channels_last", [False, True])
def test_mask_factors_give_the_losses_and_gradients_of_their_product(num_points, channels_last):
    # with mask_embed / mask_features the matched logits are recomputed from them; the losses
    # and every gradient equal those of the masks' own graph (the factors dropped), the second
    # image without targets
    generator = torch.Generator().manual_seed(11)
    outputs, leaves = factored_outputs(generator, 3, 5, 4, 6, 6, 7, num_layers=3, channels_last=channels_last)
    targets = [random_targets(generator, [0, 2, 1], 12, 14), random_targets(generator, [], 12, 14),
               random_targets(generator, [2], 10, 14)]
    criterion = SetCriterion(3, HungarianMatcher(), 0.1, mask_losses=ALL_MASK_LOSSES, num_points=num_points)
    losses, grads = losses_and_grads(criterion, outputs, targets, leaves)
    ref_losses, ref_grads = losses_and_grads(criterion, without_mask_factors(outputs), targets, leaves)
    assert set(losses) == set(ref_losses) and len(losses) == 3 * 5
    for key in ref_losses:
        torch.testing.assert_close(losses[key], ref_losses[key], rtol=1e-6, atol=1e-6, msg=key)
    for grad, ref_grad in zip(grads, ref_grads):
        assert ref_grad.abs().max() > 0
        torch.testing.assert_close(grad, ref_grad.to(grad.dtype), rtol=1e-6, atol=1e-9)
    if num_points == 0:  # and the loop reference, by hand
        matched = HungarianMatcher()({k: outputs[k] for k in ("pred_logits", "pred_masks")}, targets)
        indices = [(src.tolist(), tgt.tolist()) for src, tgt in matched]
        expected = reference_losses(
            outputs["pred_logits"].tolist(), outputs["pred_masks"].tolist(), as_lists(targets), indices, 0.1,
            ["loss_mask", "loss_bce", "loss_brier", "loss_dice"], num_masks=4,
        )
        for key, value in expected.items():
            assert losses[key].item() == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_mask_factors_keep_the_backward_off_the_full_logits():
    # the losses' gradient reaches the factors without passing through pred_masks (all Q queries
    # at every pixel); without the factors it does
    generator = torch.Generator().manual_seed(12)
    outputs, leaves = factored_outputs(generator, 2, 6, 3, 4, 5, 5, num_layers=2)
    targets = [random_targets(generator, [0, 1], 5, 5), random_targets(generator, [1], 5, 5)]
    layers = [outputs] + outputs["aux_outputs"]
    reached = []
    for layer in layers:
        layer["pred_masks"].register_hook(lambda grad: reached.append(grad))
    criterion = SetCriterion(2, HungarianMatcher(), 0.1, num_points=10)
    losses_and_grads(criterion, outputs, targets, leaves)
    assert reached == []
    losses_and_grads(criterion, without_mask_factors(outputs), targets, leaves)
    assert len(reached) == 2


def test_mask_factors_of_separate_features_fall_back_to_the_masks():
    # layers with features of their own (not the one product per image): pred_masks indexed
    generator = torch.Generator().manual_seed(13)
    outputs, leaves = factored_outputs(generator, 2, 4, 3, 5, 4, 6, num_layers=2, shared_features=False)
    targets = [random_targets(generator, [0, 1], 8, 12), random_targets(generator, [1], 8, 12)]
    criterion = SetCriterion(2, HungarianMatcher(), 0.1)
    losses, grads = losses_and_grads(criterion, outputs, targets, leaves)
    ref_losses, ref_grads = losses_and_grads(criterion, without_mask_factors(outputs), targets, leaves)
    for key in ref_losses:
        torch.testing.assert_close(losses[key], ref_losses[key], rtol=0, atol=0, msg=key)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matched_mask_logits_in_the_dtype_of_the_masks(dtype):
    # the matched rows of each layer, image by image, as pred_masks indexed (whose product was in
    # ``dtype``, as under autocast); float32 results
    generator = torch.Generator().manual_seed(14)
    outputs, _ = factored_outputs(generator, 2, 7, 3, 16, 8, 9, num_layers=3, dtype=dtype)
    layers = [outputs] + outputs["aux_outputs"]
    layer_indices = [
        [(torch.tensor([3, 0, 6]), torch.tensor([0, 1, 2])), (torch.tensor([5]), torch.tensor([0]))],
        [(torch.tensor([], dtype=torch.int64), torch.tensor([], dtype=torch.int64)),
         (torch.tensor([1, 2]), torch.tensor([1, 0]))],
        [(torch.tensor([4]), torch.tensor([0])), (torch.tensor([], dtype=torch.int64),) * 2],
    ]
    got = matched_mask_logits(layers, layer_indices)
    for layer, indices, logits in zip(layers, layer_indices, got):
        expected = torch.cat([layer["pred_masks"][image, queries] for image, (queries, _) in enumerate(indices)])
        assert logits.dtype == torch.float32 and logits.shape == expected.shape
        tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 5e-2}
        torch.testing.assert_close(logits, expected.float(), **tolerance)
    with pytest.raises(ValueError, match=r"got 3 layers' outputs but 2 layers' indices"):
        matched_mask_logits(layers, layer_indices[:2])


def test_mask_factors_are_checked():
    criterion = SetCriterion(2, HungarianMatcher(), 0.1)
    targets = [{"labels": torch.tensor([1]), "masks": torch.ones(1, 4, 4, dtype=torch.bool)}]
    good = {"pred_logits": torch.zeros(1, 2, 3), "pred_masks": torch.zeros(1, 2, 4, 4),
            "mask_embed": torch.zeros(1, 2, 5), "mask_features": torch.zeros(1, 5, 4, 4)}
    criterion(good, targets)
    with pytest.raises(KeyError, match=r"'mask_embed' but not its other factor"):
        criterion({k: v for k, v in good.items() if k != "mask_features"}, targets)
    with pytest.raises(ValueError, match=r"aux_outputs\[0\].*mask_features \(1, 5, 2, 2\)"):
        criterion(dict(good, aux_outputs=[dict(good, mask_features=torch.zeros(1, 5, 2, 2))]), targets)
    with pytest.raises(ValueError, match=r"mask_embed \(1, 2, 6\)"):
        criterion(dict(good, mask_embed=torch.zeros(1, 2, 6)), targets)


def test_transformer_decoder_gives_the_factors_of_its_masks_in_training():
    decoder = StandardTransformerDecoder(
        in_channels=8, mask_classification=True, num_classes=3, hidden_dim=16, num_queries=5, nheads=2,
        dropout=0.0, dim_feedforward=32, enc_layers=0, dec_layers=3, pre_norm=False, deep_supervision=True,
        mask_dim=6, enforce_input_project=False,
    )
    torch.manual_seed(0)
    x, mask_features = torch.randn(2, 8, 3, 3), torch.randn(2, 6, 7, 5)
    outputs = decoder.train()(x, mask_features)
    layers = [outputs] + outputs["aux_outputs"]
    assert len(layers) == 3
    for layer in layers:
        assert layer["mask_features"] is mask_features and layer["mask_embed"].shape == (2, 5, 6)
        torch.testing.assert_close(
            layer["pred_masks"], torch.einsum("bqc,bchw->bqhw", layer["mask_embed"], mask_features)
        )
    with torch.no_grad():
        assert not set(decoder.eval()(x, mask_features)) & {"mask_embed", "mask_features"}
