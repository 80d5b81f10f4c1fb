"""
3x3 convolutions by Winograd's algorithm: NNPACK's (which PyTorch's CPU builds include) for planar
maps, F(4x4, 3x3) written here in PyTorch for channels-last maps and for the kernel's gradient.

A 3x3 convolution with stride 1 computed by Winograd's minimal filtering (NNPACK's F(6x6, 3x3)
transforms, ``torch._nnpack_spatial_convolution``) needs about a fifth of the multiplications of
the direct algorithm. On an AVX2 CPU (AMD EPYC, family 25 model 1, 2 threads) the pixel decoder's
256 -> 256 convolution of a 128 x 128 map took 49 ms against oneDNN's 112 ms channels-last and
137 ms planar; on small maps or few channels the transforms cost more than they save (64 -> 64 at
128 x 128: 7.8 against 8.4 ms; 256 -> 256 at 32 x 32: 9.6 against 9.3 ms), see docs/speed.md.
The result differs from the direct algorithm's by float rounding only (about 1e-5 of the largest
output against 1.5e-6), deterministically and whatever the number of threads.

NNPACK works on planar (NCHW) float32 tensors on CPUs and keeps a workspace per thread (about 50
MB for the largest of these convolutions). Channels-last inputs (the optimised inference path's)
instead go through Winograd's F(4x4, 3x3) written here in PyTorch, which keeps the channels
innermost and nothing between calls. Under autograd the input's gradient is a Winograd convolution
too (of the output's gradient by the flipped, transposed kernel), and so is the kernel's gradient
(:func:`winograd_weight_grad`, F(4x4, 3x3) in PyTorch: NNPACK's is not in PyTorch's build).
"""
import functools
from typing import List, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

__all__ = ["WINOGRAD_MIN_CHANNELS", "WINOGRAD_MIN_PIXELS", "WINOGRAD_MIN_PIXELS_PLANAR", "nnpack_ready",
           "is_winograd_conv", "winograd_pays", "winograd_conv2d", "winograd_weight_grad"]

# Where the Winograd algorithm paid on the AVX2 CPU above: at least this many input and output
# channels, and output maps of at least this many pixels: 96 x 96 for a channels-last input (F(4x4,
# 3x3) in PyTorch, one 256-channel map against oneDNN: 128 x 128 69.5-79.7 against 103-108 ms,
# 96 x 96 45-49 against 56-61 ms, 64 x 64 and 48 x 48 within the spread either way), 48 x 48 for a
# planar one (NNPACK; two 256-channel 48 x 48 images: 30 against 37 ms; 32 x 32: 31 against 27 ms).
WINOGRAD_MIN_CHANNELS = 256
WINOGRAD_MIN_PIXELS = 96 * 96
WINOGRAD_MIN_PIXELS_PLANAR = 48 * 48


# Winograd's F(4x4, 3x3) (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks",
# 2016): for a 6x6 input tile d and a 3x3 kernel w, the 4x4 output tile is
# A^T [(G w G^T) * (B^T d B)] A. The kernel's gradient is G^T [sum over tiles (A dY A^T) * (B^T d B)] G.
_B_T = ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
        (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1))
_G = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
      (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))
_A_T = ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))
# tiles transformed at a time by the F(4x4, 3x3) code (128 tiles of 256 channels: 4.7 MB per
# transform; 256 were 0.9x-0.97x the time for twice the transient memory)
TILES_PER_CHUNK = 128


def _kron(matrix, dtype: torch.dtype) -> Tensor:
    """kron(M, M) of one of the transform matrices above: the transform of a tile as a vector."""
    m = torch.tensor(matrix, dtype=dtype)
    return torch.kron(m, m)


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
    images = x.split(1)
    first = torch._nnpack_spatial_convolution(images[0], weight, bias, padding, [1, 1])
    if len(images) == 1:
        return first
    # each image's result copied into the output as it comes, so that one image's is transient,
    # not all of them as with torch.cat
    out = first.new_empty((x.shape[0],) + first.shape[1:])
    out[:1].copy_(first)
    del first
    for index, image in enumerate(images[1:], start=1):
        out[index: index + 1].copy_(torch._nnpack_spatial_convolution(image, weight, bias, padding, [1, 1]))
    return out


def _padded_rows(image: Tensor, start: int, stop: int, pad_top: int, pad_left: int, padded_width: int,
                 row_dim: int) -> Tensor:
    """Rows ``start:stop`` of ``image`` padded with zeros: ``pad_top`` rows above and ``pad_left``
    columns to the left, and zeros right of it up to ``padded_width`` columns and below it (rows
    and columns are dims ``row_dim`` and ``row_dim + 1``; the indices count in the padded map). A
    band of a few tile rows, so that the Winograd code never copies a whole padded map; a view
    when it needs no zeros."""
    height, width = image.shape[row_dim], image.shape[row_dim + 1]
    first = min(max(start - pad_top, 0), height)
    last = min(max(stop - pad_top, first), height)
    above = min(max(first + pad_top - start, 0), stop - start)
    below = (stop - start) - above - (last - first)
    right = padded_width - pad_left - width
    band = image.narrow(row_dim, first, last - first)
    if above == below == pad_left == right == 0:
        return band
    # F.pad's amounts go from the last dim backwards, (before, after) for each
    return F.pad(band, [0, 0] * (image.dim() - row_dim - 2) + [pad_left, right, above, below])


def winograd_weight_grad(x: Tensor, grad: Tensor, padding: Sequence[int]) -> Tensor:
    """
    The gradient of a 3x3, stride-1 convolution's kernel: ``aten.convolution_backward``'s, by
    Winograd's F(4x4, 3x3), tiles cut from a band of rows padded at a time (never a padded copy
    of the whole map) and transformed a chunk at a time so that they stay in the cache, and one
    batched product per chunk for the 36 transformed positions.

    Args:
        x: N x C x H x W float32 input of the convolution.
        grad: N x O x H' x W' gradient of its output, H' = H + 2 p_h - 2.
        padding: (p_h, p_w), each 0, 1 or 2.
    Returns:
        O x C x 3 x 3. On the AVX2 CPU above, two 256-channel 128 x 128 images took 168-178 ms
        against oneDNN's 277-321 ms, at 5e-6 of the largest value from float64 (oneDNN: 9e-6).
    """
    n_images, channels = x.shape[:2]
    out_channels, out_h, out_w = grad.shape[1:]
    tiles_h, tiles_w = -(-out_h // 4), -(-out_w // 4)
    pad_h, pad_w = padding
    input_transform = _kron(_B_T, x.dtype)  # 36 x 36: (a b) x (i j)
    grad_transform = _kron(_A_T, x.dtype).t()  # 36 x 16: (a b) x (k l)
    kernel_grad = torch.zeros(36, out_channels, channels, dtype=x.dtype)
    rows = max(1, TILES_PER_CHUNK // tiles_w)
    for image in range(n_images):
        for top in range(0, tiles_h, rows):
            bottom = min(tiles_h, top + rows)
            count = (bottom - top) * tiles_w
            # zeros around the input (the padding, and beyond to whole tiles), and the gradient's
            # extra rows and columns, which add nothing; C x rows x tiles_w x 6 x 6 overlapping
            # input tiles -> (i j) x (tiles c)
            band = _padded_rows(x[image], 4 * top, 4 * bottom + 2, pad_h, pad_w, 4 * tiles_w + 2, row_dim=1)
            tiles = band.unfold(1, 6, 4).unfold(2, 6, 4)
            tiles = tiles.permute(3, 4, 1, 2, 0).reshape(36, count * channels)
            transformed_input = (input_transform @ tiles).view(36, count, channels)
            # O x rows x 4 x tiles_w x 4 gradient tiles -> (k l) x (tiles o)
            grad_band = _padded_rows(grad[image], 4 * top, 4 * bottom, 0, 0, 4 * tiles_w, row_dim=1)
            grad_tiles = grad_band.reshape(out_channels, bottom - top, 4, tiles_w, 4)
            grad_tiles = grad_tiles.permute(2, 4, 1, 3, 0).reshape(16, count * out_channels)
            transformed_grad = (grad_transform @ grad_tiles).view(36, count, out_channels)
            kernel_grad.baddbmm_(transformed_grad.transpose(1, 2), transformed_input)
    # G^T dU G for every (o, c): (i j) x (a b) times (a b) x (o c)
    kernel_grad = _kron(_G, x.dtype).t() @ kernel_grad.view(36, -1)
    return kernel_grad.view(3, 3, out_channels, channels).permute(2, 3, 0, 1).contiguous()


def _winograd_channels_last(x: Tensor, weight: Tensor, bias: Optional[Tensor], padding: Sequence[int]) -> Tensor:
    """
    ``F.conv2d`` of a channels-last ``x`` (N x C x H x W) by a 3x3 ``weight``, stride 1, by
    F(4x4, 3x3) written in PyTorch: per chunk of tiles, the 36 x 36 input transform as one matrix
    product, one batched product of the 36 transformed positions by the transformed kernel, and the
    16 x 36 output transform. The channels stay innermost throughout, so the output is
    channels-last without a reorder and nothing is kept between calls (NNPACK needs a planar input
    and keeps its workspace). Not differentiable by itself (see :class:`_WinogradConv2d`).
    """
    n_images, channels, height, width = x.shape
    out_channels = weight.shape[0]
    pad_h, pad_w = padding
    out_h, out_w = height + 2 * pad_h - 2, width + 2 * pad_w - 2
    tiles_h, tiles_w = -(-out_h // 4), -(-out_w // 4)
    # U = G w G^T of every (o, c): 36 x O x C
    kernel = (_kron(_G, x.dtype) @ weight.reshape(-1, 9).t()).view(36, out_channels, channels)
    input_transform = _kron(_B_T, x.dtype)
    output_transform = _kron(_A_T, x.dtype)  # 16 x 36: (k l) x (a b)
    out = torch.empty(n_images, 4 * tiles_h, 4 * tiles_w, out_channels, dtype=x.dtype)
    rows = max(1, TILES_PER_CHUNK // tiles_w)
    for image in range(n_images):
        pixels = x[image].permute(1, 2, 0)  # H x W x C, channels innermost
        for top in range(0, tiles_h, rows):
            bottom = min(tiles_h, top + rows)
            count = (bottom - top) * tiles_w
            band = _padded_rows(pixels, 4 * top, 4 * bottom + 2, pad_h, pad_w, 4 * tiles_w + 2, row_dim=0)
            tiles = band.unfold(0, 6, 4).unfold(1, 6, 4)  # rows x tiles_w x C x 6 x 6
            tiles = tiles.permute(3, 4, 0, 1, 2).reshape(36, count * channels)
            transformed = (input_transform @ tiles).view(36, count, channels)
            products = torch.bmm(transformed, kernel.transpose(1, 2))  # 36 x tiles x O
            outputs = (output_transform @ products.view(36, -1)).view(4, 4, bottom - top, tiles_w, out_channels)
            if bias is not None:
                outputs += bias  # here, while the chunk is in the cache
            out[image, 4 * top: 4 * bottom].view(bottom - top, 4, tiles_w, 4, out_channels).copy_(
                outputs.permute(2, 0, 3, 1, 4))
    return out[:, :out_h, :out_w].contiguous().permute(0, 3, 1, 2)


class _WinogradConv2d(torch.autograd.Function):
    """The convolution of :func:`winograd_conv2d` with its gradients (stride 1, 3x3 kernel)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], padding: List[int]) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        ctx.has_bias = bias is not None
        return _winograd_forward(x, weight, bias, padding)

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
        if weight_needed:
            grad_weight = winograd_weight_grad(x, grad, ctx.padding)
        if bias_needed and ctx.has_bias:
            grad_bias = grad.sum((0, 2, 3))
        return grad_input, grad_weight, grad_bias, None


def _winograd_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], padding: List[int]) -> Tensor:
    """NNPACK for a planar ``x``; F(4x4, 3x3) in PyTorch for a channels-last one, which NNPACK
    would reorder (two copies) and which then stays channels-last (on the AVX2 CPU above, a
    256-channel 128 x 128 map: 64 ms, NNPACK with the reorders 70 ms, oneDNN 112-134 ms)."""
    if x.is_contiguous():
        return _nnpack_by_image(x, weight, bias, padding)
    return _winograd_channels_last(x, weight, bias, padding)


def _check_arguments(x: Tensor, weight: Tensor, bias: Optional[Tensor], padding: List[int]) -> None:
    problems = []
    if x.dim() != 4:
        problems.append(f"x must be B x C x H x W, got shape {tuple(x.shape)}")
    elif weight.dim() != 4 or tuple(weight.shape[1:]) != (x.shape[1], 3, 3):
        problems.append(f"weight must be O x {x.shape[1]} x 3 x 3 for x of shape {tuple(x.shape)}, "
                        f"got shape {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        problems.append(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if len(padding) != 2 or not all(0 <= p <= 2 for p in padding):
        problems.append(f"padding must be two values in 0..2, got {padding}")
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype != torch.float32 or t.device.type != "cpu"):
            problems.append(f"{name} must be float32 on the CPU, got {t.dtype} on {t.device}")
    if problems:
        raise ValueError("winograd_conv2d: " + "; ".join(problems))


def winograd_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], padding: Sequence[int]) -> Tensor:
    """``F.conv2d(x, weight, bias, stride=1, padding=padding)`` for a 3x3 ``weight`` (O x C x 3 x 3)
    and float32 CPU tensors, by Winograd's algorithm, differentiable (see the module docstring).
    Returns B x O x H' x W' in the layout of ``x`` (planar unless ``x`` is channels-last).
    ValueError naming the argument for other shapes, paddings, dtypes or devices."""
    padding = [int(p) for p in padding]
    _check_arguments(x, weight, bias, padding)
    # also NNPACK's initialisation: without it, its convolution fails (in a process that has not
    # asked torch.backends.nnpack.is_available() yet) with an error that names nothing
    if not nnpack_ready():
        raise RuntimeError("winograd_conv2d: this PyTorch was built without NNPACK "
                           "(torch.backends.nnpack.is_available() is False)")
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _WinogradConv2d.apply(x, weight, bias, padding)
    return _winograd_forward(x, weight, bias, padding)
