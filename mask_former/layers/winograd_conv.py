"""
3x3 convolutions by the Winograd algorithm of NNPACK, which PyTorch's CPU builds include.

A 3x3 convolution with stride 1 computed by Winograd's minimal filtering (NNPACK's F(6x6, 3x3)
transforms, ``torch._nnpack_spatial_convolution``) needs about a fifth of the multiplications of
the direct algorithm. On an AVX2 CPU (AMD EPYC, family 25 model 1, 2 threads) the pixel decoder's
256 -> 256 convolution of a 128 x 128 map took 49 ms against oneDNN's 112 ms channels-last and
137 ms planar; on small maps or few channels the transforms cost more than they save (64 -> 64 at
128 x 128: 7.8 against 8.4 ms; 256 -> 256 at 32 x 32: 9.6 against 9.3 ms), see docs/speed.md.
The result differs from the direct algorithm's by float rounding only (about 1e-5 of the largest
output against 1.5e-6), deterministically and whatever the number of threads.

NNPACK works on planar (NCHW) float32 tensors on CPUs: a channels-last input is reordered first,
and the output is planar. Under autograd the input's gradient is a Winograd convolution too (of
the output's gradient by the flipped, transposed kernel); the kernel's and bias's gradients are
PyTorch's usual ones (``aten.convolution_backward``).
"""
import functools
from typing import List, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = ["WINOGRAD_MIN_CHANNELS", "WINOGRAD_MIN_PIXELS", "WINOGRAD_MIN_PIXELS_PLANAR", "nnpack_ready",
           "is_winograd_conv", "winograd_pays", "winograd_conv2d"]

# Where the Winograd algorithm paid on the AVX2 CPU above: at least this many input and output
# channels, and output maps of at least this many pixels: 96 x 96 for a channels-last input, which
# is reordered first (at 64 x 64 that cost what the algorithm saved), 48 x 48 for a planar one
# (two 256-channel 48 x 48 images: 30 against 37 ms; 32 x 32: 31 against 27 ms).
WINOGRAD_MIN_CHANNELS = 256
WINOGRAD_MIN_PIXELS = 96 * 96
WINOGRAD_MIN_PIXELS_PLANAR = 48 * 48


@functools.lru_cache(maxsize=None)
def nnpack_ready() -> bool:
    """Whether this PyTorch has NNPACK. Asking also initialises NNPACK, without which
    ``torch._nnpack_spatial_convolution`` fails."""
    return bool(torch.backends.nnpack.is_available())


def is_winograd_conv(conv: nn.Conv2d) -> bool:
    """Whether ``conv`` is a convolution that :func:`winograd_conv2d` computes and that is large
    enough to pay: 3x3, stride 1, no dilation, one group, zero padding of at most 2 (NNPACK's
    limit), at least :data:`WINOGRAD_MIN_CHANNELS` input and output channels."""
    return (
        tuple(conv.kernel_size) == (3, 3)
        and tuple(conv.stride) == (1, 1)
        and tuple(conv.dilation) == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and isinstance(conv.padding, tuple)
        and all(0 <= p < 3 for p in conv.padding)
        and min(conv.in_channels, conv.out_channels) >= WINOGRAD_MIN_CHANNELS
    )


def winograd_pays(x: Tensor, weight: Tensor) -> bool:
    """Whether the convolution of ``x`` (B x C x H x W) by ``weight`` should run by Winograd: both
    float32 on the CPU, outside CPU autocast (which would run the convolution in its lower precision),
    and the map at least :data:`WINOGRAD_MIN_PIXELS_PLANAR` pixels if ``x`` is planar, else
    :data:`WINOGRAD_MIN_PIXELS` (the output has the input's size with padding 1)."""
    if not (x.dim() == 4 and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")):
        return False
    min_pixels = WINOGRAD_MIN_PIXELS_PLANAR if x.is_contiguous() else WINOGRAD_MIN_PIXELS
    return x.shape[-2] * x.shape[-1] >= min_pixels and nnpack_ready()


def _nnpack_by_image(x: Tensor, weight: Tensor, bias: Optional[Tensor], padding: List[int]) -> Tensor:
    """NNPACK's convolution of each image of ``x`` on its own. NNPACK has two entry points, and
    PyTorch calls the batched one for more than one image: on the CPU above it took 407-577 ms for
    two 256-channel 128 x 128 images, against 117 ms for the two one at a time (oneDNN: 290 ms)."""
    weight = weight.contiguous()
    if x.shape[0] == 1:
        return torch._nnpack_spatial_convolution(x, weight, bias, padding, [1, 1])
    return torch.cat([torch._nnpack_spatial_convolution(image, weight, bias, padding, [1, 1])
                      for image in x.split(1)])


class _WinogradConv2d(torch.autograd.Function):
    """The convolution of :func:`winograd_conv2d` with its gradients (stride 1, 3x3 kernel)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], padding: List[int]) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        ctx.has_bias = bias is not None
        return _nnpack_by_image(x, weight, bias, padding)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        input_needed, weight_needed, bias_needed = ctx.needs_input_grad[:3]
        grad_input = grad_weight = grad_bias = None
        if input_needed:
            # the transposed convolution of stride 1: the kernel flipped, in and out swapped, and
            # the padding that gives back the input's size (2 - p for a 3x3 kernel)
            kernel = weight.flip(2, 3).transpose(0, 1)
            grad_input = _nnpack_by_image(grad, kernel, None, [2 - p for p in ctx.padding])
        if weight_needed or bias_needed:
            _, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
                grad, x, weight, [weight.shape[0]] if ctx.has_bias else None, [1, 1], ctx.padding,
                [1, 1], False, [0, 0], 1, [False, weight_needed, bias_needed and ctx.has_bias],
            )
        return grad_input, grad_weight, grad_bias, None


def winograd_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], padding: Sequence[int]) -> Tensor:
    """``F.conv2d(x, weight, bias, stride=1, padding=padding)`` for a 3x3 ``weight`` (O x C x 3 x 3)
    and float32 CPU tensors, by NNPACK's Winograd transforms, image by image, differentiable (see
    the module docstring). Returns B x O x H' x W', planar."""
    padding = [int(p) for p in padding]
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _WinogradConv2d.apply(x, weight, bias, padding)
    return _nnpack_by_image(x, weight, bias, padding)
