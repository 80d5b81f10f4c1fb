"""Panoptic SegFormer's optional denoising queries (DN_GROUPS > 0): their layout and noise, the
attention mask that keeps the groups and the matched queries apart, and their losses on a
hand-built case."""

import pytest
import torch
from detectron2.modeling import build_model

from mask_former.layers import flatten_levels
from mask_former.modeling.panoptic_segformer import DenoisingQueries, LocationDecoder, PanopticSegFormerCriterion
from test_panoptic_segformer import focal, make_batch, psf_cfg

BOXES = torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.2, 0.3, 0.2, 0.1]])


def targets_of(*counts):
    return [{"labels": torch.arange(n) % 2, "boxes": BOXES[:n]} for n in counts]


def test_queries_without_noise_are_the_ground_truth_group_by_group():
    dn = DenoisingQueries(hidden_dim=8, num_classes=2, nheads=2, groups=2, box_noise=0.0, label_noise=0.0)
    batch = dn(targets_of(2, 1, 0))
    # T = 2 things at most, so L = 2 groups x 2; query g * 2 + j is thing j of group g
    assert batch.valid.tolist() == [[True, True, True, True], [True, False, True, False], [False] * 4]
    assert batch.labels.tolist() == [[0, 1, 0, 1], [0, 2, 0, 2], [2, 2, 2, 2]]  # 2 = padding
    torch.testing.assert_close(batch.boxes[0], BOXES.repeat(2, 1))
    torch.testing.assert_close(batch.reference[batch.valid], batch.boxes[batch.valid])
    torch.testing.assert_close(batch.content, dn.label_embedding(batch.labels))
    assert dn(targets_of(0, 0)) is None


def test_attention_mask_by_hand():
    dn = DenoisingQueries(hidden_dim=8, num_classes=2, nheads=3, groups=2, box_noise=0.0, label_noise=0.0)
    mask = dn(targets_of(2, 1)).self_attn_mask
    assert mask.shape == (2 * 3, 4, 4)
    x, o = True, False  # x: may not attend
    # image 0: every query valid, groups {0, 1} and {2, 3}
    assert mask[0].tolist() == [[o, o, x, x], [o, o, x, x], [x, x, o, o], [x, x, o, o]]
    # image 1: queries 1 and 3 are padding: nobody attends to them but themselves
    assert mask[3].tolist() == [[o, x, x, x], [o, o, x, x], [x, x, o, x], [x, x, o, o]]
    assert all(torch.equal(mask[i], mask[0]) for i in range(3))  # the same for every head


def test_noise_stays_within_its_bounds_and_follows_the_seed():
    dn = DenoisingQueries(hidden_dim=8, num_classes=5, nheads=1, groups=50, box_noise=0.4, label_noise=1.0)
    targets = [{"labels": torch.tensor([3]), "boxes": torch.tensor([[0.5, 0.4, 0.2, 0.3]])}]
    torch.manual_seed(0)
    batch = dn(targets)
    cx, cy, w, h = batch.reference[0].unbind(-1)
    assert ((cx - 0.5).abs() <= 0.4 * 0.1 + 1e-6).all() and ((cy - 0.4).abs() <= 0.4 * 0.15 + 1e-6).all()
    assert ((w >= 0.2 * 0.6 - 1e-6) & (w <= 0.2 * 1.4 + 1e-6)).all()
    assert ((h >= 0.3 * 0.6 - 1e-6) & (h <= 0.3 * 1.4 + 1e-6)).all()
    assert (w - 0.2).abs().max() > 0.05  # the noise is there
    # every label redrawn uniformly: the 50 contents take several classes' embeddings
    drawn = {tuple(row.tolist()) for row in batch.content[0]}
    assert 3 <= len(drawn) <= 5
    assert (batch.labels == 3).all()  # the targets stay the true classes
    torch.manual_seed(0)
    torch.testing.assert_close(dn(targets).reference, batch.reference)


@pytest.mark.parametrize("key, kwargs", [
    ("DN_GROUPS=-1", dict(groups=-1, box_noise=0.4, label_noise=0.2)),
    ("DN_BOX_NOISE=1.5", dict(groups=1, box_noise=1.5, label_noise=0.2)),
    ("DN_LABEL_NOISE=-0.1", dict(groups=1, box_noise=0.4, label_noise=-0.1)),
])
def test_bad_values_are_named(key, kwargs):
    with pytest.raises(ValueError, match=key):
        DenoisingQueries(hidden_dim=8, num_classes=2, nheads=1, **kwargs)


def test_groups_and_matched_queries_do_not_see_each_other():
    torch.manual_seed(0)
    decoder = LocationDecoder(num_queries=5, hidden_dim=16, num_layers=2, num_classes=2, nheads=4,
                              dim_feedforward=32, dropout=0.0, num_levels=2, n_points=2,
                              denoising=DenoisingQueries(16, 2, 4, groups=2, box_noise=0.4, label_noise=0.2))
    decoder.train()
    memory = flatten_levels([torch.randn(2, 16, 6, 5), torch.randn(2, 16, 3, 3)], level_embed=torch.zeros(2, 16))
    targets = targets_of(2, 1)
    with_dn = decoder(memory, targets)
    without = decoder(memory)
    assert "denoising" in with_dn and "denoising" not in without
    for key in ("hidden", "query_pos"):
        torch.testing.assert_close(with_dn[key], without[key])
    # group 1's contents changed: group 0's outputs stay
    batch = with_dn["denoising"]["batch"]
    content = batch.content.clone()
    content[:, 2:] += 1.0
    again = decoder._decode(content, None, batch.reference, memory, batch.self_attn_mask)
    torch.testing.assert_close(again["hidden"][:, :2], with_dn["denoising"]["hidden"][:, :2])
    assert not torch.allclose(again["hidden"][0, 2:], with_dn["denoising"]["hidden"][0, 2:])
    # image 1's padding query (1) changed: its valid query (0) stays
    content = batch.content.clone()
    content[1, 1] += 1.0
    again = decoder._decode(content, None, batch.reference, memory, batch.self_attn_mask)
    torch.testing.assert_close(again["hidden"][1, 0], with_dn["denoising"]["hidden"][1, 0])


def test_denoising_losses_on_a_hand_built_case():
    """Image 0 has one thing (class 1 of 2, box (0.5, 0.5, 0.4, 0.4)), image 1 none; 2 groups, so
    image 0 has queries 0 and 1 (its thing twice) and image 1 only padding."""
    dn = DenoisingQueries(hidden_dim=4, num_classes=2, nheads=1, groups=2, box_noise=0.0, label_noise=0.0)
    tgt_mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    tgt_mask[0, 1:3, 1:3] = True
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]]), "masks": tgt_mask,
                "stuff_labels": torch.tensor([0]), "stuff_masks": ~tgt_mask},
               {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4),
                "masks": torch.zeros(0, 4, 4, dtype=torch.bool), "stuff_labels": torch.tensor([0]),
                "stuff_masks": torch.ones(1, 4, 4, dtype=torch.bool)}]
    batch = dn(targets)
    dn_logits = torch.tensor([[[0.0, 2.0], [1.0, -1.0]], [[50.0, 50.0], [50.0, 50.0]]])  # image 1: ignored
    dn_boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.5, 0.5, 0.4, 0.4]], [[0.1, 0.1, 0.1, 0.1]] * 2])
    dn_masks = torch.full((2, 2, 4, 4), -50.0)
    dn_masks[0, 0][tgt_mask[0]] = 50.0  # query 0's mask is the thing's, query 1's is empty
    outputs = {
        "location": {"pred_logits": [torch.zeros(2, 1, 2)], "pred_boxes": [torch.full((2, 1, 4), 0.5)],
                     "denoising": {"pred_logits": [dn_logits], "pred_boxes": [dn_boxes], "batch": batch}},
        "masks": {"things": [{"pred_logits": torch.zeros(2, 1, 2), "pred_masks": torch.zeros(2, 1, 4, 4)}],
                  "stuff": [{"pred_logits": torch.zeros(2, 1, 1), "pred_masks": torch.zeros(2, 1, 4, 4)}],
                  "denoising_things": [{"pred_logits": dn_logits, "pred_masks": dn_masks}]},
    }
    criterion = PanopticSegFormerCriterion(class_weight=2.0, l1_weight=5.0, giou_weight=2.0, dice_weight=2.0)
    losses = criterion(outputs, targets)
    num = 1 * 2  # one thing, two groups
    expected_class = (focal(0.0, 0) + focal(2.0, 1) + focal(1.0, 0) + focal(-1.0, 1)) / num
    assert losses["loss_dn_class_0"].item() == pytest.approx(expected_class, rel=1e-5)
    assert losses["loss_dn_thing_class_0"].item() == pytest.approx(expected_class, rel=1e-5)
    # query 0: box [0.4, 0.3, 0.6, 0.7] inside [0.3, 0.3, 0.7, 0.7]: L1 0.2, GIoU 0.5; query 1 exact
    assert losses["loss_dn_l1_0"].item() == pytest.approx(0.2 / num, abs=1e-6)
    assert losses["loss_dn_giou_0"].item() == pytest.approx(0.5 / num, abs=1e-6)
    # dice 0 for query 0; query 1 predicts nothing: 1 - 1 / (4 + 1)
    assert losses["loss_dn_thing_dice_0"].item() == pytest.approx((0 + 0.8) / num, abs=1e-5)
    weights = criterion.weight_dict(1, 1, 1, denoising=True)
    assert weights["loss_dn_l1_0"] == 5.0 and weights["loss_dn_thing_dice_0"] == 2.0
    assert not any("_dn_" in k for k in criterion.weight_dict(1, 1, 1))


def test_model_with_denoising_trains_every_parameter_and_infers_without_it():
    cfg = psf_cfg()
    cfg.MODEL.PANOPTIC_SEGFORMER.THING_QUERY_INIT = "encoder"
    cfg.MODEL.PANOPTIC_SEGFORMER.DN_GROUPS = 2
    torch.manual_seed(0)
    model = build_model(cfg)
    losses = model(make_batch())
    psf = cfg.MODEL.PANOPTIC_SEGFORMER
    expected = {f"loss_dn_{k}_{i}" for k in ("class", "l1", "giou") for i in range(psf.DEC_LAYERS)}
    expected |= {f"loss_dn_thing_{k}_{i}" for k in ("class", "dice", "mask") for i in range(psf.THING_MASK_DEC_LAYERS)}
    assert expected <= set(losses)
    sum(losses.values()).backward()
    unused = [name for name, p in model.named_parameters() if p.grad is None]
    assert not unused, unused
    model.eval()
    with torch.no_grad():
        results = model(make_batch())
        model.location_decoder.denoising = None
        again = model(make_batch())
    for a, b in zip(results, again):
        assert torch.equal(a["panoptic_seg"][0], b["panoptic_seg"][0])
        torch.testing.assert_close(a["sem_seg"], b["sem_seg"])
