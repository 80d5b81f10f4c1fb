"""Panoptic SegFormer's optional additions to the publication: thing queries placed on the
encoder's proposals (anchors, distinct top-k selection, their losses) and the IoU-aware class loss.
Each is checked against values worked out by hand or a brute-force reference."""
import math

import pytest
import torch
from detectron2.modeling import build_model

from mask_former.layers import flatten_levels
from mask_former.modeling.panoptic_segformer import PanopticSegFormerCriterion
from mask_former.modeling.panoptic_segformer.query_selection import (
    ANCHOR_SIDE,
    EncoderProposals,
    distinct_top_k,
    proposal_anchors,
)
from test_panoptic_segformer import focal, make_batch, psf_cfg


def test_proposal_anchors_by_hand():
    """Two levels (2 x 4 and 1 x 2 tokens); image 1 is padded on the right half of each level."""
    features = [torch.zeros(2, 1, 2, 4), torch.zeros(2, 1, 1, 2)]
    masks = [torch.zeros(2, 2, 4, dtype=torch.bool), torch.zeros(2, 1, 2, dtype=torch.bool)]
    masks[0][1, :, 2:] = True
    masks[1][1, :, 1:] = True
    anchors, valid = proposal_anchors(flatten_levels(features, masks))
    assert anchors.shape == (2, 8 + 2, 4)
    # image 0, level 0, row 1, column 2: centre ((2 + 0.5) / 4, (1 + 0.5) / 2), side 0.05
    torch.testing.assert_close(anchors[0, 6], torch.tensor([2.5 / 4, 1.5 / 2, ANCHOR_SIDE, ANCHOR_SIDE]))
    # image 1 has 2 valid columns of level 0: its column 1 is at (1 + 0.5) / 2 of the image
    torch.testing.assert_close(anchors[1, 1], torch.tensor([1.5 / 2, 0.5 / 2, ANCHOR_SIDE, ANCHOR_SIDE]))
    # level 1, image 0, column 1: side doubled
    torch.testing.assert_close(anchors[0, 9], torch.tensor([1.5 / 2, 0.5, 2 * ANCHOR_SIDE, 2 * ANCHOR_SIDE]))
    assert valid[0].all()
    # image 1: the padded tokens (level 0 columns 2-3, level 1 column 1) are not valid
    assert valid[1].tolist() == [True, True, False, False, True, True, False, False, True, False]


def greedy_nms_top_k(scores, boxes, k, threshold):
    """Brute force: visit the boxes by descending score, keep one unless its IoU with a kept one
    exceeds the threshold; then top up with the best suppressed ones."""
    def iou(a, b):
        ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
        bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
        inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
        return inter / (a[2] * a[3] + b[2] * b[3] - inter)

    order = sorted((i for i in range(len(scores)) if math.isfinite(scores[i])), key=lambda i: -scores[i])
    kept, suppressed = [], []
    for i in order:
        (suppressed if any(iou(boxes[i], boxes[j]) > threshold for j in kept) else kept).append(i)
    return (kept + suppressed)[:k]


@pytest.mark.parametrize("seed", range(5))
def test_distinct_top_k_matches_greedy_nms(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(2, 40, generator=g)
    scores[1, :5] = float("-inf")  # never taken
    centres = torch.rand(2, 40, 2, generator=g) * 0.5 + 0.25  # crowded, so that many overlap
    sides = torch.rand(2, 40, 2, generator=g) * 0.3 + 0.1
    boxes = torch.cat([centres, sides], -1)
    for threshold, k in ((0.3, 12), (0.7, 12), (0.3, 30)):
        selected = distinct_top_k(scores, boxes, k, threshold)
        for b in range(2):
            expected = greedy_nms_top_k(scores[b].tolist(), boxes[b].tolist(), k, threshold)
            assert selected[b].tolist() == expected, (threshold, k, b)


@pytest.mark.parametrize("spread", [0.9, 0.05])
def test_distinct_top_k_of_many_tokens_matches_greedy_nms(spread):
    """300 tokens, k = 10: spread-out boxes survive among the best 4k (NMS need not see the rest);
    boxes crowded on one spot do not, so more are visited, down to the suppressed ones' top-up.
    Tied scores are taken by index, as the brute force's stable sort does."""
    g = torch.Generator().manual_seed(7)
    scores = torch.rand(1, 300, generator=g)
    scores[0, 100:120] = scores[0, 3]  # ties with one of the best
    centres = torch.rand(1, 300, 2, generator=g) * spread + (1 - spread) / 2
    sides = torch.rand(1, 300, 2, generator=g) * 0.1 + 0.1
    boxes = torch.cat([centres, sides], -1)
    for threshold in (0.1, 0.5):
        expected = greedy_nms_top_k(scores[0].tolist(), boxes[0].tolist(), 10, threshold)
        assert distinct_top_k(scores, boxes, 10, threshold)[0].tolist() == expected, threshold


def test_distinct_top_k_names_too_few_tokens():
    scores = torch.full((1, 4), float("-inf"))
    scores[0, :2] = 1.0
    with pytest.raises(ValueError, match="2 valid encoder tokens for 3 thing queries.*NUM_THING_QUERIES"):
        distinct_top_k(scores, torch.full((1, 4, 4), 0.5), 3, 0.7)


def test_encoder_proposals_select_their_best_tokens():
    torch.manual_seed(0)
    proposals = EncoderProposals(hidden_dim=8, num_classes=3, num_queries=4, nms_threshold=1.0)
    memory = flatten_levels([torch.randn(2, 8, 4, 4), torch.randn(2, 8, 2, 2)])
    logits, boxes = proposals(memory)
    assert logits.shape == (2, 4, 3) and boxes.shape == (2, 4, 4)
    all_logits = proposals.class_branch(proposals.output_norm(proposals.output(memory.tokens)))
    best = all_logits.max(-1).values.topk(4, dim=1).values  # no suppression at threshold 1
    torch.testing.assert_close(logits.max(-1).values, best)
    # the box branch starts at zero: the boxes are the anchors
    anchors, _ = proposal_anchors(memory)
    chosen = all_logits.max(-1).values.topk(4, dim=1).indices
    torch.testing.assert_close(boxes, torch.gather(anchors, 1, chosen[..., None].expand(-1, -1, 4)))
    with pytest.raises(ValueError, match="THING_QUERY_NMS_THRESHOLD=0"):
        EncoderProposals(hidden_dim=8, num_classes=3, num_queries=4, nms_threshold=0)


def bce(x, y):
    p = 1 / (1 + math.exp(-x))
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def negative(x, alpha=0.25, gamma=2.0):
    p = 1 / (1 + math.exp(-x))
    return (1 - alpha) * p ** gamma * -math.log(1 - p)


def hand_built_outputs():
    """The case of test_panoptic_segformer.test_full_loss_on_a_hand_built_case, with encoder
    proposals: one image, one thing (class 1 of 2), two thing queries."""
    tgt_mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    tgt_mask[0, 1:3, 1:3] = True
    target = {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]]), "masks": tgt_mask,
              "stuff_labels": torch.tensor([1]), "stuff_masks": ~tgt_mask}
    thing_masks = torch.full((1, 2, 4, 4), -2.0)
    thing_masks[0, 0, 1:3, 1:3] = 2.0
    thing_masks[0, 0, 0, 0] = 2.0  # 5 pixels predicted, 4 of them right: mask IoU 4 / 5
    outputs = {"location": {"pred_logits": [torch.tensor([[[0.0, 2.0], [-1.0, -3.0]]])],
                            "pred_boxes": [torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.1, 0.1, 0.1, 0.1]]])],
                            "encoder": {"pred_logits": torch.tensor([[[-2.0, 0.5], [1.0, -1.0]]]),
                                        "pred_boxes": torch.tensor([[[0.5, 0.5, 0.4, 0.2], [0.9, 0.9, 0.1, 0.1]]])}},
               "masks": {"things": [{"pred_logits": torch.tensor([[[0.5, 1.0], [0.0, 0.0]]]),
                                     "pred_masks": thing_masks}],
                         "stuff": [{"pred_logits": torch.tensor([[[-1.0], [1.5]]]),
                                    "pred_masks": torch.zeros(1, 2, 4, 4)}]}}
    return outputs, target


def test_iou_aware_class_loss_on_a_hand_built_case():
    outputs, target = hand_built_outputs()
    criterion = PanopticSegFormerCriterion(class_weight=2.0, l1_weight=5.0, giou_weight=2.0, dice_weight=2.0,
                                           class_loss="iou_aware")
    losses = criterion(outputs, [target])
    # location decoder: query 0 matched to class 1; its box [0.4, 0.3, 0.6, 0.7] has IoU 0.08 / 0.16
    # with [0.3, 0.3, 0.7, 0.7]
    expected = bce(2.0, 0.5) + negative(0.0) + negative(-1.0) + negative(-3.0)
    assert losses["loss_loc_class_0"].item() == pytest.approx(expected, rel=1e-5)
    # thing mask decoder: query 0's mask (logit > 0) has IoU 4 / 5 with the target
    expected = bce(1.0, 0.8) + negative(0.5) + negative(0.0) + negative(0.0)
    assert losses["loss_thing_class_0"].item() == pytest.approx(expected, rel=1e-5)
    # the box and mask losses are the focal criterion's
    focal = PanopticSegFormerCriterion(class_weight=2.0, l1_weight=5.0, giou_weight=2.0, dice_weight=2.0)
    focal_losses = focal(outputs, [target])
    for name in ("loss_loc_l1_0", "loss_loc_giou_0", "loss_thing_dice_0", "loss_stuff_class_0"):
        assert losses[name].item() == pytest.approx(focal_losses[name].item(), rel=1e-6), name
    with pytest.raises(ValueError, match="CLASS_LOSS='iou'.*focal.*iou_aware"):
        PanopticSegFormerCriterion(class_weight=2.0, l1_weight=5.0, giou_weight=2.0, dice_weight=2.0,
                                   class_loss="iou")


def test_encoder_proposal_losses_on_a_hand_built_case():
    outputs, target = hand_built_outputs()
    criterion = PanopticSegFormerCriterion(class_weight=2.0, l1_weight=5.0, giou_weight=2.0, dice_weight=2.0)
    losses = criterion(outputs, [target])

    # proposal 0 (box [0.3, 0.4, 0.7, 0.6], inside the target's) is the match: L1 0.2, IoU 0.08 / 0.16,
    # hull = the target's box
    assert losses["loss_enc_class"].item() == pytest.approx(
        focal(-2.0, 0) + focal(0.5, 1) + focal(1.0, 0) + focal(-1.0, 0), rel=1e-5)
    assert losses["loss_enc_l1"].item() == pytest.approx(0.2, abs=1e-6)
    assert losses["loss_enc_giou"].item() == pytest.approx(1 - 0.5, abs=1e-6)
    weights = criterion.weight_dict(1, 1, 1, encoder_proposals=True)
    assert (weights["loss_enc_class"], weights["loss_enc_l1"], weights["loss_enc_giou"]) == (2.0, 5.0, 2.0)
    assert "loss_enc_class" not in criterion.weight_dict(1, 1, 1)


def test_model_with_encoder_proposals_trains_every_parameter_and_infers():
    cfg = psf_cfg()
    cfg.MODEL.PANOPTIC_SEGFORMER.THING_QUERY_INIT = "encoder"
    cfg.MODEL.PANOPTIC_SEGFORMER.CLASS_LOSS = "iou_aware"
    torch.manual_seed(0)
    model = build_model(cfg)
    losses = model(make_batch())
    assert {"loss_enc_class", "loss_enc_l1", "loss_enc_giou"} <= set(losses)
    sum(losses.values()).backward()
    # no parameter without a gradient (DistributedDataParallel needs every one used)
    unused = [name for name, p in model.named_parameters() if p.grad is None]
    assert not unused, unused
    assert "location_decoder.reference_points.weight" not in dict(model.named_parameters())
    model.eval()
    with torch.no_grad():
        results = model(make_batch())
    assert len(results[0]["instances"]) == cfg.MODEL.PANOPTIC_SEGFORMER.TEST.NUM_THINGS


@pytest.mark.parametrize("key, value, match", [
    ("THING_QUERY_INIT", "proposals", "THING_QUERY_INIT='proposals'.*'learned'.*'encoder'"),
    ("CLASS_LOSS", "varifocal", "CLASS_LOSS='varifocal'"),
    ("MASK_EMBED_DIM", -1, "MASK_EMBED_DIM=-1.*>= 0"),
])
def test_bad_keys_are_named(key, value, match):
    cfg = psf_cfg()
    cfg.MODEL.PANOPTIC_SEGFORMER[key] = value
    with pytest.raises(ValueError, match=match):
        build_model(cfg)
