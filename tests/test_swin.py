"""Tests of the Swin Transformer backbone and of the official-checkpoint converter."""
import importlib.util
import math
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone
from torch import nn

from mask_former.config import add_mask_former_config
from mask_former.modeling.backbone.swin import (
    D2SwinTransformer,
    PatchMerging,
    SwinStage,
    WindowAttention,
    relative_position_index,
    shifted_window_attention_mask,
    window_partition,
    window_reverse,
    zero_masked_attention,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
CONVERTER = REPO_ROOT / "tools" / "convert-pretrained-swin-model-to-d2.py"


def swin_cfg(**swin_keys):
    cfg = get_cfg()
    add_mask_former_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "D2SwinTransformer"
    for key, value in swin_keys.items():
        cfg.MODEL.SWIN[key] = value
    return cfg


def small_swin_cfg(**swin_keys):
    keys = dict(EMBED_DIM=32, DEPTHS=[2, 2, 2, 2], NUM_HEADS=[1, 2, 4, 8], DROP_PATH_RATE=0.0)
    keys.update(swin_keys)
    return swin_cfg(**keys)


def build_swin(cfg):
    return build_backbone(cfg, ShapeSpec(channels=3))


# ----------------------------------------------------------------------- checkpoint layout
def read_reference_backbone(reference_layout, filename):
    """The backbone part of a published layout, keys without the ``backbone.`` prefix."""
    prefix = "backbone."
    return {k[len(prefix):]: v for k, v in reference_layout(filename).items() if k.startswith(prefix)}


@pytest.mark.parametrize(
    "reference, swin_keys",
    [
        ("ade20k-150__swin__maskformer_swin_tiny_bs16_160k.txt", {}),
        (
            "coco-panoptic__swin__maskformer_panoptic_swin_base_IN21k_384_bs64_554k.txt",
            dict(
                EMBED_DIM=128,
                DEPTHS=[2, 2, 18, 2],
                NUM_HEADS=[4, 8, 16, 32],
                WINDOW_SIZE=12,
                PRETRAIN_IMG_SIZE=384,
            ),
        ),
    ],
)
def test_state_dict_matches_published_checkpoint(reference_layout, reference, swin_keys):
    expected = read_reference_backbone(reference_layout, reference)
    assert len(expected) > 100, f"parsed too few backbone keys from {reference}"
    # Only names, shapes and dtypes matter here: build without allocating (Swin-B has 88M values).
    with torch.device("meta"):
        model = build_swin(swin_cfg(**swin_keys))
    actual = {
        k: (tuple(v.shape), str(v.dtype).replace("torch.", ""))
        for k, v in model.state_dict().items()
    }
    assert sorted(set(expected) - set(actual)) == []
    assert sorted(set(actual) - set(expected)) == []
    mismatched = {k: (actual[k], expected[k]) for k in expected if actual[k] != expected[k]}
    assert mismatched == {}


# ----------------------------------------------------------------------- building blocks
def test_window_partition_known_answer_and_round_trip():
    x = torch.arange(16.0).view(1, 4, 4, 1)
    windows = window_partition(x, 2)
    expected = torch.tensor(
        [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]], dtype=torch.float
    )
    assert torch.equal(windows.squeeze(-1), expected)

    y = torch.randn(2, 6, 4, 3)
    assert window_partition(y, 2).shape == (2 * 3 * 2, 4, 3)
    assert torch.equal(window_reverse(window_partition(y, 2), 2, 6, 4), y)

    with pytest.raises(ValueError, match="5x4"):
        window_partition(torch.zeros(1, 5, 4, 1), 2)


def test_relative_position_index_known_answer():
    # Window 2, tokens (row, col): 0=(0,0) 1=(0,1) 2=(1,0) 3=(1,1);
    # index = (d_row + 1) * 3 + (d_col + 1) with d = p_i - p_j.
    expected = torch.tensor([[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]])
    index = relative_position_index(2)
    assert index.dtype == torch.int64
    assert torch.equal(index, expected)

    index7 = relative_position_index(7)
    assert index7.shape == (49, 49)
    assert int(index7.min()) == 0 and int(index7.max()) == 13 * 13 - 1
    # token 0 = (0,0), token 48 = (6,6): d = (-6,-6) -> 0; reversed d = (6,6) -> 168.
    assert int(index7[0, 48]) == 0 and int(index7[48, 0]) == 168
    assert torch.all(index7.diagonal() == 6 * 13 + 6)


def test_shifted_window_mask_blocks_wrapped_neighbours():
    """Two tokens of a shifted window may attend to each other iff the cyclic shift did not
    separate them: their offset after the shift equals their offset in the original map."""
    height, width, window, shift = 8, 12, 4, 2
    mask = shifted_window_attention_mask(height, width, window, shift)
    num_windows = (height // window) * (width // window)
    assert mask.shape == (num_windows, window * window, window * window)

    expected = torch.zeros_like(mask)
    for w in range(num_windows):
        top, left = (w // (width // window)) * window, (w % (width // window)) * window
        cells = [(top + i // window, left + i % window) for i in range(window * window)]
        # position of each shifted cell in the original (unshifted) map
        origin = [((r + shift) % height, (c + shift) % width) for r, c in cells]
        for i in range(len(cells)):
            for j in range(len(cells)):
                same_offset = (
                    cells[i][0] - cells[j][0] == origin[i][0] - origin[j][0]
                    and cells[i][1] - cells[j][1] == origin[i][1] - origin[j][1]
                )
                expected[w, i, j] = 0.0 if same_offset else -100.0
    assert torch.equal(mask, expected)
    # windows away from the bottom/right border are not masked at all
    assert torch.all(mask[0] == 0)


def test_shifted_window_mask_with_minus_infinity():
    original = shifted_window_attention_mask(14, 21, 7, 3)
    mask = shifted_window_attention_mask(14, 21, 7, 3, masked_logit=float("-inf"))
    assert torch.equal(mask, torch.where(original == -100.0, float("-inf"), 0.0))
    assert bool((original == -100.0).any())
    # every token may attend to itself: no row is masked entirely (a softmax of all -inf is NaN)
    assert torch.all(mask.diagonal(dim1=1, dim2=2) == 0)


def test_zero_masked_attention_keeps_the_outputs(swin_masked_logits):
    """Inside ``zero_masked_attention`` the shifted windows are masked with -inf: the masked pairs'
    weights are exactly 0 instead of ~e^-100, the same outputs to float rounding."""
    masked_logits = swin_masked_logits
    torch.manual_seed(0)
    model = build_swin(small_swin_cfg(WINDOW_SIZE=4)).eval()
    images = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        expected = model(images)
        assert set(masked_logits) == {-100.0}
        masked_logits.clear()
        with zero_masked_attention():
            got = model(images)
        assert set(masked_logits) == {float("-inf")}
        masked_logits.clear()
        model(images)  # the context is left: -100 again
        assert set(masked_logits) == {-100.0}
    for name in expected:
        assert torch.isfinite(got[name]).all()
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-5)


def test_window_attention_matches_naive_attention():
    torch.manual_seed(0)
    dim, heads, window = 8, 2, 2
    n, d = window * window, dim // heads
    attn = WindowAttention(dim, window, heads).eval()
    with torch.no_grad():
        attn.relative_position_bias_table.normal_()
        attn.qkv.bias.normal_()
    x = torch.randn(6, n, dim)  # batch 3 x 2 windows
    mask = (torch.rand(2, n, n) > 0.5).float() * -100.0

    out = attn(x, mask)

    coords = [(i // window, i % window) for i in range(n)]
    expected = torch.zeros(6, n, dim)
    for b in range(6):
        qkv = x[b] @ attn.qkv.weight.T + attn.qkv.bias  # n x 3*dim, laid out (3, heads, d)
        heads_out = []
        for h in range(heads):
            q = qkv[:, h * d : (h + 1) * d]
            k = qkv[:, dim + h * d : dim + (h + 1) * d]
            v = qkv[:, 2 * dim + h * d : 2 * dim + (h + 1) * d]
            logits = (q @ k.T) * d**-0.5
            for i in range(n):
                for j in range(n):
                    dr = coords[i][0] - coords[j][0] + window - 1
                    dc = coords[i][1] - coords[j][1] + window - 1
                    logits[i, j] += attn.relative_position_bias_table[dr * (2 * window - 1) + dc, h]
            logits = logits + mask[b % 2]
            heads_out.append(torch.softmax(logits, dim=-1) @ v)
        expected[b] = torch.cat(heads_out, dim=-1) @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def naive_swin_block(block, x):
    """Token-by-token reference of one Swin block on a B=1 map ``x`` (1 x H x W x C).

    As in the published implementation, the normalized map is zero-padded at the bottom/right
    to multiples of the window, and the padded tokens take part as keys. With shift s, the
    window grid starts at (s, s) and wraps around the padded map; a token attends to the tokens
    of its window that the wrap did not separate from it."""
    ws, s = block.window_size, block.shift_size
    attn = block.attn
    _, H, W, C = x.shape
    Hp, Wp = math.ceil(H / ws) * ws, math.ceil(W / ws) * ws
    y = torch.zeros(Hp, Wp, C)
    y[:H, :W] = block.norm1(x[0])
    heads, d = attn.num_heads, C // attn.num_heads
    qkv = y @ attn.qkv.weight.T + attn.qkv.bias  # Hp x Wp x 3C, laid out (3, heads, d)

    def shifted(r, c):
        return (r - s) % Hp, (c - s) % Wp

    out = torch.zeros(H, W, C)
    for r in range(H):
        for c in range(W):
            sr, sc = shifted(r, c)
            keys = []
            for r2 in range(Hp):
                for c2 in range(Wp):
                    sr2, sc2 = shifted(r2, c2)
                    same_window = (sr // ws, sc // ws) == (sr2 // ws, sc2 // ws)
                    if same_window and (sr - sr2, sc - sc2) == (r - r2, c - c2):
                        keys.append((r2, c2, r - r2, c - c2))
            per_head = []
            for h in range(heads):
                q = qkv[r, c, h * d : (h + 1) * d]
                logits, values = [], []
                for r2, c2, dr, dc in keys:
                    k = qkv[r2, c2, C + h * d : C + (h + 1) * d]
                    table_row = (dr + ws - 1) * (2 * ws - 1) + (dc + ws - 1)
                    bias = attn.relative_position_bias_table[table_row, h]
                    logits.append((q @ k) * d**-0.5 + bias)
                    values.append(qkv[r2, c2, 2 * C + h * d : 2 * C + (h + 1) * d])
                weights = torch.softmax(torch.stack(logits), dim=0)
                per_head.append(weights @ torch.stack(values))
            out[r, c] = torch.cat(per_head) @ attn.proj.weight.T + attn.proj.bias
    z = x[0] + out
    return (z + block.mlp(block.norm2(z)))[None]


def test_swin_stage_matches_token_by_token_reference():
    """A stage of a regular and a shifted block on a map that needs padding (5x7, window 4)."""
    torch.manual_seed(0)
    stage = SwinStage(
        dim=4,
        depth=2,
        num_heads=2,
        window_size=4,
        mlp_ratio=2.0,
        qkv_bias=True,
        qk_scale=None,
        drop=0.0,
        attn_drop=0.0,
        drop_path=[0.0, 0.0],
        downsample=False,
    ).eval()
    with torch.no_grad():
        for block in stage.blocks:
            block.attn.relative_position_bias_table.normal_()
            block.attn.qkv.bias.normal_()
    assert [b.shift_size for b in stage.blocks] == [0, 2]
    x = torch.randn(1, 5, 7, 4)
    with torch.no_grad():
        out, _ = stage(x)
        expected = naive_swin_block(stage.blocks[1], naive_swin_block(stage.blocks[0], x))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_patch_merging_neighbour_order_and_odd_padding():
    merge = PatchMerging(1)
    captured = {}
    merge.norm.register_forward_hook(lambda m, inp, out: captured.update(x=inp[0]))
    # 3x3 map, C=1: [[1,2,3],[4,5,6],[7,8,9]], zero-padded to 4x4
    out = merge(torch.arange(1.0, 10.0).view(1, 3, 3, 1))
    assert out.shape == (1, 2, 2, 2)
    # concatenation order: (0,0), (1,0), (0,1), (1,1) of each 2x2 neighbourhood
    expected = torch.tensor(
        [[[1, 4, 2, 5], [3, 6, 0, 0]], [[7, 0, 8, 0], [9, 0, 0, 0]]], dtype=torch.float
    )
    assert torch.equal(captured["x"][0], expected)


# ----------------------------------------------------------------------- backbone
@pytest.mark.parametrize("batch, height, width", [(1, 67, 93), (2, 64, 64)])
def test_forward_shapes_any_size(batch, height, width):
    torch.manual_seed(0)
    model = build_swin(small_swin_cfg()).eval()
    assert isinstance(model, D2SwinTransformer)
    assert model.size_divisibility == 32
    expected_specs = {
        "res2": (32, 4),
        "res3": (64, 8),
        "res4": (128, 16),
        "res5": (256, 32),
    }
    specs = model.output_shape()
    assert {k: (s.channels, s.stride) for k, s in specs.items()} == expected_specs

    with torch.no_grad():
        outputs = model(torch.randn(batch, 3, height, width))
    assert sorted(outputs) == sorted(expected_specs)
    for name, (channels, stride) in expected_specs.items():
        assert outputs[name].shape == (
            batch,
            channels,
            math.ceil(height / stride),
            math.ceil(width / stride),
        ), name
        assert torch.isfinite(outputs[name]).all(), name


def test_batch_elements_are_independent():
    """Windows and masks are shared across the batch but each image is processed alone."""
    torch.manual_seed(0)
    model = build_swin(small_swin_cfg(WINDOW_SIZE=4)).eval()
    images = torch.randn(3, 3, 50, 70)
    with torch.no_grad():
        batched = model(images)
        single = model(images[1:2])
    for name in batched:
        torch.testing.assert_close(batched[name][1:2], single[name], rtol=1e-4, atol=1e-4)


def test_out_features_subset_and_absolute_position_embedding():
    model = build_swin(small_swin_cfg(OUT_FEATURES=["res5", "res3"], APE=True)).eval()
    keys = model.state_dict().keys()
    assert "absolute_pos_embed" in keys
    assert model.state_dict()["absolute_pos_embed"].shape == (1, 32, 56, 56)
    assert {k.split(".")[0] for k in keys if k.startswith("norm")} == {"norm1", "norm3"}
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, 40, 40))
    assert {k: tuple(v.shape) for k, v in outputs.items()} == {
        "res3": (1, 64, 5, 5),
        "res5": (1, 256, 2, 2),
    }


def test_training_step_reaches_every_parameter_and_drop_path_schedule():
    torch.manual_seed(0)
    model = build_swin(small_swin_cfg())
    outputs = model(torch.randn(2, 3, 32, 48))
    sum(o.square().mean() for o in outputs.values()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert no_grad == []

    model = build_swin(small_swin_cfg(DROP_PATH_RATE=0.7))
    rates = [block.drop_path.drop_prob for stage in model.layers for block in stage.blocks]
    assert rates == pytest.approx([0.1 * i for i in range(8)])


@pytest.mark.parametrize(
    "shape", [(3, 32, 32), (1, 1, 32, 32), (1, 4, 32, 32), (1, 1, 3, 32, 32)]
)
def test_bad_input_shape_raises(shape):
    model = build_swin(small_swin_cfg()).eval()
    with pytest.raises(ValueError, match=re.escape(str(tuple(shape)))):
        model(torch.zeros(shape))


def test_bad_config_raises():
    with pytest.raises(ValueError, match="NUM_HEADS"):
        build_swin(small_swin_cfg(NUM_HEADS=[1, 2, 4]))
    with pytest.raises(ValueError, match="res6"):
        build_swin(small_swin_cfg(OUT_FEATURES=["res6"]))


# ----------------------------------------------------------------------- converter
def load_converter():
    spec = importlib.util.spec_from_file_location("convert_swin_to_d2", CONVERTER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Wrapper(nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone


class _RecordingCheckpointer(DetectionCheckpointer):
    def _log_incompatible_keys(self, incompatible):
        self.incompatible = incompatible
        super()._log_incompatible_keys(incompatible)


def fake_official_checkpoint(seed=0):
    """An official-style Swin classification state dict for the small config, random values."""
    torch.manual_seed(seed)
    backbone_keys = build_swin(small_swin_cfg()).state_dict()
    state = {}
    for key, value in backbone_keys.items():
        if key.startswith("norm"):  # per-output norms do not exist in classification models
            continue
        state[key] = value if value.dtype == torch.int64 else torch.randn(value.shape)
    state["norm.weight"] = torch.randn(256)
    state["norm.bias"] = torch.randn(256)
    state["head.weight"] = torch.randn(10, 256)
    state["head.bias"] = torch.randn(10)
    state["layers.0.blocks.1.attn_mask"] = torch.zeros(64, 49, 49)
    return state


def test_converter_writes_detectron2_pickle_that_loads(tmp_path):
    converter = load_converter()
    official = fake_official_checkpoint()
    src, dst = tmp_path / "swin.pth", tmp_path / "swin.pkl"
    torch.save({"model": official}, src)
    converter.main([str(src), str(dst)])

    with open(dst, "rb") as f:
        converted = pickle.load(f)
    assert converted["__author__"] == "third_party"
    assert converted["matching_heuristics"] is True
    kept = {
        k for k in official if not (k.startswith(("head.", "norm.")) or k.endswith("attn_mask"))
    }
    assert set(converted["model"]) == {"backbone." + k for k in kept}
    for key in kept:
        value = converted["model"]["backbone." + key]
        assert isinstance(value, np.ndarray)
        np.testing.assert_array_equal(value, official[key].numpy())

    torch.manual_seed(1)
    wrapper = _Wrapper(build_swin(small_swin_cfg()))
    checkpointer = _RecordingCheckpointer(wrapper)
    checkpointer.load(str(dst))
    assert checkpointer.incompatible.unexpected_keys == []
    # only the per-output norms are new (not in classification checkpoints)
    missing = sorted(checkpointer.incompatible.missing_keys)
    assert missing == sorted(
        f"backbone.norm{i}.{p}" for i in range(4) for p in ("weight", "bias")
    )
    loaded = wrapper.backbone.state_dict()
    for key in kept:
        assert torch.equal(loaded[key], official[key]), key


def test_converter_rejects_unexpected_files(tmp_path):
    converter = load_converter()
    no_model = tmp_path / "no_model.pth"
    torch.save({"state_dict": {"patch_embed.proj.weight": torch.zeros(1)}}, no_model)
    with pytest.raises(KeyError, match="'model'"):
        converter.main([str(no_model), str(tmp_path / "out.pkl")])

    not_swin = tmp_path / "not_swin.pth"
    torch.save({"model": {"conv1.weight": torch.zeros(1)}}, not_swin)
    with pytest.raises(KeyError, match="patch_embed.proj.weight"):
        converter.main([str(not_swin), str(tmp_path / "out.pkl")])
    assert not (tmp_path / "out.pkl").exists()
