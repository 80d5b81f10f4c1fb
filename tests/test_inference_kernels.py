"""``layers.inference_kernels``: the fused linear layers against ``F.linear`` and the activation
written out, where they are used and where not; the Swin and deformable-encoder layers that call
them. (The gathered deformable attention is tested in test_ms_deform_attn.py.)"""
import threading

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from mask_former.layers import (
    ContextSwitch,
    DeformableTransformerEncoderLayer,
    inference_kernels,
    inference_kernels_enabled,
    linear,
)
from mask_former.modeling.backbone.swin import Mlp, PatchMerging, WindowAttention

ACTIVATIONS = {"none": lambda y: y, "relu": lambda y: y.clamp(min=0),
               "gelu": lambda y: 0.5 * y * (1 + torch.erf(y / 2 ** 0.5))}  # exact GELU, written out


def ops_run(fn):
    """The names of the operators ``fn()`` runs."""
    with torch.profiler.profile() as prof:
        fn()
    return {event.name for event in prof.events()}


def random_linear(in_features, out_features, bias=True, seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias)
    nn.init.normal_(layer.weight, std=0.3)
    if bias:
        nn.init.normal_(layer.bias)
    return layer


def test_context_nests_and_resets():
    assert not inference_kernels_enabled()
    with inference_kernels():
        assert inference_kernels_enabled()
        with inference_kernels(False):
            assert not inference_kernels_enabled()
        assert inference_kernels_enabled()
    assert not inference_kernels_enabled()


def test_context_switch_restores_after_an_exception_and_is_per_thread():
    switch = ContextSwitch("test_switch")
    with pytest.raises(RuntimeError):
        with switch():
            assert switch.enabled()
            raise RuntimeError
    assert not switch.enabled()
    seen = []
    with switch():
        thread = threading.Thread(target=lambda: seen.append(switch.enabled()))
        thread.start()
        thread.join()
        assert switch.enabled()
    assert seen == [False]  # a new thread starts with the default


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("shape", [(7, 12), (2, 5, 3, 12), (0, 12)])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_linear_float32_equals_the_formula(activation, shape, bias):
    layer = random_linear(12, 9, bias)
    x = torch.randn(shape) * 2
    expected = ACTIVATIONS[activation](x @ layer.weight.detach().t() + (layer.bias.detach() if bias else 0))
    with torch.no_grad():
        plain = linear(x, layer, activation)
        with inference_kernels():
            fused = linear(x, layer, activation)
    assert fused.shape == shape[:-1] + (9,)
    torch.testing.assert_close(plain, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-5)


def test_fused_linear_runs_one_onednn_call_in_inference_only():
    layer = random_linear(16, 32)
    x = torch.randn(4, 16)

    def run(grad: bool, kernels: bool):
        with torch.autograd.set_grad_enabled(grad), inference_kernels(kernels):
            return ops_run(lambda: linear(x, layer, "gelu"))

    fused = run(grad=False, kernels=True)
    assert "mkldnn::_linear_pointwise" in fused and "aten::gelu" not in fused
    for grad, kernels in ((False, False), (True, True)):  # outside the context, or with gradients
        plain = run(grad, kernels)
        assert "mkldnn::_linear_pointwise" not in plain and "aten::gelu" in plain


def test_fused_linear_keeps_gradients_when_they_are_on():
    layer = random_linear(6, 4)
    x = torch.randn(3, 6, requires_grad=True)
    with inference_kernels():
        linear(x, layer, "relu").sum().backward()
    assert x.grad is not None and layer.weight.grad is not None


def test_fused_linear_bfloat16_under_autocast():
    """bfloat16 weights under CPU autocast (the bf16 inference path): float32 inputs are cast as
    autocast would, and the result is bfloat16 and close to float32."""
    layer = random_linear(24, 40)
    x = torch.randn(2, 8, 24)
    expected = F.gelu(F.linear(x, layer.weight, layer.bias))
    layer_bf16 = random_linear(24, 40).to(torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with inference_kernels():
            fused = linear(x, layer_bf16, "gelu")
        plain = linear(x, layer_bf16, "gelu")
    assert fused.dtype == plain.dtype == torch.bfloat16
    torch.testing.assert_close(fused.float(), expected, atol=0.1, rtol=0.05)
    torch.testing.assert_close(fused.float(), plain.float(), atol=0.1, rtol=0.05)


def test_fused_linear_not_used_for_mixed_dtypes():
    """float32 weights under bfloat16 autocast (the weights would have to be cast at every call):
    the layer runs as built."""
    layer = random_linear(8, 8)
    x = torch.randn(3, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), inference_kernels():
        names = ops_run(lambda: linear(x, layer))
    assert "mkldnn::_linear_pointwise" not in names


def test_fused_linear_wrong_width_raises_pytorchs_shape_error():
    with torch.no_grad(), inference_kernels(), pytest.raises(RuntimeError, match=r"2x4 and 5x3"):
        linear(torch.randn(2, 4), random_linear(5, 3))


def test_fused_linear_rejects_unknown_activation():
    with pytest.raises(ValueError, match="activation must be one of .* got 'tanh'"):
        linear(torch.randn(2, 3), random_linear(3, 3), "tanh")


@pytest.mark.parametrize("make_layer, make_input", [
    (lambda: Mlp(16, 64), lambda: torch.randn(1, 6, 5, 16)),
    (lambda: WindowAttention(16, window_size=3, num_heads=2), lambda: torch.randn(4, 9, 16)),
    (lambda: PatchMerging(8), lambda: torch.randn(1, 6, 4, 8)),
    (lambda: DeformableTransformerEncoderLayer(16, 32, dropout=0.0, activation="gelu", n_levels=1, n_heads=2,
                                               n_points=2), None),
])
def test_layers_give_the_same_outputs_with_the_kernels(make_layer, make_input):
    torch.manual_seed(0)
    layer = make_layer().eval()
    for p in layer.parameters():
        nn.init.normal_(p, std=0.3)
    if make_input is None:  # the deformable encoder layer: one 3 x 4 level
        args = (torch.randn(1, 12, 16), None, torch.rand(1, 12, 1, 2), [(3, 4)], None)
    else:
        args = (make_input(),)
    with torch.no_grad():
        expected = layer(*args)
        with inference_kernels():
            names = ops_run(lambda: layer(*args))
            out = layer(*args)
    assert "mkldnn::_linear_pointwise" in names
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
