"""3x3 convolutions by NNPACK's Winograd algorithm (``layers.winograd_conv``; MODEL.TRAIN_WINOGRAD_CONV,
MODEL.MASK_FORMER.TEST.WINOGRAD_CONV):
values and gradients against float64 ``F.conv2d``, which layers qualify, and the MaskFormer paths
that use them (inference, a training step, recomputation under activation checkpointing) against
the modules as built. The tiny test models have 32-channel pixel decoders, so the tests that run
a model lower the size thresholds."""
import subprocess
import sys

import pytest
import torch
from detectron2.layers import Conv2d
from detectron2.modeling import build_model
from torch import nn
from torch.nn import functional as F

from mask_former.layers import winograd_conv
from mask_former.layers.winograd_conv import is_winograd_conv, winograd_conv2d, winograd_pays
from mask_former.modeling.meta_arch import base as base_meta_arch
from model_utils import tiny_cfg
from test_inference_paths import EXACT, both_paths, build, images, randomize_norms, relative_difference
from test_model import make_batch
from test_training_optimization import assert_same_gradients, assert_same_loss_terms, training_losses_and_grads
from train_utils import REPO_ROOT

pytestmark = pytest.mark.skipif(not torch.backends.nnpack.is_available(), reason="PyTorch built without NNPACK")


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.detach().double() - expected.detach()).abs().max() / expected.detach().abs().max())


@pytest.mark.parametrize("padding", [0, 1, 2])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch,channels_last", [(1, False), (3, False), (2, True)])
def test_values_and_gradients_equal_a_float64_convolution(padding, bias, batch, channels_last):
    """The output and the gradients of the input, the kernel and the bias, against ``F.conv2d`` in
    float64 (float rounding: NNPACK's transforms give about 1e-5 of the largest value)."""
    g = torch.Generator().manual_seed(padding + 3 * batch)
    x = torch.randn(batch, 6, 11, 9, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(5, 6, 3, 3, generator=g)
    b = torch.randn(5, generator=g) if bias else None
    leaves = [t.clone().requires_grad_(True) for t in ((x, weight) if b is None else (x, weight, b))]
    out = winograd_conv2d(leaves[0], leaves[1], leaves[2] if bias else None, (padding, padding))
    upstream = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad((out * upstream).sum(), leaves)

    ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    expected = F.conv2d(ref_leaves[0], ref_leaves[1], ref_leaves[2] if bias else None, padding=padding)
    ref_grads = torch.autograd.grad((expected * upstream.double()).sum(), ref_leaves)

    assert out.shape == expected.shape == (batch, 5, 11 + 2 * padding - 2, 9 + 2 * padding - 2)
    assert out.dtype == torch.float32
    assert relative_error(out, expected) < 1e-4
    for got, want in zip(grads, ref_grads):
        assert got.shape == want.shape
        assert relative_error(got, want) < 1e-4


@pytest.mark.parametrize("padding", [(0, 0), (1, 1), (2, 1)])
@pytest.mark.parametrize("tiles_per_chunk", [1, 3, 256])
def test_f4x4_kernel_gradient_and_forward_equal_float64(monkeypatch, padding, tiles_per_chunk):
    """``winograd_weight_grad`` and the channels-last forward (F(4x4, 3x3) written in PyTorch, a
    chunk of tile rows at a time) against ``aten.convolution_backward`` and ``F.conv2d`` in float64,
    on maps whose output is not a whole number of 4 x 4 tiles, with one tile, a few or all per
    chunk, from planar and channels-last inputs."""
    monkeypatch.setattr(winograd_conv, "TILES_PER_CHUNK", tiles_per_chunk)
    g = torch.Generator().manual_seed(tiles_per_chunk)
    for x in (torch.randn(2, 5, 13, 10, generator=g),
              torch.randn(1, 5, 9, 15, generator=g).contiguous(memory_format=torch.channels_last)):
        out_size = [x.shape[2] + 2 * padding[0] - 2, x.shape[3] + 2 * padding[1] - 2]
        grad = torch.randn(x.shape[0], 7, *out_size, generator=g)
        weight = torch.randn(7, 5, 3, 3, generator=g)
        expected = torch.ops.aten.convolution_backward(
            grad.double(), x.double(), weight.double(), None, [1, 1], list(padding), [1, 1], False, [0, 0], 1,
            [False, True, False])[1]
        got = winograd_conv.winograd_weight_grad(x, grad, padding)
        assert got.shape == (7, 5, 3, 3) and got.dtype == torch.float32
        assert relative_error(got, expected) < 1e-5
        # the channels-last forward, chunked alike
        x_cl = x.contiguous(memory_format=torch.channels_last)
        out = winograd_conv._winograd_channels_last(x_cl, weight, None, padding)
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert relative_error(out, F.conv2d(x.double(), weight.double(), padding=padding)) < 1e-5


def test_without_gradients_nothing_is_recorded():
    x, weight = torch.randn(2, 4, 6, 6, requires_grad=True), torch.randn(4, 4, 3, 3)
    with torch.no_grad():
        out = winograd_conv2d(x, weight, None, (1, 1))
    assert out.grad_fn is None
    assert winograd_conv2d(x, weight, None, (1, 1)).grad_fn is not None


def test_layouts_go_to_their_algorithm(nnpack_calls, channels_last_calls):
    """Planar inputs go to NNPACK and give planar outputs; channels-last ones to F(4x4, 3x3) in
    PyTorch and give channels-last outputs."""
    weight = torch.randn(4, 4, 3, 3)
    planar = winograd_conv2d(torch.randn(2, 4, 8, 8), weight, None, (1, 1))
    assert planar.is_contiguous() and (len(nnpack_calls), len(channels_last_calls)) == (2, 0)
    x = torch.randn(2, 4, 8, 8).contiguous(memory_format=torch.channels_last)
    out = winograd_conv2d(x, weight, None, (1, 1))
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert (len(nnpack_calls), len(channels_last_calls)) == (2, 1)


def test_runs_through_nnpack_image_by_image(monkeypatch):
    """NNPACK's batched entry point is slow: every call gets one image."""
    calls = []
    nnpack = torch._nnpack_spatial_convolution
    monkeypatch.setattr(torch, "_nnpack_spatial_convolution",
                        lambda x, *args: calls.append(x.shape[0]) or nnpack(x, *args))
    x = torch.randn(3, 4, 6, 6, requires_grad=True)
    out = winograd_conv2d(x, torch.randn(4, 4, 3, 3), None, (1, 1))
    assert calls == [1, 1, 1]
    out.sum().backward()  # the input's gradient is a Winograd convolution too
    assert calls == [1] * 6


def test_which_layers_qualify():
    assert is_winograd_conv(nn.Conv2d(256, 256, 3, padding=1))
    assert is_winograd_conv(Conv2d(512, 256, 3, padding=0, bias=False))
    assert not is_winograd_conv(nn.Conv2d(128, 256, 3, padding=1))  # too few channels
    assert not is_winograd_conv(nn.Conv2d(256, 128, 3, padding=1))
    assert not is_winograd_conv(nn.Conv2d(256, 256, 3, stride=2, padding=1))
    assert not is_winograd_conv(nn.Conv2d(256, 256, 1))
    assert not is_winograd_conv(nn.Conv2d(256, 256, 5, padding=2))
    assert not is_winograd_conv(nn.Conv2d(256, 256, 3, padding=2, dilation=2))
    assert not is_winograd_conv(nn.Conv2d(256, 256, 3, padding=1, groups=2))
    assert not is_winograd_conv(nn.Conv2d(256, 256, 3, padding=3))  # NNPACK: padding < kernel
    assert not is_winograd_conv(nn.Conv2d(256, 256, 3, padding="same"))
    assert not is_winograd_conv(nn.Conv2d(256, 256, 3, padding=1, padding_mode="reflect"))


def test_which_inputs_pay():
    weight = torch.randn(256, 256, 3, 3)
    channels_last = torch.channels_last
    assert winograd_pays(torch.randn(1, 256, 96, 96).contiguous(memory_format=channels_last), weight)
    # a channels-last input is reordered first: it pays on larger maps only
    assert not winograd_pays(torch.randn(1, 256, 64, 64).contiguous(memory_format=channels_last), weight)
    assert winograd_pays(torch.randn(1, 256, 48, 48), weight)
    assert not winograd_pays(torch.randn(1, 256, 47, 48), weight)
    assert not winograd_pays(torch.randn(1, 256, 96, 96, dtype=torch.bfloat16), weight)
    assert not winograd_pays(torch.randn(1, 256, 96, 96), weight.bfloat16())
    assert not winograd_pays(torch.randn(1, 256, 96, 96, dtype=torch.float64), weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast runs convolutions in bfloat16
        assert not winograd_pays(torch.randn(1, 256, 96, 96), weight)


@pytest.fixture
def small_thresholds(monkeypatch):
    """Thresholds that the tiny models' 32- and 64-channel layers at their finest levels pass."""
    monkeypatch.setattr(winograd_conv, "WINOGRAD_MIN_CHANNELS", 32)
    monkeypatch.setattr(winograd_conv, "WINOGRAD_MIN_PIXELS", 100)
    monkeypatch.setattr(winograd_conv, "WINOGRAD_MIN_PIXELS_PLANAR", 100)


def counted_calls(monkeypatch, owner, name: str) -> list:
    """A list that gets one entry per call of ``owner.name`` (which still runs)."""
    calls = []
    function = getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *args: calls.append(1) or function(*args))
    return calls


@pytest.fixture
def nnpack_calls(monkeypatch):
    return counted_calls(monkeypatch, torch, "_nnpack_spatial_convolution")


@pytest.fixture
def channels_last_calls(monkeypatch):
    return counted_calls(monkeypatch, winograd_conv, "_winograd_channels_last")


@pytest.mark.parametrize("setting", [True, False, None])
@pytest.mark.parametrize("avx2", [True, False])
def test_inference_with_winograd_equals_the_reference(monkeypatch, small_thresholds, channels_last_calls, setting,
                                                      avx2):
    """MODEL.MASK_FORMER.TEST.WINOGRAD_CONV True (or None, the default, on a CPU with PyTorch's AVX2
    kernels): the finest convolutions of the optimised path (channels-last) run by F(4x4, 3x3), and
    the outputs stay those of the modules as built to the exact path's tolerance."""
    monkeypatch.setattr(base_meta_arch, "cpu_has_avx2_kernels", lambda: avx2)
    cfg = tiny_cfg()
    cfg.MODEL.MASK_FORMER.TEST.WINOGRAD_CONV = setting
    model = build(cfg)
    expected = avx2 if setting is None else setting
    assert model.winograd_inference() is expected
    batch = images([(64, 48), (40, 56)], [None, (100, 75)])
    fast, reference = both_paths(model, batch)
    assert bool(channels_last_calls) is expected
    for a, b in zip(fast, reference):
        assert a["sem_seg"].shape == b["sem_seg"].shape
        assert relative_difference(a["sem_seg"], b["sem_seg"]) < EXACT


def test_training_step_with_winograd_equals_the_modules_as_built(small_thresholds, nnpack_calls):
    """Losses and every gradient of a step: the pixel decoder's finest 3x3 convolutions (forward,
    and the gradient of their input) by Winograd, against the modules as built."""
    cfg = tiny_cfg()
    cfg.MODEL.TRAIN_WINOGRAD_CONV = True
    cfg.MODEL.TRAIN_CHANNELS_LAST = False
    torch.manual_seed(0)
    model = build_model(cfg).train()
    randomize_norms(model)
    batch = make_batch()
    losses, grads = training_losses_and_grads(model, batch, optimize_training=True, channels_last=False)
    # layer_1 (the finest output conv) and mask_features, 2 images each, forward and backward
    assert len(nnpack_calls) == 8
    ref_losses, ref_grads = training_losses_and_grads(model, batch, optimize_training=False)
    assert len(nnpack_calls) == 8  # the modules as built do not use it
    assert_same_loss_terms(losses, ref_losses, rtol=1e-5, atol=1e-6)
    assert_same_gradients(grads, ref_grads)
    assert not any("forward" in m.__dict__ for m in model.sem_seg_head.modules())


def test_recomputation_under_checkpointing_uses_winograd_again(small_thresholds, nnpack_calls):
    cfg = tiny_cfg()
    cfg.MODEL.TRAIN_WINOGRAD_CONV = True
    cfg.MODEL.ACTIVATION_CHECKPOINTING = ["sem_seg_head.pixel_decoder.forward_features"]
    torch.manual_seed(0)
    model = build_model(cfg).train()
    losses = model(make_batch())
    assert len(nnpack_calls) == 4
    sum(losses.values()).backward()
    assert len(nnpack_calls) == 4 + 4 + 4  # recomputed forward, then the inputs' gradients


def test_winograd_training_by_default_only_on_avx2_cpus(monkeypatch, small_thresholds, nnpack_calls):
    for avx2 in (True, False):
        monkeypatch.setattr(base_meta_arch, "cpu_has_avx2_kernels", lambda avx2=avx2: avx2)
        for setting, expected in ((None, avx2), (True, True), (False, False)):
            cfg = tiny_cfg()
            cfg.MODEL.TRAIN_WINOGRAD_CONV = setting
            model = build_model(cfg).train()
            assert model.winograd_training() is expected, (avx2, setting)
            nnpack_calls.clear()
            model(make_batch())
            assert bool(nnpack_calls) is expected, (avx2, setting)
    # activation checkpointing says memory comes first: not by default (NNPACK keeps a workspace)
    monkeypatch.setattr(base_meta_arch, "cpu_has_avx2_kernels", lambda: True)
    cfg = tiny_cfg()
    cfg.MODEL.ACTIVATION_CHECKPOINTING = ["sem_seg_head.predictor"]
    assert not build_model(cfg).train().winograd_training()
    cfg.MODEL.TRAIN_WINOGRAD_CONV = True
    assert build_model(cfg).train().winograd_training()


@pytest.mark.parametrize("key", ["MODEL.TRAIN_WINOGRAD_CONV", "MODEL.MASK_FORMER.TEST.WINOGRAD_CONV"])
def test_winograd_keys_are_checked(monkeypatch, key):
    def build_with(value):
        cfg = tiny_cfg()
        node_name, _, name = key.rpartition(".")
        node = cfg
        for part in node_name.split("."):
            node = getattr(node, part)
        setattr(node, name, value)  # as a program would; a YAML file's wrong type is caught on merging
        return build_model(cfg)

    with pytest.raises(ValueError, match=rf"{key}='yes': expected None .*True or False"):
        build_with("yes")
    monkeypatch.setattr(base_meta_arch, "nnpack_ready", lambda: False)
    with pytest.raises(ValueError, match=rf"{key}=True, but this PyTorch was built without NNPACK"):
        build_with(True)
    assert not build_with(False).winograd_training()
    model = build_model(tiny_cfg())  # where it pays: nowhere without NNPACK
    assert not model.winograd_training() and not model.winograd_inference()


def test_bad_arguments_name_what_is_wrong():
    x, weight = torch.randn(1, 4, 8, 8), torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match=r"weight must be O x 4 x 3 x 3 .* got shape \(2, 4, 5, 5\)"):
        winograd_conv2d(x, torch.randn(2, 4, 5, 5), None, (1, 1))
    with pytest.raises(ValueError, match=r"padding must be two values in 0..2, got \[3, 3\]"):
        winograd_conv2d(x, weight, None, (3, 3))
    with pytest.raises(ValueError, match=r"bias must have shape \(2,\), got \(3,\)"):
        winograd_conv2d(x, weight, torch.randn(3), (1, 1))
    with pytest.raises(ValueError, match=r"x must be float32 on the CPU, got torch.float64"):
        winograd_conv2d(x.double(), weight, None, (1, 1))
    with pytest.raises(ValueError, match=r"x must be B x C x H x W, got shape \(4, 8, 8\)"):
        winograd_conv2d(x[0], weight, None, (1, 1))


@pytest.mark.parametrize("row_dim", [0, 1])
@pytest.mark.parametrize("pad_top,pad_left", [(0, 0), (1, 2), (2, 1)])
def test_bands_of_rows_equal_slices_of_the_whole_padded_map(row_dim, pad_top, pad_left):
    """The Winograd code pads a few tile rows at a time (``_padded_rows``), never the whole map:
    every band, those reaching into the padding above, below or both, and those wholly in it,
    against a slice of the map padded at once."""
    g = torch.Generator().manual_seed(7 * pad_top + pad_left)
    image = torch.randn(3, 5, 4, generator=g) if row_dim == 0 else torch.randn(3, 5, 4, generator=g).permute(2, 0, 1)
    height, width = image.shape[row_dim], image.shape[row_dim + 1]
    padded_height, padded_width = height + pad_top + 4, width + pad_left + 3
    rows_first = image if row_dim == 0 else image.permute(1, 2, 0)  # H x W x C
    whole = torch.zeros(padded_height, padded_width, rows_first.shape[2])
    whole[pad_top: pad_top + height, pad_left: pad_left + width] = rows_first
    for start in range(padded_height + 1):
        for stop in range(start, padded_height + 1):
            band = winograd_conv._padded_rows(image, start, stop, pad_top, pad_left, padded_width, row_dim)
            band = band if row_dim == 0 else band.permute(1, 2, 0)
            assert torch.equal(band, whole[start:stop]), (start, stop)


def test_works_in_a_fresh_process():
    """NNPACK must be initialised before its first convolution (asking whether it is available
    does that); ``winograd_conv2d`` does so itself, also when nothing else asked before."""
    code = (
        "import torch\n"
        "from mask_former.layers import winograd_conv2d\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x, w = torch.randn(2, 4, 8, 8, generator=g), torch.randn(3, 4, 3, 3, generator=g)\n"
        "out = winograd_conv2d(x, w, None, (1, 1))\n"
        "expected = torch.nn.functional.conv2d(x.double(), w.double(), padding=1)\n"
        "print('relative error', float((out.double() - expected).abs().max() / expected.abs().max()))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # the float32 Winograd transforms' rounding, relative to the largest output (as in the tests above)
    assert float(proc.stdout.split("relative error")[1]) < 1e-4
