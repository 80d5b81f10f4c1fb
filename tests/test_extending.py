"""Extending the project from outside it: a new mask loss and a new pixel decoder are each defined
and registered in this file alone (plus a config key for the loss weight), then used by name."""
import torch
from detectron2.config import configurable
from detectron2.layers import Conv2d
from torch import nn

from mask_former.modeling.criterion import build_matcher
from mask_former.modeling.mask_losses import MASK_LOSSES, MaskLossType, register_mask_loss
from mask_former.modeling.pixel_decoder import PIXEL_DECODER_REGISTRY
from model_utils import tiny_cfg
from test_model import make_batch, train_step


# ------------------------------------------------------------------ a toy mask loss: L1 on probabilities
def toy_l1_loss(inputs, targets, num_masks):
    return (inputs.sigmoid() - targets).abs().mean(1).sum() / num_masks


def toy_l1_cost(inputs, targets):
    prob = inputs.sigmoid()
    # |p - y| = p (1 - y) + (1 - p) y for binary y
    return (prob @ (1 - targets).T + (1 - prob) @ targets.T) / inputs.shape[1]


if "toy_l1" not in MASK_LOSSES:
    register_mask_loss("toy_l1", MaskLossType(toy_l1_loss, toy_l1_cost, "loss_toy_l1", True, "TOY_L1_WEIGHT"))


# ------------------------------------------------------------------ a toy pixel decoder: one 1x1 conv
if "ToyPixelDecoder" not in PIXEL_DECODER_REGISTRY:

    @PIXEL_DECODER_REGISTRY.register()
    class ToyPixelDecoder(nn.Module):
        """Per-pixel embeddings = a 1x1 conv of the finest backbone feature; no encoder."""

        transformer_encoder_channels = None

        @configurable
        def __init__(self, *, in_feature: str, in_channels: int, mask_dim: int):
            super().__init__()
            self.in_feature = in_feature
            self.mask_dim = mask_dim
            self.proj = Conv2d(in_channels, mask_dim, kernel_size=1)

        @classmethod
        def from_config(cls, cfg, input_shape):
            finest = cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES[0]
            return {"in_feature": finest, "in_channels": input_shape[finest].channels,
                    "mask_dim": cfg.MODEL.SEM_SEG_HEAD.MASK_DIM}

        def forward_features(self, features):
            return self.proj(features[self.in_feature]), None


def toy_cfg(weight: float):
    cfg = tiny_cfg()
    cfg.MODEL.MASK_FORMER.TOY_L1_WEIGHT = weight
    cfg.MODEL.MASK_FORMER.MASK_LOSSES = ["toy_l1", "dice"]
    cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME = "ToyPixelDecoder"
    return cfg


def test_toy_loss_and_pixel_decoder_train_one_step():
    cfg = toy_cfg(weight=1.0)
    model, losses, grads = train_step(cfg, make_batch())
    layers = cfg.MODEL.MASK_FORMER.DEC_LAYERS
    keys = ("loss_ce", "loss_toy_l1", "loss_dice")
    assert set(losses) == set(keys) | {f"{k}_{i}" for k in keys for i in range(layers - 1)}
    assert all(torch.isfinite(v) for v in losses.values())
    # L1 between probabilities and binary targets, averaged per mask: within [0, 1]
    assert 0 < losses["loss_toy_l1"].item() < 1
    decoder = model.sem_seg_head.pixel_decoder
    assert type(decoder).__name__ == "ToyPixelDecoder"
    assert decoder.proj.weight.grad is not None and decoder.proj.weight.grad.abs().sum() > 0


def test_toy_loss_weight_comes_from_its_config_key():
    def run(weight):
        cfg = toy_cfg(weight)
        # focal first: it is then the matcher's mask cost, so the matching does not depend on the
        # toy weight and the toy loss must scale exactly with it
        cfg.MODEL.MASK_FORMER.MASK_LOSSES = ["focal", "toy_l1", "dice"]
        return train_step(cfg, make_batch())[1]

    unit, tripled = run(1.0), run(3.0)
    torch.testing.assert_close(tripled["loss_dice"], unit["loss_dice"])
    torch.testing.assert_close(tripled["loss_toy_l1"], 3 * unit["loss_toy_l1"])
    torch.testing.assert_close(tripled["loss_toy_l1_0"], 3 * unit["loss_toy_l1_0"])
    matcher = build_matcher(toy_cfg(weight=3.0))  # toy_l1 first: the matcher's mask cost
    assert matcher.mask_cost_type == "toy_l1" and matcher.cost_mask == 3.0


def test_toy_cost_is_the_loss_of_each_pair():
    """The toy cost of (query, target) equals the toy loss of that one pair, by brute force."""
    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(4, 30, generator=g)
    targets = (torch.rand(3, 30, generator=g) > 0.5).float()
    cost = toy_l1_cost(inputs, targets)
    for q in range(4):
        for t in range(3):
            torch.testing.assert_close(cost[q, t], toy_l1_loss(inputs[q:q + 1], targets[t:t + 1], 1))
