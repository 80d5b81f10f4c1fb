"""MSDeformAttnPixelDecoder: alone from a config, and inside MaskFormer built from its model-zoo
config (shrunk to an R18-sized model that runs on CPU)."""
import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.structures import Instances

from mask_former.modeling.pixel_decoder import MSDeformAttnPixelDecoder, build_pixel_decoder
from model_utils import tiny_cfg, zoo_cfg

CONFIG = "ade20k-150/maskformer_R50_msdeform_bs16_160k.yaml"
BACKBONE_SHAPES = {
    "res2": ShapeSpec(channels=16, stride=4),
    "res3": ShapeSpec(channels=24, stride=8),
    "res4": ShapeSpec(channels=40, stride=16),
    "res5": ShapeSpec(channels=48, stride=32),
}


def small_msdeform_cfg():
    """The model-zoo config with R18, 32-d pixel and transformer decoders, 2 encoder layers."""
    cfg = zoo_cfg(CONFIG)
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 3
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 32
    cfg.MODEL.SEM_SEG_HEAD.MASK_DIM = 16
    cfg.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS = 2
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS = 4
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_DIM_FEEDFORWARD = 64
    cfg.MODEL.MASK_FORMER.HIDDEN_DIM = 32
    cfg.MODEL.MASK_FORMER.NHEADS = 4
    cfg.MODEL.MASK_FORMER.DIM_FEEDFORWARD = 64
    cfg.MODEL.MASK_FORMER.DEC_LAYERS = 2
    cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES = 5
    return cfg


def make_batch(sizes=((64, 64), (56, 48)), num_classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = []
    for h, w in sizes:
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


def pixel_decoder_cfg():
    cfg = tiny_cfg()
    cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME = "MSDeformAttnPixelDecoder"
    cfg.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS = 2
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 64
    cfg.MODEL.SEM_SEG_HEAD.MASK_DIM = 24
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_DIM_FEEDFORWARD = 32
    return cfg


def test_zoo_config_selects_the_deformable_decoder():
    cfg = zoo_cfg(CONFIG)
    head = cfg.MODEL.SEM_SEG_HEAD
    assert head.PIXEL_DECODER_NAME == "MSDeformAttnPixelDecoder" and head.TRANSFORMER_ENC_LAYERS == 6
    assert cfg.MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE == "transformer_encoder"
    assert cfg.MODEL.RESNETS.DEPTH == 50


def test_pixel_decoder_alone():
    cfg = pixel_decoder_cfg()
    decoder = build_pixel_decoder(cfg, BACKBONE_SHAPES)
    assert isinstance(decoder, MSDeformAttnPixelDecoder)
    assert decoder.mask_dim == 24 and decoder.transformer_encoder_channels == 64
    keys = set(decoder.state_dict())
    # Deformable DETR / Mask2Former parameter names
    for key in ("input_proj.0.0.weight", "input_proj.2.1.bias", "transformer.level_embed",
                "transformer.encoder.layers.1.self_attn.sampling_offsets.weight",
                "transformer.encoder.layers.0.norm2.weight", "adapter_1.weight", "layer_1.norm.weight",
                "mask_features.weight"):
        assert key in keys, key
    assert not any(k.startswith(("adapter_2", "layer_2", "input_proj.3")) for k in keys)

    batch, height, width = 2, 64, 96
    features = {name: torch.randn(batch, s.channels, height // s.stride, width // s.stride)
                for name, s in BACKBONE_SHAPES.items()}
    mask_features, encoder_features = decoder.forward_features(features)
    assert mask_features.shape == (batch, 24, height // 4, width // 4)
    assert encoder_features.shape == (batch, 64, height // 32, width // 32)


def test_pixel_decoder_config_errors():
    cfg = pixel_decoder_cfg()
    cfg.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS = 0
    with pytest.raises(ValueError, match="TRANSFORMER_ENC_LAYERS >= 1, got 0"):
        build_pixel_decoder(cfg, BACKBONE_SHAPES)
    cfg = pixel_decoder_cfg()
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES = ["res4", "res6"]
    with pytest.raises(KeyError, match="DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES"):
        build_pixel_decoder(cfg, BACKBONE_SHAPES)
    cfg = pixel_decoder_cfg()
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS = 5
    with pytest.raises(ValueError, match="CONVS_DIM=64 must be divisible by"):
        build_pixel_decoder(cfg, BACKBONE_SHAPES)


def test_maskformer_with_deformable_pixel_decoder_train_and_eval():
    cfg = small_msdeform_cfg()
    torch.manual_seed(0)
    model = build_model(cfg)
    decoder = model.sem_seg_head.pixel_decoder
    assert isinstance(decoder, MSDeformAttnPixelDecoder)

    model.train()
    batch = make_batch()
    losses = model(batch)
    layers = cfg.MODEL.MASK_FORMER.DEC_LAYERS
    assert {"loss_ce", "loss_mask", "loss_dice"} <= set(losses) and len(losses) == 3 * layers
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    # gradients reach the sampling offsets through the sampling locations (their weight is zero-initialised)
    offsets = decoder.transformer.encoder.layers[0].self_attn.sampling_offsets.weight
    assert offsets.grad is not None and offsets.grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():
        results = model([{k: v for k, v in x.items() if k not in ("instances", "sem_seg")} for x in batch])
    assert [tuple(r["sem_seg"].shape) for r in results] == [(3, 64, 64), (3, 56, 48)]
    assert all(torch.isfinite(r["sem_seg"]).all() for r in results)
