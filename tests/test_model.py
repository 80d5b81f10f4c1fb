"""MaskFormer model: forward/backward for each head and pixel decoder, inference outputs, and
config errors."""
import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model
from detectron2.structures import Instances

from model_utils import tiny_cfg


def make_batch(num_images=2, size=(64, 48), num_classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = []
    for i in range(num_images):
        h, w = size[0] - 8 * i, size[1]  # different sizes exercise padding
        image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        label = torch.zeros((h, w), dtype=torch.long)
        label[h // 2:, :] = 1
        label[4:20, 4:20] = 2 % num_classes
        classes = label.unique()
        inst = Instances((h, w))
        inst.gt_classes = classes
        inst.gt_masks = torch.stack([label == c for c in classes])
        batch.append({"image": image, "instances": inst, "sem_seg": label, "height": h, "width": w})
    return batch


def tiny_swin_cfg():
    """``tiny_cfg`` with a small Swin backbone."""
    cfg = tiny_cfg()
    cfg.MODEL.BACKBONE.NAME = "D2SwinTransformer"
    cfg.MODEL.SWIN.EMBED_DIM = 24
    cfg.MODEL.SWIN.DEPTHS = [1, 1, 2, 1]
    cfg.MODEL.SWIN.NUM_HEADS = [1, 2, 2, 4]
    cfg.MODEL.SWIN.WINDOW_SIZE = 4
    return cfg


def tiny_all_tasks_cfg(metadata_name: str, detections_per_image: int = 4):
    """``tiny_cfg`` with semantic, panoptic and instance inference on, its test dataset
    ``metadata_name`` registered with classes 0 and 2 things, 1 stuff."""
    MetadataCatalog.get(metadata_name).set(thing_dataset_id_to_contiguous_id={1: 0, 2: 2},
                                           stuff_dataset_id_to_contiguous_id={1: 0, 2: 2, 3: 1})
    cfg = tiny_cfg()
    cfg.DATASETS.TEST = (metadata_name,)
    cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_ON = True
    cfg.MODEL.MASK_FORMER.TEST.INSTANCE_ON = True
    cfg.MODEL.MASK_FORMER.TEST.DETECTIONS_PER_IMAGE = detections_per_image
    return cfg


def train_step(cfg, batch):
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    losses = model(batch)
    total = sum(losses.values())
    total.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    return model, losses, grads


def assert_finite_losses_and_grads(losses, grads):
    assert losses, "no losses"
    for name, value in losses.items():
        assert torch.isfinite(value), f"{name} = {value}"
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(g is None or torch.isfinite(g).all() for g in grads)


def test_maskformer_base_pixel_decoder_forward_backward():
    cfg = tiny_cfg()
    model, losses, grads = train_step(cfg, make_batch())
    layers = cfg.MODEL.MASK_FORMER.DEC_LAYERS
    expected = {"loss_ce", "loss_mask", "loss_dice"}
    expected |= {f"{k}_{i}" for k in ("loss_ce", "loss_mask", "loss_dice") for i in range(layers - 1)}
    assert set(losses) == expected
    assert_finite_losses_and_grads(losses, grads)


def test_loss_weights_are_applied():
    cfg = tiny_cfg()
    cfg.MODEL.MASK_FORMER.DEC_LAYERS = 3
    cfg.MODEL.MASK_FORMER.MASK_WEIGHT = 40.0
    cfg.MODEL.MASK_FORMER.DICE_WEIGHT = 3.0
    cfg.MODEL.MASK_FORMER.CLASS_WEIGHT = 2.0
    model = build_model(cfg).train()
    raw = {"loss_ce": 1.0, "loss_mask": 1.0, "loss_dice": 1.0, "loss_ce_0": 1.0, "loss_mask_1": 1.0,
           "loss_not_weighted": 7.0}

    class FixedLosses(torch.nn.Module):
        def forward(self, outputs, targets):
            return {k: torch.tensor(v) for k, v in raw.items()}

    model.criterion = FixedLosses()
    losses = model(make_batch())
    expected = {"loss_ce": 2.0, "loss_mask": 40.0, "loss_dice": 3.0, "loss_ce_0": 2.0, "loss_mask_1": 40.0}
    assert {k: v.item() for k, v in losses.items()} == expected


@pytest.mark.parametrize("mask_losses,expected", [
    (["bce"], {"loss_ce", "loss_bce"}),
    (["brier", "dice"], {"loss_ce", "loss_brier", "loss_dice"}),
    (["dice"], {"loss_ce", "loss_dice"}),
    (["focal", "bce", "brier", "dice"], {"loss_ce", "loss_mask", "loss_bce", "loss_brier", "loss_dice"}),
])
def test_selectable_mask_losses(mask_losses, expected):
    cfg = tiny_cfg()
    cfg.MODEL.MASK_FORMER.DEEP_SUPERVISION = False
    cfg.MODEL.MASK_FORMER.MASK_LOSSES = mask_losses
    _, losses, grads = train_step(cfg, make_batch())
    assert set(losses) == expected
    assert_finite_losses_and_grads(losses, grads)


def test_maskformer_transformer_encoder_pixel_decoder_forward_backward():
    cfg = tiny_cfg()
    cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME = "TransformerEncoderPixelDecoder"
    cfg.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS = 2
    cfg.MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE = "transformer_encoder"
    model, losses, grads = train_step(cfg, make_batch())
    assert_finite_losses_and_grads(losses, grads)
    encoder = model.sem_seg_head.pixel_decoder.transformer.encoder
    assert len(encoder.layers) == 2
    assert encoder.layers[0].self_attn.in_proj_weight.grad.abs().sum() > 0


def test_maskformer_swin_backbone_forward_backward():
    cfg = tiny_swin_cfg()
    _, losses, grads = train_step(cfg, make_batch())
    assert_finite_losses_and_grads(losses, grads)


@pytest.mark.parametrize("head", ["PerPixelBaselineHead", "PerPixelBaselinePlusHead"])
def test_per_pixel_baselines_forward_backward(head):
    cfg = tiny_cfg()
    cfg.MODEL.META_ARCHITECTURE = "SemanticSegmentor"
    cfg.MODEL.SEM_SEG_HEAD.NAME = head
    cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES = 3
    _, losses, grads = train_step(cfg, make_batch())
    if head == "PerPixelBaselineHead":
        assert set(losses) == {"loss_sem_seg"}
    else:
        assert set(losses) == {"loss_sem_seg", "loss_sem_seg_0"}
    assert_finite_losses_and_grads(losses, grads)


def test_inference_outputs_for_all_tasks_at_requested_size():
    cfg = tiny_all_tasks_cfg("_test_tiny_panoptic_meta")
    model = build_model(cfg).eval()
    batch = make_batch()
    batch[0]["height"], batch[0]["width"] = 100, 75  # upscale output
    with torch.no_grad():
        results = model([{k: v for k, v in x.items() if k not in ("instances", "sem_seg")} for x in batch])
    assert len(results) == 2
    for out, size in zip(results, [(100, 75), (56, 48)]):
        assert out["sem_seg"].shape == (3, *size)
        # sem_seg scores sum class probability x mask probability over the 5 queries
        assert out["sem_seg"].min() >= 0 and out["sem_seg"].sum(0).max() <= 5 + 1e-5
        pan, segments = out["panoptic_seg"]
        assert pan.shape == size
        assert set(pan.unique().tolist()) <= {0} | {s["id"] for s in segments}
        inst = out["instances"]
        assert inst.image_size == size
        assert len(inst) == 4
        assert set(inst.pred_classes.tolist()) <= {0, 2}
        assert inst.pred_masks.shape == (4, *size)


def test_unknown_component_names_list_registered_ones():
    cfg = tiny_cfg()
    cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME = "NoSuchDecoder"
    with pytest.raises(KeyError, match="PIXEL_DECODER_NAME.*BasePixelDecoder.*TransformerEncoderPixelDecoder"):
        build_model(cfg)
    cfg = tiny_cfg()
    cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME = "NoSuch"
    with pytest.raises(KeyError, match="TRANSFORMER_DECODER_NAME.*StandardTransformerDecoder"):
        build_model(cfg)


@pytest.mark.parametrize("key,value,match", [
    ("MODEL.SEM_SEG_HEAD.NUM_CLASSES", 0, "NUM_CLASSES"),
    ("MODEL.MASK_FORMER.NHEADS", 5, "HIDDEN_DIM"),
    ("MODEL.MASK_FORMER.MASK_LOSSES", ["focal", "l1"], "MASK_LOSSES"),
    ("MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE", "res9", "TRANSFORMER_IN_FEATURE"),
    ("MODEL.SEM_SEG_HEAD.MASK_DIM", 0, "MASK_DIM"),
])
def test_bad_config_values_name_the_key(key, value, match):
    cfg = tiny_cfg()
    cfg.merge_from_list([key, value])
    with pytest.raises((ValueError, KeyError), match=match):
        build_model(cfg)


def test_per_pixel_baseline_plus_needs_one_query_per_class():
    cfg = tiny_cfg()
    cfg.MODEL.META_ARCHITECTURE = "SemanticSegmentor"
    cfg.MODEL.SEM_SEG_HEAD.NAME = "PerPixelBaselinePlusHead"
    cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES = 7
    with pytest.raises(ValueError, match="NUM_OBJECT_QUERIES=7.*NUM_CLASSES=3"):
        build_model(cfg)


def test_panoptic_without_thing_metadata_fails_clearly():
    cfg = tiny_cfg()
    cfg.DATASETS.TEST = ("_test_no_thing_metadata",)
    cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_ON = True
    with pytest.raises(ValueError, match="thing_dataset_id_to_contiguous_id"):
        build_model(cfg)


@pytest.mark.parametrize("mask_losses,expected", [
    (["focal", "dice"], ("focal", 20.0, 1.5)),
    (["bce", "dice"], ("bce", 5.0, 1.5)),
    (["dice", "brier"], ("brier", 7.0, 1.5)),
    (["dice"], ("focal", 0.0, 1.5)),
    (["bce"], ("bce", 5.0, 0.0)),
])
def test_matcher_costs_follow_the_configured_losses(mask_losses, expected):
    from mask_former.modeling.criterion import build_matcher

    cfg = tiny_cfg()
    cfg.MODEL.MASK_FORMER.MASK_LOSSES = mask_losses
    cfg.MODEL.MASK_FORMER.BCE_WEIGHT = 5.0
    cfg.MODEL.MASK_FORMER.BRIER_WEIGHT = 7.0
    cfg.MODEL.MASK_FORMER.DICE_WEIGHT = 1.5
    cfg.MODEL.MASK_FORMER.CLASS_WEIGHT = 2.0
    matcher = build_matcher(cfg)
    assert (matcher.mask_cost_type, matcher.cost_mask, matcher.cost_dice) == expected
    assert matcher.cost_class == 2.0
