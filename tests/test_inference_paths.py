"""MaskFormer's optimised inference paths against the reference path (``optimize_inference = False``):
the fp32 path equals it to 1e-4 of the largest score, the bf16 path agrees on >= 99.5 % of the
semantic argmax pixels, folding leaves the modules and the state dict alone, and the pieces
(band-wise upsampling, semantic combination, folded convolutions, channels-last mask logits)
equal what they replace."""
import copy
import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from detectron2.layers import Conv2d, FrozenBatchNorm2d, get_norm
from detectron2.modeling import build_model
from detectron2.structures import Instances
from torch import nn
from torch.nn import functional as F

from mask_former.modeling.inference_optimization import (
    PRECISIONS,
    InferenceWeights,
    semantic_scores_from_logits,
    semantic_scores_from_low_res,
    upsample_bilinear_crop,
    upsample_bilinear_rows,
    upsample_rows_scratch_size,
)
from mask_former.modeling.meta_arch import base as base_meta_arch
from mask_former.modeling.postprocessing import semantic_inference
from mask_former.modeling.transformer_decoder.standard_transformer_decoder import mask_logits
from model_utils import tiny_cfg
from test_model import tiny_all_tasks_cfg, tiny_swin_cfg
from test_msdeform_pixel_decoder import small_msdeform_cfg

EXACT = 1e-4  # max |difference| / max |reference score| of the exact (fp32) path


def randomize_norms(model: nn.Module, seed: int = 0) -> None:
    """Batch-norm statistics and affine parameters like a trained network's (not the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d)):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)


def build(cfg, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    randomize_norms(model, seed)
    return model


def images(sizes, output_sizes=None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    batch = []
    for i, (h, w) in enumerate(sizes):
        x = {"image": torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8).float()}
        if output_sizes and output_sizes[i]:
            x["height"], x["width"] = output_sizes[i]
        batch.append(x)
    return batch


def both_paths(model, batch):
    """(optimised results, reference results) of the same model on the same batch."""
    with torch.no_grad():
        model.optimize_inference = True
        fast = model(batch)
        model.optimize_inference = False
        reference = model(batch)
        model.optimize_inference = True
    return fast, reference


def relative_difference(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def argmax_agreement(a, b) -> float:
    return float((a.argmax(0) == b.argmax(0)).float().mean())


# ------------------------------------------------------------------------------ the whole model
@pytest.mark.parametrize("norm", ["BN", "FrozenBN"])
@pytest.mark.parametrize("fold", [None, True])
def test_fp32_path_equals_reference(norm, fold):
    cfg = tiny_cfg()
    cfg.MODEL.RESNETS.NORM = norm
    model = build(cfg)
    # different sizes (padding), an output larger and one of another aspect than the input
    batch = images([(64, 48), (40, 56), (33, 30)], [None, (100, 75), (20, 41)])
    fast, reference = both_paths(model, batch)
    if fold:  # the batch norms folded, as the bf16 path does (fp32 keeps no folded copies)
        with torch.no_grad():
            padded = model.preprocess_images(batch)
            outputs = model.run_network_for_inference(padded.tensor, fold_norms=True)
            fast = model.optimized_inference(outputs, batch, padded)
    folded_layers = len(model.prepare_for_inference(fold=fold))
    assert folded_layers > 0 if fold else folded_layers == 0
    for a, b, x in zip(fast, reference, batch):
        size = (x.get("height", x["image"].shape[1]), x.get("width", x["image"].shape[2]))
        assert a["sem_seg"].shape == b["sem_seg"].shape == (3, *size)
        assert a["sem_seg"].dtype == torch.float32
        assert relative_difference(a["sem_seg"], b["sem_seg"]) < EXACT


def test_fp32_path_equals_reference_for_panoptic_and_instances():
    cfg = tiny_all_tasks_cfg("_test_inference_paths_panoptic_meta")
    model = build(cfg, seed=1)
    batch = images([(64, 48), (56, 40)], [(100, 75), None])
    fast, reference = both_paths(model, batch)
    for a, b in zip(fast, reference):
        assert relative_difference(a["sem_seg"], b["sem_seg"]) < EXACT
        pan_a, seg_a = a["panoptic_seg"]
        pan_b, seg_b = b["panoptic_seg"]
        assert (pan_a == pan_b).float().mean() > 0.999
        assert [s["category_id"] for s in seg_a] == [s["category_id"] for s in seg_b]
        inst_a, inst_b = a["instances"], b["instances"]
        assert torch.equal(inst_a.pred_classes, inst_b.pred_classes)
        assert torch.allclose(inst_a.scores, inst_b.scores, atol=1e-4)
        assert (inst_a.pred_masks == inst_b.pred_masks).float().mean() > 0.999


def test_fp32_path_equals_reference_with_transformer_encoder_and_swin():
    cfg = tiny_swin_cfg()
    cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME = "TransformerEncoderPixelDecoder"
    cfg.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS = 1
    cfg.MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE = "transformer_encoder"
    model = build(cfg)
    batch = images([(64, 64), (48, 60)], [None, (30, 30)])
    fast, reference = both_paths(model, batch)
    for a, b in zip(fast, reference):
        assert relative_difference(a["sem_seg"], b["sem_seg"]) < EXACT


@pytest.mark.parametrize("precision, tolerance", [("bf16", 0.1), ("fp16", 0.01)])  # fp16: 1.7e-3 measured
def test_low_precision_path_agrees_with_fp32(precision, tolerance):
    cfg = tiny_cfg()
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    cfg.MODEL.MASK_FORMER.TEST.PRECISION = precision
    model = build(cfg, seed=2)
    batch = images([(96, 128), (80, 64)], seed=2)
    fast, reference = both_paths(model, batch)
    assert model.prepare_for_inference().dtype == PRECISIONS[precision]
    for a, b in zip(fast, reference):
        assert a["sem_seg"].dtype == torch.float32  # post-processing in float32
        assert argmax_agreement(a["sem_seg"], b["sem_seg"]) >= 0.995
        assert relative_difference(a["sem_seg"], b["sem_seg"]) < tolerance


@pytest.mark.parametrize("make_cfg", [tiny_swin_cfg, small_msdeform_cfg], ids=["swin", "msdeform"])
def test_fp16_path_of_attention_backbones_and_deformable_decoders(make_cfg):
    """Swin's window attention and the gathered deformable attention in float16 (measured: 5.7e-4
    and 1.1e-3 of the largest score)."""
    cfg = make_cfg()
    cfg.MODEL.MASK_FORMER.TEST.PRECISION = "fp16"
    model = build(cfg, seed=2)
    fast, reference = both_paths(model, images([(96, 128)], seed=2))
    assert argmax_agreement(fast[0]["sem_seg"], reference[0]["sem_seg"]) >= 0.995
    assert relative_difference(fast[0]["sem_seg"], reference[0]["sem_seg"]) < 0.01


def test_precision_key():
    cfg = tiny_cfg()
    assert cfg.MODEL.MASK_FORMER.TEST.PRECISION == "fp32"
    assert build_model(cfg).precision == "fp32"
    cfg.MODEL.MASK_FORMER.TEST.PRECISION = "fp16"
    assert build_model(cfg).precision == "fp16"
    cfg.MODEL.MASK_FORMER.TEST.PRECISION = "fp8"
    with pytest.raises(ValueError, match="MODEL.MASK_FORMER.TEST.PRECISION.*'fp8'"):
        build_model(cfg)


def test_fp16_on_a_cpu_is_run_with_a_warning(caplog):
    cfg = tiny_cfg()
    cfg.MODEL.MASK_FORMER.TEST.PRECISION = "fp16"
    model = build(cfg)
    with caplog.at_level(logging.WARNING), torch.no_grad():
        model(images([(64, 48)]))
    assert "fp16 on a CPU" in caplog.text and "bf16 is the CPU fast path" in caplog.text


@pytest.mark.parametrize("fast_bf16", [False, True])
def test_bf16_on_a_cpu_without_bf16_kernels_is_run_with_a_warning(caplog, monkeypatch, fast_bf16):
    """Where PyTorch has no bfloat16 kernels for the CPU (AVX2), bf16 is slower than fp32: said once
    per model; where it has them, nothing is said."""
    monkeypatch.setattr(base_meta_arch, "cpu_runs_bf16_fast", lambda: fast_bf16)
    cfg = tiny_cfg()
    cfg.MODEL.MASK_FORMER.TEST.PRECISION = "bf16"
    model = build(cfg)
    with caplog.at_level(logging.WARNING), torch.no_grad():
        model(images([(64, 48)]))
        model(images([(64, 48)]))
    warnings = [r for r in caplog.records if "PRECISION bf16 on a CPU" in r.getMessage()]
    assert len(warnings) == (0 if fast_bf16 else 1)
    if warnings:
        assert "slower than fp32" in warnings[0].getMessage()
        assert torch.backends.cpu.get_cpu_capability() in warnings[0].getMessage()


def test_a_folded_weight_beyond_float16_is_named():
    """A frozen batch norm of tiny variance folds into weights beyond float16's 65504: fp16 inference
    names the convolution and points to bf16; bf16 (float32's range) folds it."""
    cfg = tiny_cfg()
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    for precision in ("fp16", "bf16"):
        cfg.MODEL.MASK_FORMER.TEST.PRECISION = precision
        model = build(cfg)
        with torch.no_grad():
            model.backbone.stem.conv1.norm.running_var.fill_(0.0)
            model.backbone.stem.conv1.weight.fill_(1000.0)  # folded: 1000 / sqrt(eps 1e-5) = 3e5
            if precision == "fp16":
                with pytest.raises(ValueError, match="'backbone.stem.conv1' with its batch norm folded in "
                                                     "does not fit torch.float16.*bf16"):
                    model(images([(64, 48)]))
            else:
                model(images([(64, 48)]))


def test_a_weight_beyond_float16_is_named():
    cfg = tiny_cfg()
    cfg.MODEL.MASK_FORMER.TEST.PRECISION = "fp16"
    model = build(cfg)
    with torch.no_grad():
        model.sem_seg_head.predictor.class_embed.weight[0, 0] = 1e6
        with pytest.raises(ValueError, match="the weight 'sem_seg_head.predictor.class_embed.weight' does not fit"):
            model(images([(64, 48)]))


def test_bf16_path_writes_outputs_into_the_memory_of_those_let_go_of():
    cfg = tiny_cfg()
    cfg.MODEL.MASK_FORMER.TEST.PRECISION = "bf16"
    model = build(cfg, seed=3)
    first_batch, second_batch = images([(64, 48)], seed=3), images([(64, 48)], seed=4)
    with torch.no_grad():
        expected_first = model(first_batch)[0]["sem_seg"].clone()
        expected_second = model(second_batch)[0]["sem_seg"].clone()
        kept = model(first_batch)[0]["sem_seg"]
        second = model(second_batch)[0]["sem_seg"]  # the caller still holds `kept`
        assert second.data_ptr() != kept.data_ptr()
        assert torch.equal(kept, expected_first) and torch.equal(second, expected_second)
        address = second.data_ptr()
        del kept, second
        third = model(first_batch)[0]["sem_seg"]
    assert third.data_ptr() == address
    assert torch.equal(third, expected_first)
    model.train()
    assert model._inference_buffers is None  # training frees the memory


@pytest.mark.parametrize("setting, reused", [(None, False), (True, True), (False, False)])
def test_reuse_output_memory_key_in_fp32(setting, reused):
    cfg = tiny_cfg()
    cfg.MODEL.MASK_FORMER.TEST.REUSE_OUTPUT_MEMORY = setting
    model = build(cfg)
    batch = images([(40, 56)])
    with torch.no_grad():
        expected = model(batch)[0]["sem_seg"].clone()
        assert (model._inference_buffers is not None) == reused  # the default keeps no memory in fp32
        got = model(batch)[0]["sem_seg"]
    assert torch.equal(got, expected)


def test_reuse_output_memory_key_is_checked():
    cfg = tiny_cfg()
    cfg.MODEL.MASK_FORMER.TEST.REUSE_OUTPUT_MEMORY = "yes"
    with pytest.raises(ValueError, match="MODEL.MASK_FORMER.TEST.REUSE_OUTPUT_MEMORY='yes'"):
        build_model(cfg)


# ------------------------------------------------------------------------------ model state
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_preparing_leaves_modules_and_state_dict_alone(precision):
    cfg = tiny_cfg()
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    cfg.MODEL.MASK_FORMER.TEST.PRECISION = precision
    model = build(cfg)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [(name, type(m)) for name, m in model.named_modules()]
    with torch.no_grad():
        model(images([(64, 48)]))
    model.prepare_for_inference()
    after = model.state_dict()
    assert list(after) == list(state)
    assert all(torch.equal(after[k], v) for k, v in state.items())
    assert [(name, type(m)) for name, m in model.named_modules()] == modules
    assert all(p.dtype == torch.float32 and isinstance(p, nn.Parameter) for p in model.parameters())
    # the folded forward is installed only while the optimised network runs
    assert not any("forward" in vars(m) for m in model.modules())
    # and the model still deep-copies and trains
    copy.deepcopy(model)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_optimised_inference_stores_conv_weights_channels_last(precision):
    """The optimised path's activations are channels-last: it stores every convolution weight so,
    in place (the same values and Parameter objects, as training does), and the low-precision
    copies take that layout, so that no weight is reordered at every call."""
    cfg = tiny_cfg()
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    cfg.MODEL.MASK_FORMER.TEST.PRECISION = precision
    model = build(cfg)
    convs = {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    before = {name: (m.weight, m.weight.detach().clone()) for name, m in convs.items()}
    assert not all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs.values())
    with torch.no_grad():
        expected = model(images([(64, 48)]))[0]["sem_seg"].clone()  # the first call stores them
        got = model(images([(64, 48)]))[0]["sem_seg"]
    assert torch.equal(got, expected)
    for name, m in convs.items():
        parameter, values = before[name]
        assert m.weight is parameter and torch.equal(m.weight, values), name
        assert m.weight.is_contiguous(memory_format=torch.channels_last), name
    weights = model.prepare_for_inference()
    assert model.prepare_for_inference() is weights  # the new layout is what the copies describe
    four_d = [copy for copy in weights._cast.values() if copy.dim() == 4]
    assert (len(four_d) > 0) == (precision == "bf16")
    assert all(copy.is_contiguous(memory_format=torch.channels_last) for copy in four_d)


def test_training_is_unchanged_by_an_optimised_eval_pass():
    cfg = tiny_cfg()
    batch = images([(64, 48), (56, 48)])
    for x in batch:
        h, w = x["image"].shape[1:]
        inst = Instances((h, w))
        inst.gt_classes = torch.tensor([0, 2])
        masks = torch.zeros((2, h, w), dtype=torch.bool)
        masks[0, : h // 2] = True
        masks[1, h // 2:] = True
        inst.gt_masks = masks
        x["instances"] = inst

    def losses(model):
        torch.manual_seed(5)
        model.train()
        return {k: v.item() for k, v in model(batch).items()}

    model = build(cfg)
    before = losses(model)
    model.eval()
    with torch.no_grad():
        model([{"image": x["image"]} for x in batch])
    assert model._inference_weights is not None
    after = losses(model)
    assert after == before
    assert model._inference_weights is None  # train() drops the folded copy


def test_folded_weights_follow_weight_changes():
    cfg = tiny_cfg()
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    model = build(cfg)
    other = build(cfg, seed=7)
    batch = images([(64, 48)])

    def folded_path(model):  # fp32 with the batch norms folded (as bf16 runs)
        padded = model.preprocess_images(batch)
        outputs = model.run_network_for_inference(padded.tensor, fold_norms=True)
        return model.optimized_inference(outputs, batch, padded)[0]["sem_seg"]

    with torch.no_grad():
        folded_path(model)
        first = model.prepare_for_inference(fold=True)
        assert len(first) > 0
        assert model.prepare_for_inference(fold=True) is first  # nothing changed: reused
        model.load_state_dict(other.state_dict())  # copy_ into the same tensors
        assert model.prepare_for_inference(fold=True) is not first
        fast = folded_path(model)
        model.optimize_inference = False
        reference = model(batch)[0]["sem_seg"]
        expected = other(batch)[0]["sem_seg"]
    assert relative_difference(fast, reference) < EXACT
    assert relative_difference(fast, expected) < EXACT


def test_gradients_disable_the_optimised_path():
    model = build(tiny_cfg())
    out = model(images([(64, 48)]))  # grad mode on: the reference path, differentiable
    out[0]["sem_seg"].sum().backward()
    assert model._inference_weights is None
    assert any(p.grad is not None for p in model.parameters())


# ------------------------------------------------------------------------------ the pieces
@pytest.mark.parametrize("norm,activation", [("FrozenBN", None), ("BN", F.relu), ("GN", F.relu), ("", None)])
@pytest.mark.parametrize("kernel,stride", [(1, 1), (3, 1), (1, 2), (3, 2)])
def test_folded_convolution_equals_conv_and_norm(norm, activation, kernel, stride):
    torch.manual_seed(0)
    conv = Conv2d(8, 32, kernel_size=kernel, stride=stride, padding=kernel // 2, bias=norm == "",
                  norm=get_norm(norm, 32), activation=activation)
    module = nn.Sequential(conv).eval()
    randomize_norms(module)
    folded = InferenceWeights(module)
    assert len(folded) == (1 if norm in ("FrozenBN", "BN") else 0)
    x = torch.randn(2, 8, 20, 18)
    with torch.no_grad():
        expected = module(x)
        for layout in (torch.contiguous_format, torch.channels_last):
            with folded.active():
                got = module(x.contiguous(memory_format=layout))
            assert relative_difference(got, expected) < 1e-5
    assert "forward" not in vars(conv)
    assert folded.is_current(module)
    with torch.no_grad():
        conv.weight.mul_(2)  # a folded layer must be folded again; the others read it as they run
    assert folded.is_current(module) == (len(folded) == 0)


@pytest.mark.parametrize("low,factor", [((16, 12), 4), ((7, 9), 3), ((5, 5), 2), ((1, 3), 4)])
def test_upsample_rows_equal_the_full_upsampling(low, factor):
    x = torch.randn(2, 5, *low)
    full = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
    height, width = full.shape[-2:]
    for layout in (torch.contiguous_format, torch.channels_last):
        xl = x.contiguous(memory_format=layout)
        for r0 in range(height):
            for r1 in sorted({r0 + 1, min(height, r0 + 5), height}):
                for w in {1, width // 2 + 1, width}:
                    band = upsample_bilinear_rows(xl, factor, (r0, r1), w)
                    assert band.shape == (2, 5, r1 - r0, w)
                    torch.testing.assert_close(band, full[..., r0:r1, :w], rtol=1e-6, atol=1e-6)
                    # computed in a scratch sized for bands of up to 4 rows, reused band after band
                    if r1 - r0 <= 4:
                        scratch = torch.full((upsample_rows_scratch_size(xl, factor, 4, w),), float("nan"))
                        band = upsample_bilinear_rows(xl, factor, (r0, r1), w, scratch)
                        assert band.untyped_storage().data_ptr() == scratch.data_ptr()
                        torch.testing.assert_close(band, full[..., r0:r1, :w], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="scratch has 10 elements"):
        upsample_bilinear_rows(x, factor, (0, 2), width, torch.empty(10))


def test_upsample_crop_equals_upsample_then_crop():
    x = torch.randn(1, 4, 8, 10)
    for full_size, crop in [((32, 40), (29, 33)), ((32, 40), (32, 40)), ((30, 41), (17, 41))]:
        expected = F.interpolate(x, size=full_size, mode="bilinear", align_corners=False)
        expected = expected[..., : crop[0], : crop[1]]
        torch.testing.assert_close(upsample_bilinear_crop(x, full_size, crop), expected)


@pytest.mark.parametrize("tile_rows", [1, 7, 32])
def test_semantic_scores_equal_semantic_inference(tile_rows):
    g = torch.Generator().manual_seed(0)
    mask_cls = torch.randn(6, 5, generator=g) * 3
    mask_pred = torch.randn(6, 10, 12, generator=g) * 4
    for full_size, crop in [((40, 48), (40, 48)), ((40, 48), (37, 29)), ((35, 48), (30, 44))]:
        logits = F.interpolate(mask_pred[None], size=full_size, mode="bilinear", align_corners=False)[0]
        expected = semantic_inference(mask_cls, logits)[:, : crop[0], : crop[1]]
        got = semantic_scores_from_low_res(mask_cls, mask_pred, full_size, crop, tile_rows)
        assert relative_difference(got, expected) < 1e-6
        got = semantic_scores_from_logits(mask_cls, logits[:, : crop[0], : crop[1]], tile_rows)
        assert relative_difference(got, expected) < 1e-6


def test_semantic_scores_write_into_out():
    g = torch.Generator().manual_seed(1)
    mask_cls, mask_pred = torch.randn(6, 5, generator=g), torch.randn(6, 10, 12, generator=g) * 4
    logits = F.interpolate(mask_pred[None], size=(40, 48), mode="bilinear", align_corners=False)[0]
    expected = semantic_inference(mask_cls, logits)
    for compute, args in [(semantic_scores_from_low_res, (mask_pred, (40, 48), (40, 48))),
                          (semantic_scores_from_logits, (logits,))]:
        out = torch.full((4, 40, 48), float("nan"))
        assert compute(mask_cls, *args, out=out) is out
        assert relative_difference(out, expected) < 1e-6
        for bad in (torch.empty(4, 40, 47), torch.empty(4, 40, 48, dtype=torch.float64),
                    torch.empty(4, 48, 40).transpose(1, 2)):
            with pytest.raises(ValueError, match=r"contiguous float32 tensor of shape \(4, 40, 48\)"):
                compute(mask_cls, *args, out=bad)


def test_channels_last_mask_logits_equal_einsum():
    mask_embed = torch.randn(2, 3, 5, 8)
    features = torch.randn(3, 8, 6, 7)
    expected = torch.einsum("lbqc,bchw->lbqhw", mask_embed, features)
    got = mask_logits(mask_embed, features.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected)
    # one layer, as in inference: channels-last, what the band-wise upsampling reads
    assert mask_logits(mask_embed[-1:], features.contiguous(memory_format=torch.channels_last))[0].is_contiguous(
        memory_format=torch.channels_last)
    torch.testing.assert_close(mask_logits(mask_embed, features), expected)


@pytest.mark.parametrize("channels_last", [False, True])
def test_mask_logits_gradients_equal_einsum(channels_last):
    """Training takes the layers apart with ``unbind``: the gradients reaching the embeddings and
    the features are einsum's."""
    mask_embed = torch.randn(3, 2, 4, 8, requires_grad=True)
    features = torch.randn(2, 8, 5, 6)
    if channels_last:
        features = features.contiguous(memory_format=torch.channels_last)
    features.requires_grad_(True)
    upstream = torch.randn(3, 2, 4, 5, 6)
    expected = torch.autograd.grad((torch.einsum("lbqc,bchw->lbqhw", mask_embed, features) * upstream).sum(),
                                   [mask_embed, features])
    layers = mask_logits(mask_embed, features).unbind(0)
    got = torch.autograd.grad(sum((layer * u).sum() for layer, u in zip(layers, upstream)), [mask_embed, features])
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


def test_swin_outputs_keep_the_input_layout():
    cfg = tiny_swin_cfg()
    backbone = build_model(cfg).backbone.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        planar = backbone(x)
        channels_last = backbone(x.contiguous(memory_format=torch.channels_last))
    for name, feature in planar.items():
        assert feature.is_contiguous()
        assert channels_last[name].is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(channels_last[name], feature, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------ the benchmark
def test_benchmark_inference_tool_runs(tmp_path):
    """tools/benchmark_inference.py on the built-in model's config at 64x64 (one round, no memory
    subprocesses): every path is timed and compared with the reference."""
    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("benchmark_inference_tool",
                                                  repo / "tools" / "benchmark_inference.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "bench.json"
    tool.main(["--config-file", str(repo / "configs/synthetic/maskformer_panoptic_R18.yaml"),
               "--input-size", "64", "64", "--runs", "1", "--warmup", "0", "--settle", "0",
               "--no-memory", "--levers", "--json", str(out)])
    report = json.loads(out.read_text())
    paths = report["paths"]
    assert set(paths) >= {"reference", "fp32", "bf16"}
    assert paths["reference"]["cpu_ratio"] == 1.0
    assert paths["fp32"]["agreement"]["sem_seg_max_rel_diff"] < EXACT
    assert paths["bf16"]["agreement"]["sem_seg_argmax_agreement"] >= 0.995
    assert "amx_bf16" in report["cpu"]


def test_benchmark_inference_memory_repeats(monkeypatch):
    """--memory-repeats: the paths take turns in fresh subprocesses (stubbed here with fixed
    figures); medians, ratios paired by turn and their range, as worked out by hand."""
    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("benchmark_inference_tool",
                                                  repo / "tools" / "benchmark_inference.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    figures = {"reference": [500.0, 400.0, 600.0], "bf16": [300.0, 320.0, 330.0]}
    order = []

    def fake_measure(args, path):
        order.append(path)
        inference = figures[path][sum(p == path for p in order) - 1]
        return {"rss_after_build_mb": 1000.0, "peak_rss_mb": 1000.0 + inference, "inference_mb": inference,
                "peak_reset_after_build": True}

    monkeypatch.setattr(tool, "measure_memory", fake_measure)
    args = tool.get_parser().parse_args(["--config-file", "x.yaml", "--memory-repeats", "3"])
    memory = tool.measure_memory_repeated(args, ["reference", "bf16"])
    assert order == ["reference", "bf16"] * 3  # turns, not one path after the other
    bf16 = memory["bf16"]
    assert bf16["inference_mb"] == 320.0 and bf16["inference_mb_all"] == [300.0, 320.0, 330.0]
    # per turn 300/500 = 0.6, 320/400 = 0.8, 330/600 = 0.55: median 0.6, range 0.55-0.8
    assert bf16["inference_mb_ratio"] == pytest.approx(0.6)
    assert bf16["inference_mb_ratio_range"] == pytest.approx([0.55, 0.8])
    assert memory["reference"]["inference_mb_ratio"] == 1.0
    assert tool._memory_cell(bf16, "inference_mb") == "320 (0.60x, 0.55-0.80x)"
    assert tool._memory_cell(memory["reference"], "inference_mb") == "500 (1.00x)"
    with pytest.raises(SystemExit):
        tool.check_args(tool.get_parser(), tool.get_parser().parse_args(
            ["--config-file", "x.yaml", "--memory-repeats", "0"]))


@pytest.mark.parametrize("preset,expected", [(None, "1"), ("0", "0")])
def test_import_turns_on_huge_pages_for_large_tensors_unless_set(preset, expected):
    """``import mask_former`` sets THP_MEM_ALLOC_ENABLE=1 (read by torch at its first large
    allocation) unless the user set it."""
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if preset is not None:
        env["THP_MEM_ALLOC_ENABLE"] = preset
    code = "import os, torch, mask_former; print(os.environ['THP_MEM_ALLOC_ENABLE'])"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == expected
