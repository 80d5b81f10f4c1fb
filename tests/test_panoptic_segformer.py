"""Panoptic SegFormer: the location decoder's box refinement, the box matcher against brute force,
the losses on hand-built cases, stuff-query assignment, and the model's outputs."""
import itertools
import json
import math
import subprocess

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.layers import Conv2d
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, ImageList, Instances

from mask_former import add_mask_former_config
from mask_former.layers import flatten_levels
from mask_former.modeling import upsampled_mask_losses as tiled_module
from mask_former.modeling.meta_arch import panoptic_segformer as psf_meta_arch
from mask_former.modeling.panoptic_segformer import BoxMaskMatcher, LocationDecoder, PanopticSegFormerCriterion
from mask_former.modeling.panoptic_segformer.location_decoder import sine_box_embedding
from mask_former.modeling.panoptic_segformer.mask_decoder import AttentionMaskDecoder, AttentionMaskHead
from mask_former.modeling.upsampled_mask_losses import tiled_upsampled_mask_losses
from mask_former.solver import get_param_groups
from model_utils import CONFIG_DIR
from train_utils import REPO_ROOT, read_metrics, train_net_cmd, train_net_env

THING_IDS, STUFF_IDS = [1, 3], [0, 2, 4]  # 5 classes, things and stuff interleaved
METADATA = "_test_psf_metadata"


def psf_cfg():
    if METADATA not in MetadataCatalog.list():
        MetadataCatalog.get(METADATA).set(
            thing_dataset_id_to_contiguous_id={10 + c: c for c in THING_IDS},
            stuff_classes=[f"c{i}" for i in range(5)], thing_classes=[f"c{i}" for i in range(5)],
        )
    cfg = get_cfg()
    add_mask_former_config(cfg)
    cfg.merge_from_file(str(CONFIG_DIR / "synthetic" / "panoptic_segformer_R18.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 5
    cfg.DATASETS.TRAIN = (METADATA,)
    cfg.DATASETS.TEST = (METADATA,)
    psf = cfg.MODEL.PANOPTIC_SEGFORMER
    psf.HIDDEN_DIM, psf.NHEADS, psf.DIM_FEEDFORWARD = 32, 4, 64
    psf.ENC_LAYERS, psf.DEC_LAYERS, psf.NUM_THING_QUERIES = 1, 3, 6
    psf.THING_MASK_DEC_LAYERS, psf.STUFF_MASK_DEC_LAYERS, psf.TEST.NUM_THINGS = 2, 3, 4
    return cfg


def make_batch(sizes=((64, 64), (48, 64))):
    g = torch.Generator().manual_seed(0)
    batch = []
    for h, w in sizes:
        label = torch.zeros((h, w), dtype=torch.long)  # stuff 0
        label[h // 2:] = 2  # stuff 2
        label[4:20, 6:30] = 1  # thing 1
        label[24:40, 40:60] = 3  # thing 3
        classes = label.unique()
        inst = Instances((h, w))
        inst.gt_classes = classes
        inst.gt_masks = torch.stack([label == c for c in classes])
        image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        batch.append({"image": image, "instances": inst, "height": h, "width": w})
    return batch


# ---------------------------------------------------------------- mask decoder


def test_attention_mask_head_by_the_published_formula():
    """The mask head against the formula of the description, written out here: per level,
    Linear(heads, heads) + ReLU on the attention logits of its tokens, the coarser maps bilinearly
    upsampled to the finest level, concatenated, Linear(3 heads, 1)."""
    torch.manual_seed(0)
    heads, batch, queries = 4, 2, 3
    shapes = [(6, 5), (3, 3), (2, 1)]  # odd sizes: the upsampling is not a plain x2
    head = AttentionMaskHead(heads, num_levels=3)
    attn_logits = torch.randn(batch, heads, queries, sum(h * w for h, w in shapes), requires_grad=True)

    maps, start = [], 0
    for (h, w), linear in zip(shapes, head.level_linears):
        tokens = attn_logits[..., start:start + h * w]  # B x heads x Q x hw
        start += h * w
        level = torch.relu(torch.einsum("bnqs,on->bqso", tokens, linear.weight) + linear.bias)
        level = level.permute(0, 1, 3, 2).reshape(batch * queries, heads, h, w)
        maps.append(torch.nn.functional.interpolate(level, size=shapes[0], mode="bilinear", align_corners=False))
    stacked = torch.cat(maps, dim=1)  # B Q x 3 heads x H x W
    expected = torch.einsum("nchw,c->nhw", stacked, head.fuse.weight[0]) + head.fuse.bias
    expected = expected.view(batch, queries, *shapes[0])

    got = head(attn_logits, shapes)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(expected)
    params = [attn_logits] + list(head.parameters())
    want_grads = torch.autograd.grad((expected * upstream).sum(), params)
    got_grads = torch.autograd.grad((got * upstream).sum(), params)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_optional_mask_product_adds_maskformer_masks_to_the_attention_masks():
    """MASK_EMBED_DIM > 0: each layer's mask logits are the attention-map masks plus
    MLP(layer's queries) . Linear(finest-level tokens), written out here; 0 builds no such module."""
    torch.manual_seed(0)
    cfg = psf_cfg()
    cfg.MODEL.PANOPTIC_SEGFORMER.MASK_EMBED_DIM = 8
    decoder = AttentionMaskDecoder(cfg, num_thing_classes=2).eval()
    shapes = [(6, 5), (3, 3), (2, 1), (1, 1)]
    features = [torch.randn(2, 32, h, w) for h, w in shapes]
    masks = [torch.zeros(2, h, w, dtype=torch.bool) for h, w in shapes]
    memory = flatten_levels(features, masks, [torch.randn(2, 32, h, w) for h, w in shapes])
    things, thing_pos = torch.randn(2, 4, 32), torch.randn(2, 4, 32)
    stuff, stuff_pos = torch.randn(2, 3, 32), torch.randn(2, 3, 32)
    got = decoder(things, thing_pos, stuff, stuff_pos, memory)

    tokens = memory.tokens[:, :6 * 5 + 3 * 3 + 2 * 1]
    pos = memory.pos[:, :tokens.shape[1]]
    pixel_embed = decoder.pixel_embed.weight @ tokens[:, :30, :, None] + decoder.pixel_embed.bias[:, None]
    for kind, query, query_pos in (("things", things, thing_pos), ("stuff", stuff, stuff_pos)):
        module = getattr(decoder, "thing_decoder" if kind == "things" else "stuff_decoder")
        for i, (layer, head) in enumerate(zip(module.layers, module.mask_heads)):
            query, logits = layer(query, query_pos, tokens, pos, None)
            embed = query
            for j, linear in enumerate(module.mask_embed.layers):
                embed = linear(embed) if j == 2 else torch.relu(linear(embed))
            product = torch.einsum("bqc,bsc->bqs", embed, pixel_embed[..., 0]).view(2, -1, 6, 5)
            torch.testing.assert_close(got[kind][i]["pred_masks"], head(logits, shapes[:3]) + product,
                                       rtol=1e-5, atol=1e-5)

    cfg.MODEL.PANOPTIC_SEGFORMER.MASK_EMBED_DIM = 0
    published = AttentionMaskDecoder(cfg, num_thing_classes=2)
    assert not any("embed" in name for name, _ in published.named_parameters())


def _decoder_inputs(padded: bool):
    torch.manual_seed(0)
    shapes = [(6, 5), (3, 3), (2, 1), (1, 1)]
    features = [torch.randn(2, 32, h, w) for h, w in shapes]
    masks = [torch.zeros(2, h, w, dtype=torch.bool) for h, w in shapes]
    if padded:  # the second image's right column is padding on every level
        for mask in masks:
            mask[1, :, -1:] = True
    memory = flatten_levels(features, masks, [torch.randn(2, 32, h, w) for h, w in shapes])
    return torch.randn(2, 4, 32), torch.randn(2, 4, 32), torch.randn(2, 3, 32), torch.randn(2, 3, 32), memory


@pytest.mark.parametrize("padded", [False, True])
def test_mask_decoder_last_layer_only_equals_the_last_of_all_layers(padded):
    """``all_layers=False`` (what inference asks for) gives the last layer's outputs of the full
    run, exactly, with and without padding to mask."""
    decoder = AttentionMaskDecoder(psf_cfg(), num_thing_classes=2).eval()
    inputs = _decoder_inputs(padded)
    with torch.no_grad():
        every, last = decoder(*inputs), decoder(*inputs, all_layers=False)
    for kind, layers in (("things", 2), ("stuff", 3)):
        assert len(every[kind]) == layers and len(last[kind]) == 1
        for key in ("pred_logits", "pred_masks"):
            assert torch.equal(last[kind][0][key], every[kind][-1][key]), (kind, key)
    if padded:  # the padding is masked: the same tokens unmasked give other outputs
        with torch.no_grad():
            unmasked = decoder(*_decoder_inputs(False))
        assert not torch.equal(every["things"][-1]["pred_logits"][1], unmasked["things"][-1]["pred_logits"][1])
        assert torch.equal(every["things"][-1]["pred_logits"][0], unmasked["things"][-1]["pred_logits"][0])


class _DecoderOfEveryLayer(AttentionMaskDecoder):
    """A registered mask decoder whose forward has no ``all_layers`` (returns every layer)."""

    def forward(self, thing_query, thing_pos, stuff_query, stuff_pos, memory):
        return super().forward(thing_query, thing_pos, stuff_query, stuff_pos, memory)


def test_inference_runs_the_mask_heads_of_the_last_layers_only():
    """In optimised inference the meta-architecture asks the mask decoder for its last layers only
    (one mask head call per decoder, against every layer's with the modules as built and in
    training); a registered decoder without ``all_layers`` still works, and gives the same results
    (it returns every layer, inference reads the last)."""
    from mask_former.modeling.panoptic_segformer import PSF_MASK_DECODER_REGISTRY

    if "_DecoderOfEveryLayer" not in PSF_MASK_DECODER_REGISTRY:
        PSF_MASK_DECODER_REGISTRY.register(_DecoderOfEveryLayer)
    cfg = psf_cfg()
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    calls = []
    for module in model.mask_decoder.modules():
        if isinstance(module, AttentionMaskHead):
            module.register_forward_hook(lambda m, i, o: calls.append(m))
    cfg.MODEL.PANOPTIC_SEGFORMER.MASK_DECODER_NAME = "_DecoderOfEveryLayer"
    every_layer = build_model(cfg).eval()
    every_layer.load_state_dict(model.state_dict())
    with torch.no_grad():
        got, want = model(make_batch()), every_layer(make_batch())
    assert len(calls) == 2  # the thing decoder's last head and the stuff decoder's
    assert calls[0] is model.mask_decoder.thing_decoder.mask_heads[-1]
    assert calls[1] is model.mask_decoder.stuff_decoder.mask_heads[-1]
    for g, w in zip(got, want):
        assert torch.equal(g["sem_seg"], w["sem_seg"])
        assert torch.equal(g["panoptic_seg"][0], w["panoptic_seg"][0]) and g["panoptic_seg"][1] == w["panoptic_seg"][1]
        assert torch.equal(g["instances"].pred_masks, w["instances"].pred_masks)
        assert torch.equal(g["instances"].scores, w["instances"].scores)
    psf = cfg.MODEL.PANOPTIC_SEGFORMER
    every = psf.THING_MASK_DEC_LAYERS + psf.STUFF_MASK_DEC_LAYERS
    calls.clear()
    model.optimize_inference = False  # the modules as built: every layer
    with torch.no_grad():
        model(make_batch())
    assert len(calls) == every  # one call per layer, for the batch
    calls.clear()
    model.train()
    model(make_batch())
    assert len(calls) == every


# ---------------------------------------------------------------- location decoder
def test_box_refinement_per_layer_keeps_boxes_in_unit_square():
    torch.manual_seed(0)
    decoder = LocationDecoder(num_queries=5, hidden_dim=16, num_layers=3, num_classes=2, nheads=4,
                              dim_feedforward=32, dropout=0.0, num_levels=2, n_points=2)
    for branch in decoder.box_branches:  # make refinements visible (zero-initialized last layer)
        torch.nn.init.normal_(branch.layers[-1].weight, std=0.5)
    features = [torch.randn(2, 16, 6, 5), torch.randn(2, 16, 3, 3)]
    memory = flatten_levels(features, level_embed=torch.zeros(2, 16))
    seen = []
    for layer in decoder.layers:
        layer.cross_attn.register_forward_pre_hook(lambda m, args: seen.append(args[1].detach().clone()))
    out = decoder(memory)
    assert len(out["pred_boxes"]) == 3 and len(out["pred_logits"]) == 3
    for boxes in out["pred_boxes"]:
        assert boxes.shape == (2, 5, 4) and boxes.min() >= 0 and boxes.max() <= 1
    # layer 0 refers to 2-d points; layer i > 0 to the boxes of layer i - 1 (valid ratios are 1)
    assert seen[0].shape[-1] == 2
    for i in (1, 2):
        torch.testing.assert_close(seen[i][:, :, 0], out["pred_boxes"][i - 1])
        assert not torch.allclose(out["pred_boxes"][i], out["pred_boxes"][i - 1])


def test_box_branches_start_as_deformable_detr_does():
    """Only the first layer, whose references are points, starts with small boxes (w/h logits -2);
    the later layers start by keeping their reference boxes. Untrained, layer 1's boxes are then
    layer 0's."""
    torch.manual_seed(0)
    decoder = LocationDecoder(num_queries=5, hidden_dim=16, num_layers=3, num_classes=2, nheads=4,
                              dim_feedforward=32, dropout=0.0, num_levels=2, n_points=2)
    assert decoder.box_branches[0].layers[-1].bias.tolist() == [0.0, 0.0, -2.0, -2.0]
    for branch in decoder.box_branches[1:]:
        assert branch.layers[-1].bias.tolist() == [0.0] * 4
    memory = flatten_levels([torch.randn(1, 16, 6, 5), torch.randn(1, 16, 3, 3)], level_embed=torch.zeros(2, 16))
    boxes = decoder(memory)["pred_boxes"]
    sigmoid_minus_2 = 1 / (1 + math.exp(2.0))
    torch.testing.assert_close(boxes[0][..., 2:], torch.full((1, 5, 2), sigmoid_minus_2))
    torch.testing.assert_close(boxes[1], boxes[0])
    torch.testing.assert_close(boxes[2], boxes[0])


def test_sine_box_embedding_by_hand():
    # 4 features per coordinate: frequencies 1, 1, 1/100, 1/100 (temperature 10000 ** (2 * (i // 2) / 4))
    boxes = torch.tensor([[0.5, 0.25, 0.0, 1.0]])
    expected = []
    for x in boxes[0].tolist():
        a = 2 * math.pi * x
        expected += [math.sin(a), math.cos(a), math.sin(a / 100), math.cos(a / 100)]
    torch.testing.assert_close(sine_box_embedding(boxes, 4), torch.tensor([expected]), atol=1e-6, rtol=1e-6)


def test_thing_query_pos_from_boxes():
    """THING_QUERY_POS "box": the mask decoder's thing query position is an MLP of the last boxes'
    sine embedding, detached from the boxes; "learned" keeps the location decoder's learned one."""
    features = [torch.randn(2, 16, 6, 5), torch.randn(2, 16, 3, 3)]
    memory = flatten_levels(features, level_embed=torch.zeros(2, 16))
    kwargs = dict(num_queries=5, hidden_dim=16, num_layers=2, num_classes=2, nheads=4, dim_feedforward=32,
                  dropout=0.0, num_levels=2, n_points=2)
    torch.manual_seed(0)
    learned = LocationDecoder(**kwargs)(memory)
    torch.testing.assert_close(learned["query_pos"][0], learned["query_pos"][1])  # the same for every image
    torch.manual_seed(0)
    decoder = LocationDecoder(**kwargs, query_pos_from_boxes=True)
    for branch in decoder.box_branches:  # boxes that depend on the image (zero-initialized last layer)
        torch.nn.init.normal_(branch.layers[-1].weight, std=0.5)
    out = decoder(memory)
    mlp = decoder.box_query_pos.mlp
    hidden = torch.relu(mlp.layers[0](sine_box_embedding(out["pred_boxes"][-1], 4)))
    torch.testing.assert_close(out["query_pos"], mlp.layers[1](hidden))
    assert not torch.allclose(out["query_pos"][0], out["query_pos"][1])  # per image: its boxes
    out["query_pos"].sum().backward()
    assert decoder.box_branches[-1].layers[0].weight.grad is None  # boxes detached
    assert mlp.layers[0].weight.grad.abs().sum() > 0
    cfg = psf_cfg()
    cfg.MODEL.PANOPTIC_SEGFORMER.THING_QUERY_POS = "boxes"
    with pytest.raises(ValueError, match="THING_QUERY_POS='boxes'"):
        build_model(cfg)


# ---------------------------------------------------------------- matcher against brute force
def hand_costs(logits, boxes, labels, tgt_boxes, alpha=0.25, gamma=2.0):
    """Focal class cost, L1 and GIoU of every pair, written out pair by pair."""
    q, t = logits.shape[0], labels.shape[0]
    cls, l1, giou = torch.zeros(q, t), torch.zeros(q, t), torch.zeros(q, t)

    def xyxy(b):
        cx, cy, w, h = b.tolist()
        return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2

    for i in range(q):
        for j in range(t):
            p = torch.sigmoid(logits[i, labels[j]]).item()
            cls[i, j] = alpha * (1 - p) ** gamma * -math.log(p) - (1 - alpha) * p ** gamma * -math.log(1 - p)
            l1[i, j] = (boxes[i] - tgt_boxes[j]).abs().sum()
            a, b = xyxy(boxes[i]), xyxy(tgt_boxes[j])
            inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
            union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
            hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
            giou[i, j] = inter / union - (hull - union) / hull
    return cls, l1, giou


@pytest.mark.parametrize("seed", range(6))
def test_box_matcher_is_optimal_by_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    q, t, c = 5, 1 + seed % 4, 3
    logits = torch.randn(1, q, c, generator=g)

    def random_boxes(*shape):  # centres in [0.2, 0.8], sizes in [0.05, 0.35]
        return torch.cat([torch.rand(*shape, 2, generator=g) * 0.6 + 0.2,
                          torch.rand(*shape, 2, generator=g) * 0.3 + 0.05], -1)

    boxes = random_boxes(1, q)
    target = {"labels": torch.randint(0, c, (t,), generator=g), "boxes": random_boxes(t)}
    matcher = BoxMaskMatcher(class_weight=2.0, l1_weight=5.0, giou_weight=2.0)
    (rows, cols), = matcher(logits, boxes, [target])
    cls, l1, giou = hand_costs(logits[0], boxes[0], target["labels"], target["boxes"])
    cost = 2 * cls + 5 * l1 - 2 * giou
    torch.testing.assert_close(matcher.cost_matrix(logits[0], boxes[0], target), cost, atol=1e-5, rtol=1e-5)
    best = min(sum(cost[perm[j], j].item() for j in range(t)) for perm in itertools.permutations(range(q), t))
    assert len(rows) == t and len(set(rows.tolist())) == t
    assert cost[rows, cols].sum().item() == pytest.approx(best, abs=1e-5)


def focal(x, y, alpha=0.25, gamma=2.0):
    """Sigmoid focal loss of one logit x with binary target y, written out."""
    p = 1 / (1 + math.exp(-x))
    ce = -math.log(p) if y else -math.log(1 - p)
    p_t = p if y else 1 - p
    return (alpha if y else 1 - alpha) * (1 - p_t) ** gamma * ce


# ---------------------------------------------------------------- losses on a hand-built case
def test_full_loss_on_a_hand_built_case():
    """One image, one thing (class 1 of 2, box (0.5, 0.5, 0.4, 0.4)), one stuff class of 2
    present; two thing queries, one layer of each decoder."""
    criterion = PanopticSegFormerCriterion(class_weight=2.0, l1_weight=5.0, giou_weight=2.0, dice_weight=2.0)
    tgt_mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    tgt_mask[0, 1:3, 1:3] = True
    stuff_mask = ~tgt_mask
    target = {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]]), "masks": tgt_mask,
              "stuff_labels": torch.tensor([1]), "stuff_masks": stuff_mask}
    loc_logits = torch.tensor([[[0.0, 2.0], [-1.0, -3.0]]])
    loc_boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.1, 0.1, 0.1, 0.1]]])
    thing_logits = torch.tensor([[[0.5, 1.0], [0.0, 0.0]]])
    thing_masks = torch.full((1, 2, 4, 4), -2.0)
    thing_masks[0, 0, 1:3, 1:3] = 2.0
    stuff_logits = torch.tensor([[[-1.0], [1.5]]])
    stuff_masks = torch.zeros(1, 2, 4, 4)
    outputs = {"location": {"pred_logits": [loc_logits], "pred_boxes": [loc_boxes]},
               "masks": {"things": [{"pred_logits": thing_logits, "pred_masks": thing_masks}],
                         "stuff": [{"pred_logits": stuff_logits, "pred_masks": stuff_masks}]}}
    losses = criterion(outputs, [target])

    # query 0 is matched (right class, overlapping box): class targets one-hot only there
    expected_loc_class = focal(0.0, 0) + focal(2.0, 1) + focal(-1.0, 0) + focal(-3.0, 0)
    assert losses["loss_loc_class_0"].item() == pytest.approx(expected_loc_class, rel=1e-5)
    assert losses["loss_loc_l1_0"].item() == pytest.approx(0.2, abs=1e-6)
    # boxes [0.4, 0.3, 0.6, 0.7] and [0.3, 0.3, 0.7, 0.7]: IoU = 0.08 / 0.16, hull = union
    assert losses["loss_loc_giou_0"].item() == pytest.approx(1 - 0.5, abs=1e-6)
    expected_thing_class = focal(0.5, 0) + focal(1.0, 1) + focal(0.0, 0) + focal(0.0, 0)
    assert losses["loss_thing_class_0"].item() == pytest.approx(expected_thing_class, rel=1e-5)
    p_in, p_out = 1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(2.0))
    dice = 1 - (2 * 4 * p_in + 1) / (4 * p_in + 12 * p_out + 4 + 1)
    assert losses["loss_thing_dice_0"].item() == pytest.approx(dice, rel=1e-5)
    # stuff query k <-> stuff class k: query 1's class is present, query 0's is not
    assert losses["loss_stuff_class_0"].item() == pytest.approx(focal(-1.0, 0) + focal(1.5, 1), rel=1e-5)
    stuff_dice = 1 - (2 * 12 * 0.5 + 1) / (16 * 0.5 + 12 + 1)
    assert losses["loss_stuff_dice_0"].item() == pytest.approx(stuff_dice, rel=1e-5)


def test_optional_per_pixel_focal_mask_loss_on_a_hand_built_case():
    """MASK_FOCAL_WEIGHT > 0 adds MaskFormer's per-pixel focal loss on the dice loss's pairs:
    per mask the mean over its pixels, summed, divided by the number of segments."""
    tgt_mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    tgt_mask[0, 1:3, 1:3] = True
    target = {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]]), "masks": tgt_mask,
              "stuff_labels": torch.tensor([0]), "stuff_masks": ~tgt_mask}
    thing_masks = torch.full((1, 1, 4, 4), -1.0)
    thing_masks[0, 0, 1:3, 1:3] = 3.0
    stuff_masks = torch.full((1, 1, 4, 4), 0.5)
    outputs = {"location": {"pred_logits": [torch.zeros(1, 1, 1)], "pred_boxes": [torch.full((1, 1, 4), 0.5)]},
               "masks": {"things": [{"pred_logits": torch.zeros(1, 1, 1), "pred_masks": thing_masks}],
                         "stuff": [{"pred_logits": torch.zeros(1, 1, 1), "pred_masks": stuff_masks}]}}
    published = PanopticSegFormerCriterion(class_weight=2.0, l1_weight=5.0, giou_weight=2.0, dice_weight=2.0)
    with_focal = PanopticSegFormerCriterion(class_weight=2.0, l1_weight=5.0, giou_weight=2.0, dice_weight=2.0,
                                            mask_focal_weight=20.0)
    assert not any("_mask_" in k for k in published(outputs, [target]))
    assert not any("_mask_" in k for k in published.weight_dict(1, 1, 1))
    losses = with_focal(outputs, [target])
    # thing: 4 pixels at logit 3 inside the mask, 12 at -1 outside
    assert losses["loss_thing_mask_0"].item() == pytest.approx((4 * focal(3.0, 1) + 12 * focal(-1.0, 0)) / 16,
                                                               rel=1e-5)
    # stuff: logit 0.5 everywhere, 12 pixels inside the mask, 4 outside
    assert losses["loss_stuff_mask_0"].item() == pytest.approx((12 * focal(0.5, 1) + 4 * focal(0.5, 0)) / 16,
                                                               rel=1e-5)
    # the other losses are the published ones
    for name, value in published(outputs, [target]).items():
        assert losses[name].item() == pytest.approx(value.item(), rel=1e-6), name
    weights = with_focal.weight_dict(1, 1, 1)
    assert weights["loss_thing_mask_0"] == weights["loss_stuff_mask_0"] == 20.0
    with pytest.raises(ValueError, match="MASK_FOCAL_WEIGHT=-1"):
        PanopticSegFormerCriterion(class_weight=2.0, l1_weight=5.0, giou_weight=2.0, dice_weight=2.0,
                                   mask_focal_weight=-1)


def test_targets_of_a_smaller_image_are_zero_padded_at_the_bottom_right():
    """Image 1's masks are 4 x 2 in a batch of 4 x 4: the losses equal those with its masks padded
    by hand with two columns of zeros on the right."""
    criterion = PanopticSegFormerCriterion(class_weight=2.0, l1_weight=5.0, giou_weight=2.0, dice_weight=2.0,
                                           mask_focal_weight=20.0)
    generator = torch.Generator().manual_seed(0)
    things = torch.zeros(1, 4, 4, dtype=torch.bool)
    things[0, 1:3, 1:3] = True
    small_things = torch.tensor([[[1, 0], [1, 1], [0, 1], [0, 0]]], dtype=torch.bool)
    small_stuff = ~small_things

    def target(thing_masks, stuff_masks):
        return {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]]), "masks": thing_masks,
                "stuff_labels": torch.tensor([0]), "stuff_masks": stuff_masks}

    def pad(masks):
        return torch.cat([masks, torch.zeros(masks.shape[0], 4, 2, dtype=masks.dtype)], dim=-1)

    outputs = {"location": {"pred_logits": [torch.randn(2, 2, 2, generator=generator)],
                            "pred_boxes": [torch.rand(2, 2, 4, generator=generator) * 0.5 + 0.25]},
               "masks": {"things": [{"pred_logits": torch.randn(2, 2, 2, generator=generator),
                                     "pred_masks": torch.randn(2, 2, 4, 4, generator=generator) * 2}],
                         "stuff": [{"pred_logits": torch.randn(2, 2, 1, generator=generator),
                                    "pred_masks": torch.randn(2, 2, 4, 4, generator=generator) * 2}]}}
    smaller = criterion(outputs, [target(things, ~things), target(small_things, small_stuff)])
    padded = criterion(outputs, [target(things, ~things), target(pad(small_things), pad(small_stuff))])
    assert smaller.keys() == padded.keys()
    for name in smaller:
        assert smaller[name].item() == pytest.approx(padded[name].item(), rel=1e-6), name
    # the padding matters: the same masks stretched over the whole 4 x 4 give other mask losses
    stretched = criterion(outputs, [target(things, ~things), target(small_things.repeat_interleave(2, dim=-1),
                                                                    small_stuff.repeat_interleave(2, dim=-1))])
    assert stretched["loss_stuff_dice_0"].item() != pytest.approx(padded["loss_stuff_dice_0"].item(), rel=1e-3)


def test_stuff_queries_are_assigned_to_their_own_class():
    """A stuff query whose mask equals its class's mask has dice 0 whatever the other queries do;
    swapping two stuff queries' masks makes it positive."""
    criterion = PanopticSegFormerCriterion(class_weight=2.0, l1_weight=5.0, giou_weight=2.0, dice_weight=2.0)
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[0, :4], masks[1, 4:] = True, True
    target = {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4),
              "masks": torch.zeros(0, 8, 8, dtype=torch.bool),
              "stuff_labels": torch.tensor([0, 2]), "stuff_masks": masks}
    perfect = torch.full((1, 3, 8, 8), -50.0)
    perfect[0, 0][masks[0]] = 50.0
    perfect[0, 2][masks[1]] = 50.0

    def stuff_dice(pred):
        outputs = {"location": {"pred_logits": [torch.zeros(1, 2, 1)], "pred_boxes": [torch.full((1, 2, 4), 0.5)]},
                   "masks": {"things": [{"pred_logits": torch.zeros(1, 2, 1), "pred_masks": torch.zeros(1, 2, 8, 8)}],
                             "stuff": [{"pred_logits": torch.zeros(1, 3, 1), "pred_masks": pred}]}}
        return criterion(outputs, [target])["loss_stuff_dice_0"].item()

    assert stuff_dice(perfect) == pytest.approx(0.0, abs=1e-4)
    assert stuff_dice(perfect[:, [2, 1, 0]]) > 0.9


# ---------------------------------------------------------------- the model
def test_model_trains_and_infers_the_three_outputs():
    cfg = psf_cfg()
    torch.manual_seed(0)
    model = build_model(cfg)
    psf = cfg.MODEL.PANOPTIC_SEGFORMER
    losses = model(make_batch())
    expected = {f"loss_loc_{k}_{i}" for k in ("class", "l1", "giou") for i in range(psf.DEC_LAYERS)}
    # the synthetic config adds the per-pixel focal mask loss ("mask") to the published ones
    assert psf.MASK_FOCAL_WEIGHT > 0
    expected |= {f"loss_thing_{k}_{i}" for k in ("class", "dice", "mask") for i in range(psf.THING_MASK_DEC_LAYERS)}
    expected |= {f"loss_stuff_{k}_{i}" for k in ("class", "dice", "mask") for i in range(psf.STUFF_MASK_DEC_LAYERS)}
    # and places the thing queries on the encoder's proposals, whose losses are "enc"
    assert psf.THING_QUERY_INIT == "encoder"
    expected |= {"loss_enc_class", "loss_enc_l1", "loss_enc_giou"}
    assert set(losses) == expected
    sum(losses.values()).backward()
    for name in ("location_decoder.query_embedding.weight", "stuff_query.weight",
                 "mask_decoder.thing_decoder.mask_heads.1.fuse.weight", "backbone.res3.0.conv1.weight",
                 "location_decoder.box_query_pos.mlp.layers.0.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name

    model.eval()
    with torch.no_grad():
        results = model(make_batch())
    for result, (h, w) in zip(results, ((64, 64), (48, 64))):
        assert result["sem_seg"].shape == (5, h, w)
        panoptic_seg, segments_info = result["panoptic_seg"]
        assert panoptic_seg.shape == (h, w)
        assert {s["id"] for s in segments_info} == set(panoptic_seg.unique().tolist()) - {0}
        for s in segments_info:
            assert s["isthing"] == (s["category_id"] in THING_IDS)
        instances = result["instances"]
        assert len(instances) == psf.TEST.NUM_THINGS
        assert set(instances.pred_classes.tolist()) <= set(THING_IDS)
        assert (instances.scores[:-1] >= instances.scores[1:]).all()


@pytest.mark.parametrize("precision, dtype, tolerance", [
    ("bf16", torch.bfloat16, 0.03),  # measured: below 0.008
    ("fp16", torch.float16, 0.005),  # 3 more mantissa bits
])
def test_low_precision_inference_runs_the_network_in_it_and_merges_in_float32(precision, dtype, tolerance):
    """MODEL.MASK_FORMER.TEST.PRECISION bf16 / fp16: the decoders' products come out in that dtype
    (autocast), the outputs are float32 and near the fp32 ones (same weights)."""
    torch.manual_seed(0)
    cfg = psf_cfg()
    fp32 = build_model(cfg).eval()
    cfg.MODEL.MASK_FORMER.TEST.PRECISION = precision
    low = build_model(cfg).eval()
    low.load_state_dict(fp32.state_dict())
    seen = []
    low.mask_decoder.thing_decoder.layers[0].q_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.no_grad():
        want, got = fp32(make_batch()), low(make_batch())
    assert seen == [dtype]
    for w, g in zip(want, got):
        assert g["sem_seg"].dtype == torch.float32
        assert (g["sem_seg"] - w["sem_seg"]).abs().max() < tolerance
        torch.testing.assert_close(g["instances"].scores.sort().values, w["instances"].scores.sort().values,
                                   rtol=0, atol=tolerance)


def test_a_bad_precision_is_named():
    cfg = psf_cfg()
    cfg.MODEL.MASK_FORMER.TEST.PRECISION = "fp8"
    with pytest.raises(ValueError, match="MODEL.MASK_FORMER.TEST.PRECISION.*'fp8'"):
        build_model(cfg)


def test_fp16_outputs_that_overflow_are_an_error():
    """float16 ends at 65504: class logits beyond it would be inf (NaN scores); fp16 inference
    says so and names the precision, bf16 (float32's range) runs."""
    for precision in ("fp16", "bf16"):
        torch.manual_seed(0)
        cfg = psf_cfg()
        cfg.MODEL.MASK_FORMER.TEST.PRECISION = precision
        model = build_model(cfg).eval()
        with torch.no_grad():
            for branch in model.location_decoder.class_branches:
                # each representable in float16; their sum (the queries are layer-normed) is not
                branch.weight[:, 0] = 60000.0
                branch.bias.fill_(60000.0)
            if precision == "fp16":
                with pytest.raises(FloatingPointError, match="PRECISION fp16.*not finite.*bf16"):
                    model(make_batch())
            else:
                model(make_batch())


def _frozen_bn_psf(precision="fp32"):
    """The tiny model with a frozen-batch-norm backbone (statistics made non-trivial), as R50 has."""
    cfg = psf_cfg()
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    cfg.MODEL.MASK_FORMER.TEST.PRECISION = precision
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(1)
    for name, buffer in model.backbone.named_buffers():
        if name.endswith(("weight", "running_var")):
            buffer.copy_(0.5 + torch.rand(buffer.shape, generator=g))
        elif name.endswith(("bias", "running_mean")):
            buffer.copy_(0.2 * torch.randn(buffer.shape, generator=g))
    return model


def test_optimised_bf16_inference_folds_the_backbone_and_runs_cached_bfloat16_weights():
    """In bf16, as MaskFormer's optimised path: frozen batch norms folded into the backbone's
    convolutions and bfloat16 copies of the weights kept beside the model, reused while the
    weights do not change; the outputs stay near those of the modules as built under autocast
    (``optimize_inference = False``) and of fp32. fp32 inference keeps no copies."""
    model, fp32 = _frozen_bn_psf("bf16"), _frozen_bn_psf()
    seen, weight_dtypes = [], []
    model.backbone.stem.conv1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    linear = next(m for m in model.mask_decoder.modules() if isinstance(m, torch.nn.Linear))
    linear.register_forward_hook(lambda m, i, o: weight_dtypes.append(m.weight.dtype))
    with torch.no_grad():
        model.optimize_inference = False
        autocast_only = model(make_batch())
        model.optimize_inference = True
        got = model(make_batch())
        want = fp32(make_batch())
    assert seen == [torch.bfloat16, torch.bfloat16]
    # autocast casts the float32 weight at the call; the optimised path passes the bfloat16 copy
    assert weight_dtypes[0] == torch.float32 and set(weight_dtypes[len(weight_dtypes) // 2:]) == {torch.bfloat16}
    weights = model.prepare_for_inference()
    assert weights.dtype == torch.bfloat16
    assert len(weights) == sum(1 for m in model.backbone.modules() if isinstance(m, Conv2d) and m.norm is not None)
    assert model.prepare_for_inference() is weights  # nothing changed: reused
    assert fp32._inference_weights is None
    for g, a, w in zip(got, autocast_only, want):
        assert g["sem_seg"].dtype == torch.float32
        assert (g["sem_seg"] - a["sem_seg"]).abs().max() < 0.03
        assert (g["sem_seg"] - w["sem_seg"]).abs().max() < 0.03
    model.train()
    assert model._inference_weights is None  # training drops the copies


def test_instances_and_semantic_scores_by_their_plain_formulas(monkeypatch):
    """The instance output (confidence p * q^2 with q the mean probability inside the binary
    mask, sorted by it, tight boxes) and the semantic scores (per class the highest score x
    probability), against the plain formulas written here; one box worked out by hand."""
    model = build_model(psf_cfg()).eval()
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(4, 9, 11, generator=g) * 0.6  # some pixels above 0.5
    probs[0] = 0.1
    probs[0, 2:5, 3:8] = 0.9  # a 3 x 5 block: box (3, 2, 8, 5)
    probs[3] = 0.2  # an empty mask
    labels = torch.tensor([1, 3, 1, 0])
    scores = torch.tensor([0.9, 0.5, 0.7, 0.8])

    got = model.instances(labels, scores, probs)
    binary = probs > 0.5
    quality = (probs * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1)
    confidence = scores * quality ** 2
    order = confidence.argsort(descending=True)
    assert torch.equal(got.pred_masks, binary[order])
    assert torch.equal(got.pred_classes, labels[order])
    torch.testing.assert_close(got.scores, confidence[order])
    torch.testing.assert_close(got.pred_boxes.tensor, BitMasks(binary[order]).get_bounding_boxes().tensor)
    assert got.pred_boxes.tensor[order.tolist().index(0)].tolist() == [3, 2, 8, 5]
    assert got.pred_boxes.tensor[order.tolist().index(3)].tolist() == [0, 0, 0, 0]
    assert got.scores[order.tolist().index(0)] == pytest.approx(0.9 * (0.9 * 15 / 16) ** 2)

    for masks_per_chunk in (16, 3, 1):  # one chunk, a chunk and a rest, one mask at a time
        monkeypatch.setattr(psf_meta_arch, "SEMANTIC_MASKS_PER_CHUNK", masks_per_chunk)
        sem_seg = model.semantic_scores(labels, scores, probs)
        assert sem_seg.shape == (5, 9, 11)
        for c in range(5):
            masks = [scores[i] * probs[i] for i in range(4) if labels[i] == c]
            expected = torch.stack(masks).amax(0) if masks else torch.zeros(9, 11)
            assert torch.equal(sem_seg[c], expected), (masks_per_chunk, c)


def test_targets_split_things_with_boxes_from_masks():
    model = build_model(psf_cfg())
    batch = make_batch(((64, 64),))
    images = ImageList.from_tensors([batch[0]["image"].float()], 32)
    target, = model.prepare_targets(batch, images)
    # things 1 (rows 4-19, cols 6-29) and 3 (rows 24-39, cols 40-59) -> thing indices 0, 1
    assert target["labels"].tolist() == [0, 1]
    expected = torch.tensor([[18 / 64, 12 / 64, 24 / 64, 16 / 64], [50 / 64, 32 / 64, 20 / 64, 16 / 64]])
    torch.testing.assert_close(target["boxes"], expected)
    assert target["stuff_labels"].tolist() == [0, 1]  # classes 0 and 2 -> stuff indices 0, 1


def test_thing_classes_must_come_from_the_metadata():
    cfg = psf_cfg()
    cfg.DATASETS.TRAIN = ("_test_psf_no_things",)
    cfg.DATASETS.TEST = ()
    MetadataCatalog.get("_test_psf_no_things").set(stuff_classes=["a"])
    with pytest.raises(ValueError, match="_test_psf_no_things.*thing_dataset_id_to_contiguous_id"):
        build_model(cfg)


def test_unknown_mask_decoder_name_lists_the_registered_ones():
    cfg = psf_cfg()
    cfg.MODEL.PANOPTIC_SEGFORMER.MASK_DECODER_NAME = "Nope"
    with pytest.raises(KeyError, match="MASK_DECODER_NAME='Nope'.*AttentionMaskDecoder"):
        build_model(cfg)


def test_sampling_offsets_train_slower():
    cfg = psf_cfg()
    cfg.MODEL.PANOPTIC_SEGFORMER.THING_QUERY_INIT = "learned"  # published: learned reference points
    cfg.SOLVER.BASE_LR, cfg.SOLVER.BACKBONE_MULTIPLIER = 1.0, 0.1
    model = build_model(cfg)
    lr = {id(g["params"][0]): g["lr"] for g in get_param_groups(cfg, model)}
    named = dict(model.named_parameters())
    assert lr[id(named["encoder.encoder.encoder.layers.0.self_attn.sampling_offsets.weight"])] == pytest.approx(0.1)
    assert lr[id(named["location_decoder.reference_points.weight"])] == pytest.approx(0.1)
    assert lr[id(named["location_decoder.layers.0.cross_attn.value_proj.weight"])] == pytest.approx(1.0)
    assert lr[id(named["backbone.res3.0.conv1.weight"])] == pytest.approx(0.1)


# ---------------------------------------------------------------- end to end (tools/train_net.py)
PSF_CONFIG = CONFIG_DIR / "synthetic" / "panoptic_segformer_R18.yaml"
PSF_TINY_OPTS = [
    "MODEL.PANOPTIC_SEGFORMER.HIDDEN_DIM", "32", "MODEL.PANOPTIC_SEGFORMER.DIM_FEEDFORWARD", "64",
    "MODEL.PANOPTIC_SEGFORMER.ENC_LAYERS", "1", "MODEL.PANOPTIC_SEGFORMER.DEC_LAYERS", "2",
    "MODEL.PANOPTIC_SEGFORMER.NUM_THING_QUERIES", "10", "MODEL.PANOPTIC_SEGFORMER.TEST.NUM_THINGS", "10",
    "MODEL.PANOPTIC_SEGFORMER.THING_MASK_DEC_LAYERS", "2", "MODEL.PANOPTIC_SEGFORMER.STUFF_MASK_DEC_LAYERS", "2",
]


def run_psf(datasets_root, *args, opts=()):
    proc = subprocess.run(train_net_cmd(*args, opts=[*PSF_TINY_OPTS, *opts], config=PSF_CONFIG), cwd=REPO_ROOT,
                          env=train_net_env(datasets_root), capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"train_net failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="module")
def trained_psf(tiny_synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("train_psf")
    run_psf(tiny_synthetic_root, opts=["SOLVER.MAX_ITER", "40", "SOLVER.CHECKPOINT_PERIOD", "20",
                                       "OUTPUT_DIR", str(out)])
    return out


def test_training_lowers_the_loss_and_evaluates_pq_miou_ap(trained_psf):
    train_lines = [m for m in read_metrics(trained_psf) if "total_loss" in m]
    losses = [m["total_loss"] for m in train_lines]
    assert [m["iteration"] for m in train_lines] == [19, 39]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    results = json.loads((trained_psf / "eval_results.json").read_text())
    for group, metric in (("panoptic_seg", "PQ"), ("sem_seg", "mIoU"), ("segm", "AP")):
        assert math.isfinite(results[group][metric]), (group, results)


def test_eval_only_reproduces_the_metrics(trained_psf, tiny_synthetic_root, tmp_path):
    run_psf(tiny_synthetic_root, "--eval-only", opts=["MODEL.WEIGHTS", str(trained_psf / "model_final.pth"),
                                                      "OUTPUT_DIR", str(tmp_path)])
    after_training = json.loads((trained_psf / "eval_results.json").read_text())
    eval_only = json.loads((tmp_path / "eval_results.json").read_text())
    for group, metrics in after_training.items():
        for metric, value in metrics.items():
            assert eval_only[group][metric] == (None if value is None else pytest.approx(value, abs=1e-6))


def test_resume_continues_to_the_same_weights(tiny_synthetic_root, tmp_path):
    """A run resumed from its checkpoint of iteration 4 ends with the weights of the run that went
    through without a stop, bitwise (same seed, CPU, no data loader workers)."""
    opts = ["SOLVER.CHECKPOINT_PERIOD", "4", "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()",
            "SOLVER.MAX_ITER", "8", "OUTPUT_DIR", str(tmp_path)]
    run_psf(tiny_synthetic_root, opts=opts)
    reference = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    # what a run stopped after its first checkpoint leaves behind
    for name in ("model_0000007.pth", "model_final.pth"):
        (tmp_path / name).unlink()
    (tmp_path / "last_checkpoint").write_text("model_0000003.pth")
    run_psf(tiny_synthetic_root, "--resume", opts=opts)
    assert "Starting training from iteration 4" in (tmp_path / "log.txt").read_text()
    resumed = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    assert resumed.keys() == reference.keys()
    for key in reference:
        assert torch.equal(resumed[key], reference[key]), key


# ---------------------------------------------------------------- MaskFormer with mask-wise merging
def test_maskformer_panoptic_merge_is_selectable_by_config():
    from mask_former.modeling.postprocessing import mask_wise_panoptic_inference, panoptic_inference
    from model_utils import tiny_cfg

    cfg = tiny_cfg(num_classes=5)
    cfg.DATASETS.TEST = (METADATA,)
    cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_ON = True
    torch.manual_seed(0)
    pixel = build_model(cfg)
    cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_MERGE = "mask"
    torch.manual_seed(0)
    mask = build_model(cfg)
    g = torch.Generator().manual_seed(1)
    mask_cls, mask_pred = torch.randn(5, 6, generator=g) * 3, torch.randn(5, 16, 16, generator=g) * 4
    expected_pixel = panoptic_inference(mask_cls, mask_pred, set(THING_IDS), 0.0, 0.0)
    expected_mask = mask_wise_panoptic_inference(mask_cls, mask_pred, set(THING_IDS))
    for model, expected in ((pixel, expected_pixel), (mask, expected_mask)):
        seg, info = model.panoptic_merge(mask_cls, mask_pred)
        assert torch.equal(seg, expected[0]) and info == expected[1]
    assert not torch.equal(expected_pixel[0], expected_mask[0])  # the two rules do differ here
    cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_MERGE = "argmax"
    with pytest.raises(ValueError, match="PANOPTIC_MERGE='argmax'"):
        build_model(cfg)


def test_mask_losses_tile_by_tile_equal_the_whole_image_ones(monkeypatch):
    # inside tiled_upsampled_mask_losses (the meta-architecture's optimised training) the dice and
    # per-pixel focal losses of things and stuff run tile by tile: at the targets' size (the
    # hand-built values above) and upsampled 2x, against the whole-image computation
    calls = []
    original = tiled_module._TiledMaskLosses.apply
    monkeypatch.setattr(tiled_module._TiledMaskLosses, "apply", lambda *args: calls.append(1) or original(*args))
    monkeypatch.setattr(tiled_module, "TILE_VALUES", 8)
    monkeypatch.setattr(tiled_module, "MIN_TILE_ROWS", 1)
    tgt_mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    tgt_mask[0, 2:6, 1:5] = True
    target = {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]]), "masks": tgt_mask,
              "stuff_labels": torch.tensor([0]), "stuff_masks": ~tgt_mask}
    criterion = PanopticSegFormerCriterion(class_weight=2.0, l1_weight=5.0, giou_weight=2.0, dice_weight=2.0,
                                           mask_focal_weight=20.0)
    g = torch.Generator().manual_seed(0)
    for size in (8, 4):
        thing_masks = (torch.randn(1, 1, size, size, generator=g) * 3).requires_grad_()
        stuff_masks = (torch.randn(1, 1, size, size, generator=g) * 3).requires_grad_()
        outputs = {"location": {"pred_logits": [torch.zeros(1, 1, 1)], "pred_boxes": [torch.full((1, 1, 4), 0.5)]},
                   "masks": {"things": [{"pred_logits": torch.zeros(1, 1, 1), "pred_masks": thing_masks}],
                             "stuff": [{"pred_logits": torch.zeros(1, 1, 1), "pred_masks": stuff_masks}]}}
        whole = criterion(outputs, [target])
        calls.clear()
        with tiled_upsampled_mask_losses():
            tiled = criterion(outputs, [target])
        assert len(calls) == 2  # the dice and focal losses of the things, then of the stuff
        for name in ("loss_thing_dice_0", "loss_thing_mask_0", "loss_stuff_dice_0", "loss_stuff_mask_0"):
            assert tiled[name].item() == pytest.approx(whole[name].item(), rel=1e-5), name
        grads = torch.autograd.grad(sum(tiled.values()), [thing_masks, stuff_masks])
        expected = torch.autograd.grad(sum(whole.values()), [thing_masks, stuff_masks])
        for got, want in zip(grads, expected):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
