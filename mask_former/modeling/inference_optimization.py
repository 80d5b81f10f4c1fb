"""Inference-time speed-ups that keep a model's results and leave the model itself alone.

Both meta-architectures use them in eval mode (see ``SegmentationMetaArch.prepare_for_inference``;
``MaskFormer`` also uses the band-wise functions below):

* :class:`InferenceWeights`: 1x1 convolutions of channels-last inputs run as matrix products;
  with ``fold`` (the bfloat16 path), detectron2 ``Conv2d`` layers whose ``norm`` is a frozen batch
  norm (``FrozenBatchNorm2d``, or a ``BatchNorm2d`` with running statistics, as in eval mode) run
  as one convolution with the norm folded into the weight and bias, stored channels-last; in
  bfloat16, the weights of the matrix products are kept in bfloat16 too. These tensors are a
  cache kept beside the model: modules, parameters and ``state_dict()`` are untouched, they are
  used only inside :meth:`InferenceWeights.active` / :meth:`InferenceWeights.call`, and
  :meth:`InferenceWeights.is_current` notices any change of the weights or statistics they come
  from (an optimizer step, ``load_state_dict``, ``.to()``).
* :func:`upsample_bilinear_rows`: a band of rows (and leading columns) of
  ``F.interpolate(x, mode="bilinear", align_corners=False)`` to an integer multiple of the input
  size, computed from the input rows it needs only; equal to the same rows of the full result.
* :func:`semantic_scores_from_low_res` and :func:`semantic_scores_from_logits`: MaskFormer's
  semantic combination ``sum_q softmax(cls)[q, c] * sigmoid(mask)[q, y, x]`` (the "no object"
  class dropped) computed band by band (upsample -> sigmoid -> one matrix product written into the
  result, or into ``out``), every band in the same scratch memory, so only the K x H x W result is
  ever held at full resolution.
"""
import contextlib
import math
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from torch import Tensor, nn
from torch.nn import functional as F

from ..layers.winograd_conv import is_winograd_conv, winograd_conv2d, winograd_pays

__all__ = [
    "PRECISIONS",
    "inference_dtype",
    "InferenceWeights",
    "fold_conv_norm",
    "is_pointwise_conv",
    "run_conv",
    "upsample_bilinear_rows",
    "upsample_bilinear_crop",
    "semantic_scores_from_low_res",
    "semantic_scores_from_logits",
]

# MODEL.MASK_FORMER.TEST.PRECISION -> dtype of the network's weights and activations in inference.
# bf16 is the fast path of CPUs with AVX-512 bf16 / AMX and of GPUs from Ampere on; fp16 is for
# GPUs without bfloat16 (most CPUs have no float16 arithmetic and run it no faster than fp32).
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Output rows per band of the semantic combination. At 512x512 with 100 queries and 150 classes,
# into an output already in memory (REUSE_OUTPUT_MEMORY): 4 / 8 / 16 / 32 / 64 / 128 / 256 rows
# took 77 / 64 / 58 / 55 / 51 / 51 / 75 ms (a 64-row band of logits is 13 MB), all 2-3x faster
# than the full-size chain.
SEMANTIC_TILE_ROWS = 64


def inference_dtype(precision: str) -> torch.dtype:
    """The dtype of a MODEL.MASK_FORMER.TEST.PRECISION value."""
    if precision not in PRECISIONS:
        raise ValueError(
            f"MODEL.MASK_FORMER.TEST.PRECISION must be one of {sorted(PRECISIONS)}, got {precision!r}"
        )
    return PRECISIONS[precision]


# ---------------------------------------------------------------------------------------------
# Batch norm folded into the preceding convolution
# ---------------------------------------------------------------------------------------------
def _foldable_norm(norm: Optional[nn.Module]) -> bool:
    if isinstance(norm, FrozenBatchNorm2d):
        return True
    # A BatchNorm2d (or SyncBatchNorm) uses its running statistics in eval mode only.
    return (
        isinstance(norm, nn.modules.batchnorm._BatchNorm)
        and norm.track_running_stats
        and norm.running_mean is not None
        and not norm.training
    )


def _norm_sources(norm: nn.Module) -> List[Tensor]:
    return [t for t in (norm.weight, norm.bias, norm.running_mean, norm.running_var) if t is not None]


def fold_conv_norm(conv: Conv2d, dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor]:
    """
    The weight and bias of one convolution equal to ``conv.norm(conv(x))`` without activation.

    Computed in float64 and rounded once to ``dtype`` (default: the weight's dtype); the weight is
    returned channels-last, the layout oneDNN convolutions prefer.
    """
    norm = conv.norm
    if not _foldable_norm(norm):
        raise ValueError(f"conv.norm is not a frozen batch norm: {type(norm).__name__}")
    with torch.no_grad():
        weight = conv.weight.double()
        scale = (norm.running_var.double() + norm.eps).rsqrt()
        if norm.weight is not None:
            scale = scale * norm.weight.double()
        shift = -norm.running_mean.double() * scale
        if norm.bias is not None:
            shift = shift + norm.bias.double()
        if conv.bias is not None:
            shift = shift + conv.bias.double() * scale
        dtype = dtype or conv.weight.dtype
        folded = (weight * scale.view(-1, 1, 1, 1)).to(dtype).contiguous(memory_format=torch.channels_last)
        return folded, shift.to(dtype)


def is_pointwise_conv(conv: nn.Conv2d) -> bool:
    """Whether ``conv`` is a 1x1 convolution with stride 1, no padding and one group."""
    return (tuple(conv.kernel_size) == (1, 1) and tuple(conv.stride) == (1, 1)
            and tuple(conv.padding) == (0, 0) and conv.groups == 1)


def run_conv(conv: Conv2d, x: Tensor, weight: Tensor, bias: Optional[Tensor], norm_folded: bool,
             pointwise: bool, winograd: bool = False) -> Tensor:
    """What detectron2's ``Conv2d.forward`` computes, with ``weight`` and ``bias`` in place of the
    layer's own, its norm skipped when ``norm_folded`` (folded into them), a 1x1 convolution
    (``pointwise``) of a channels-last input run as one matrix product over the pixels (PyTorch
    would otherwise copy the input to the planar layout for its single-threaded 1x1 kernel), and,
    with ``winograd``, a large float32 3x3 convolution (``winograd_conv.winograd_pays``) by
    NNPACK's Winograd algorithm."""
    if pointwise and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        x = F.linear(x.permute(0, 2, 3, 1), weight.flatten(1), bias).permute(0, 3, 1, 2)
    elif winograd and winograd_pays(x, weight):
        # planar out: reordering back to channels-last cost as much as it saved the next layer
        x = winograd_conv2d(x, weight, bias, conv.padding)
    else:
        x = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    if not norm_folded and conv.norm is not None:
        x = conv.norm(x)
    if conv.activation is not None:
        x = conv.activation(x)
    return x


class _InferenceConvForward:
    """``forward`` of one detectron2 ``Conv2d`` in inference (see :func:`run_conv`): the folded
    weight and bias (and no norm) when its norm was folded, else its own weight, bias and norm; by
    Winograd where ``winograd`` and the layer is a large 3x3 one (``winograd_conv.is_winograd_conv``)."""

    __slots__ = ("conv", "weight", "bias", "pointwise", "winograd")

    def __init__(self, conv: Conv2d, weight: Optional[Tensor], bias: Optional[Tensor], winograd: bool):
        self.conv, self.weight, self.bias = conv, weight, bias
        self.pointwise = is_pointwise_conv(conv)
        self.winograd = winograd and is_winograd_conv(conv)

    def __call__(self, x: Tensor) -> Tensor:
        conv = self.conv
        folded = self.weight is not None
        weight, bias = (self.weight, self.bias) if folded else (conv.weight, conv.bias)
        return run_conv(conv, x, weight, bias, folded, self.pointwise, self.winograd)


def _low_precision_sources(module: nn.Module, folded: set) -> List[Tuple[str, Tensor]]:
    """(name, parameter) of the weights autocast would cast for its matrix products and
    convolutions: those of ``Linear``, ``Conv2d`` (not folded) and ``MultiheadAttention`` layers."""
    sources = []
    for prefix, m in module.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.MultiheadAttention)) and m not in folded:
            for name, p in m.named_parameters(recurse=False):
                sources.append((f"{prefix}.{name}" if prefix else name, p))
    return sources


def _tensor_state(t: Tensor) -> Tuple[Tensor, int, int]:
    return t, t._version, t.data_ptr()


def _unchanged(t: Optional[Tensor], state: Tuple[Tensor, int, int]) -> bool:
    source, version, pointer = state
    return t is source and t._version == version and t.data_ptr() == pointer


def _check_fits(name: str, dtype: torch.dtype, copies: Sequence[Optional[Tensor]],
                sources: Sequence[Optional[Tensor]], folded: bool) -> None:
    """A ValueError naming the weight or layer ``name`` when a weight that is finite in its
    ``sources`` became infinite in its ``dtype`` ``copies`` (float16 ends at 65504)."""
    if not any(c is not None and torch.isinf(c).any() for c in copies):
        return
    if all(s is None or torch.isfinite(s).all() for s in sources):
        what = f"the convolution {name!r} with its batch norm folded in" if folded else f"the weight {name!r}"
        raise ValueError(
            f"MODEL.MASK_FORMER.TEST.PRECISION: {what} does not fit {dtype} (it has values beyond "
            f"{torch.finfo(dtype).max:g}); run this model in another precision (bf16 has float32's range)"
        )


class InferenceWeights:
    """
    The weights a module runs with in inference, kept beside it:

    * every detectron2 ``Conv2d`` with a frozen batch norm runs as one convolution with the norm
      folded into its weight and bias; 1x1 convolutions of channels-last inputs run as matrix
      products; with ``winograd``, large float32 3x3 convolutions run by NNPACK's Winograd
      algorithm (``layers.winograd_conv``);
    * with a low-precision ``dtype`` (bfloat16, float16), copies in that dtype of the weights that
      autocast would otherwise cast again at every call (``Linear``, ``Conv2d`` and
      ``MultiheadAttention`` layers); the folded weights are stored in it too.

    ``with weights.active(): weights.call(module.sub, "sub", x)`` runs a submodule so; outside it
    the module runs as built. The module's parameters, buffers and ``state_dict()`` are never
    changed; :meth:`is_current` tells when they were (an optimizer step, ``load_state_dict``,
    ``.to()``) so that the copies are made again. A weight that would overflow ``dtype`` (float16
    ends at 65504) is a ValueError naming its layer.
    """

    def __init__(self, module: nn.Module, dtype: Optional[torch.dtype] = None, fold: bool = True,
                 winograd: bool = False):
        """
        Args:
            module: the root module (``call`` takes the names of its submodules).
            dtype: dtype of the folded weights and, unless float32, of the low-precision copies
                (default: each weight's own dtype, no copies).
            fold: fold the frozen batch norms (False: every convolution runs as built; for
                measuring what folding pays).
            winograd: run the large float32 3x3 convolutions by Winograd (MODEL.WINOGRAD_CONV).
        """
        self.dtype = dtype
        self.fold = fold
        self.winograd = winograd
        self._forwards = []
        self._sources = []  # state of the tensors folded from
        for name, conv in module.named_modules():
            if not isinstance(conv, Conv2d):
                continue
            weight = bias = None
            if fold and _foldable_norm(conv.norm):
                weight, bias = fold_conv_norm(conv, dtype)
                sources = [conv.weight, conv.bias] + _norm_sources(conv.norm)
                _check_fits(name, weight.dtype, [weight, bias], sources, folded=True)
                for t in sources:
                    if t is not None:
                        self._sources.append(_tensor_state(t))
            self._forwards.append(_InferenceConvForward(conv, weight, bias, winograd))
        self._cast: dict = {}  # parameter name -> low-precision copy
        self._cast_sources: List[Tuple[str, Tuple[Tensor, int, int]]] = []
        if dtype is not None and dtype != torch.float32:
            with torch.no_grad():
                for name, p in _low_precision_sources(module, self._folded_modules()):
                    if p.is_floating_point() and p.dtype != dtype:
                        self._cast[name] = p.detach().to(dtype)
                        _check_fits(name, dtype, [self._cast[name]], [p], folded=False)
                        self._cast_sources.append((name, _tensor_state(p)))

    def _folded_modules(self) -> set:
        return {f.conv for f in self._forwards if f.weight is not None}

    def __len__(self) -> int:
        """Number of folded layers."""
        return sum(1 for f in self._forwards if f.weight is not None)

    def is_current(self, module: nn.Module, dtype: Optional[torch.dtype] = None) -> bool:
        """Whether this still describes ``module`` as it is now: the same ``Conv2d`` layers (when
        folding, the same of them foldable), and no tensor copied or folded from modified or
        replaced."""
        if dtype != self.dtype:
            return False
        convs = [m for m in module.modules() if isinstance(m, Conv2d)]
        if len(convs) != len(self._forwards):
            return False
        index = 0
        for conv, forward in zip(convs, self._forwards):
            if conv is not forward.conv:
                return False
            if self.fold and _foldable_norm(conv.norm) != (forward.weight is not None):
                return False
            if forward.weight is None:
                continue
            for t in [conv.weight, conv.bias] + _norm_sources(conv.norm):
                if t is None:
                    continue
                if index >= len(self._sources) or not _unchanged(t, self._sources[index]):
                    return False
                index += 1
        if index != len(self._sources):
            return False
        if self._cast_sources:
            current = [(n, p) for n, p in _low_precision_sources(module, self._folded_modules())
                       if p.is_floating_point() and p.dtype != self.dtype]
            if len(current) != len(self._cast_sources):
                return False
            for (name, p), (cast_name, state) in zip(current, self._cast_sources):
                if name != cast_name or not _unchanged(p, state):
                    return False
        return True

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Within this context the convolutions run as described above (their ``forward`` is set
        on the instance, and removed on exit)."""
        installed = []
        try:
            for forward in self._forwards:
                forward.conv.forward = forward
                installed.append(forward.conv)
            yield
        finally:
            for conv in installed:
                conv.__dict__.pop("forward", None)

    def call(self, submodule: nn.Module, name: str, *args, **kwargs):
        """``submodule(*args, **kwargs)`` with the low-precision copies of its weights (``name``:
        its name in the root module), through ``torch.func.functional_call``."""
        prefix = name + "."
        cast = {k[len(prefix):]: v for k, v in self._cast.items() if k.startswith(prefix)}
        if not cast:
            return submodule(*args, **kwargs)
        return torch.func.functional_call(submodule, cast, args, kwargs)


# ---------------------------------------------------------------------------------------------
# Bilinear upsampling by bands, and the semantic combination
# ---------------------------------------------------------------------------------------------
def _integer_factor(low: int, full: int) -> Optional[int]:
    return full // low if low > 0 and full % low == 0 else None


def _source_index(dst: int, factor: int) -> int:
    """Lower input index used by bilinear upsampling (align_corners=False) for output ``dst``."""
    return max(0, math.floor((dst + 0.5) / factor - 0.5))


def upsample_bilinear_rows(x: Tensor, factor: int, rows: Tuple[int, int], width: int,
                           scratch: Optional[Tensor] = None) -> Tensor:
    """
    Rows ``rows[0]:rows[1]`` and columns ``0:width`` of
    ``F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)``, computed
    from the input rows and columns they depend on only.

    Args:
        x: N x C x h x w.
        factor: integer upsampling factor (the full result is N x C x h*factor x w*factor).
        rows: output rows [r0, r1) of the full result.
        width: number of leading output columns wanted.
        scratch: a 1-D tensor of x's dtype and device with at least
            ``upsample_rows_scratch_size(...)`` elements to compute the band in (so that bands
            computed one after the other reuse one block of memory), or None for new memory.
    Returns:
        N x C x (r1 - r0) x width, in x's memory format (a view of ``scratch`` when given); equal
        to the same part of the full result (the same kernel with the same source indices and
        weights).
    """
    h, w = x.shape[-2:]
    r0, r1 = rows
    if not (0 <= r0 < r1 <= h * factor and 0 < width <= w * factor):
        raise ValueError(f"rows {rows} / width {width} outside the {h * factor} x {w * factor} result")
    # One input row of margin on either side keeps the band's indices those of the full result
    # whatever the rounding of the source coordinate; rows before r0 are computed and dropped.
    s0 = max(0, _source_index(r0, factor) - 1)
    s1 = min(h, _source_index(r1 - 1, factor) + 3)
    c1 = min(w, _source_index(width - 1, factor) + 3)
    rows_out, cols_out = r1 - s0 * factor, width
    # PyTorch copies a dimension whose input and output sizes are equal, whatever the scale:
    # ask for one more row / column then (it exists, and is dropped).
    rows_out += int(rows_out == s1 - s0 and factor > 1)
    cols_out += int(cols_out == c1 and factor > 1)
    source = x[..., s0:s1, :c1]
    if scratch is None:
        band = torch.ops.aten.upsample_bilinear2d.default(
            source, [rows_out, cols_out], False, float(factor), float(factor)
        )
    else:
        shape = (x.shape[0], x.shape[1], rows_out, cols_out)
        size = math.prod(shape)
        if scratch.numel() < size:
            raise ValueError(f"scratch has {scratch.numel()} elements, the band needs {size}")
        if x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] > 1:
            # the layout the kernel writes for a channels-last input
            band = scratch[:size].view(shape[0], rows_out, cols_out, shape[1]).permute(0, 3, 1, 2)
        else:
            band = scratch[:size].view(shape)
        torch.ops.aten.upsample_bilinear2d.out(
            source, [rows_out, cols_out], False, float(factor), float(factor), out=band
        )
    return band[..., r0 - s0 * factor:r1 - s0 * factor, :width]


def upsample_rows_scratch_size(x: Tensor, factor: int, tile_rows: int, width: int) -> int:
    """Elements of a ``scratch`` that ``upsample_bilinear_rows`` takes for any band of at most
    ``tile_rows`` rows and ``width`` columns of ``x`` (N x C x h x w) upsampled by ``factor``."""
    # the band starts up to 2 input rows before its first row and ends 3 after its last
    # (and each may get one more row or column, see upsample_bilinear_rows)
    rows = min(x.shape[-2] * factor, tile_rows + 5 * factor) + 1
    cols = min(x.shape[-1] * factor, width) + 1
    return x.shape[0] * x.shape[1] * rows * cols


def upsample_bilinear_crop(x: Tensor, full_size: Sequence[int], crop: Sequence[int]) -> Tensor:
    """
    ``F.interpolate(x, size=full_size, mode="bilinear", align_corners=False)[..., :crop[0], :crop[1]]``
    without computing the cropped-away part when ``full_size`` is an integer multiple of x's size.

    Args:
        x: N x C x h x w.
    Returns:
        N x C x crop[0] x crop[1], contiguous.
    """
    h, w = x.shape[-2:]
    x = x.contiguous()  # planar in, planar out (the result is used query by query)
    fh, fw = _integer_factor(h, full_size[0]), _integer_factor(w, full_size[1])
    if fh is None or fh != fw:
        full = F.interpolate(x, size=tuple(full_size), mode="bilinear", align_corners=False)
        return full[..., : crop[0], : crop[1]].contiguous()
    return upsample_bilinear_rows(x, fh, (0, crop[0]), crop[1]).contiguous()


def _class_probabilities(mask_cls: Tensor) -> Tensor:
    """K x Q: softmax over the K+1 classes, "no object" dropped, transposed for the product."""
    return F.softmax(mask_cls.float(), dim=-1)[:, :-1].t()


def _scores_output(out: Optional[Tensor], shape: Tuple[int, int, int], device: torch.device) -> Tensor:
    """``out`` checked to be a contiguous float32 tensor of ``shape`` on ``device``, or a new one."""
    if out is None:
        return torch.empty(shape, device=device)
    if (tuple(out.shape) != tuple(shape) or out.dtype != torch.float32 or out.device != device
            or not out.is_contiguous()):
        raise ValueError(
            f"semantic scores: out must be a contiguous float32 tensor of shape {tuple(shape)} on "
            f"{device}, got {out.dtype} of shape {tuple(out.shape)} on {out.device} (contiguous: "
            f"{out.is_contiguous()})"
        )
    return out


def semantic_scores_from_low_res(
    mask_cls: Tensor,
    mask_pred: Tensor,
    full_size: Sequence[int],
    crop: Sequence[int],
    tile_rows: int = SEMANTIC_TILE_ROWS,
    out: Optional[Tensor] = None,
) -> Tensor:
    """
    MaskFormer's semantic scores of the mask logits upsampled to ``full_size`` and cropped:
    ``semantic_inference(mask_cls, interpolate(mask_pred, full_size)[:, :crop[0], :crop[1]])``,
    band by band (``tile_rows`` output rows at a time).

    Args:
        mask_cls: Q x (K+1) class logits.
        mask_pred: Q x h x w mask logits at the mask resolution.
        full_size: (H, W) the logits are upsampled to (the padded image size).
        crop: (height, width) kept from the top left (the image size).
        out: where to write the scores (K x crop[0] x crop[1], float32, contiguous), or None.
    Returns:
        K x crop[0] x crop[1] float32 scores (``out`` when given).
    """
    h, w = mask_pred.shape[-2:]
    fh, fw = _integer_factor(h, full_size[0]), _integer_factor(w, full_size[1])
    if fh is None or fh != fw:
        logits = F.interpolate(mask_pred[None].float(), size=tuple(full_size), mode="bilinear",
                               align_corners=False)[0]
        return semantic_scores_from_logits(mask_cls, logits[:, : crop[0], : crop[1]], tile_rows, out)
    probs_t = _class_probabilities(mask_cls)
    num_queries = mask_pred.shape[0]
    height, width = crop
    scores = _scores_output(out, (probs_t.shape[0], height, width), probs_t.device)
    flat = scores.view(probs_t.shape[0], height * width)
    # Channels-last: the upsampling kernel then interpolates all queries of a pixel at once
    # (several times faster than planar), and a band is a (pixels x queries) matrix.
    # (Built from h x w x Q so that even the batch stride is the canonical channels-last one, or
    # PyTorch takes the input for planar and the kernel for the slow path.)
    low = mask_pred.float().permute(1, 2, 0).contiguous()[None].permute(0, 3, 1, 2)
    scratch = low.new_empty(upsample_rows_scratch_size(low, fh, tile_rows, width))  # one for all bands
    for r0 in range(0, height, tile_rows):
        r1 = min(height, r0 + tile_rows)
        band = upsample_bilinear_rows(low, fh, (r0, r1), width, scratch)  # 1 x Q x rows x width
        band = band.permute(0, 2, 3, 1).reshape(-1, num_queries).sigmoid_()  # a view, no copy
        torch.mm(probs_t, band.t(), out=flat[:, r0 * width:r1 * width])
    return scores


def semantic_scores_from_logits(mask_cls: Tensor, mask_pred: Tensor,
                                tile_rows: int = SEMANTIC_TILE_ROWS, out: Optional[Tensor] = None) -> Tensor:
    """
    ``semantic_inference(mask_cls, mask_pred)`` (``sum_q softmax(cls)[q, c] * sigmoid(mask)[q]``)
    of full-resolution mask logits, band by band without a full-size sigmoid.

    Args:
        mask_cls: Q x (K+1) class logits.
        mask_pred: Q x H x W mask logits (any strides); not modified.
        out: where to write the scores (K x H x W, float32, contiguous), or None.
    Returns:
        K x H x W float32 scores (``out`` when given).
    """
    probs_t = _class_probabilities(mask_cls)
    num_queries, height, width = mask_pred.shape
    scores = _scores_output(out, (probs_t.shape[0], height, width), probs_t.device)
    flat = scores.view(probs_t.shape[0], height * width)
    buffer = probs_t.new_empty(num_queries * min(tile_rows, height) * width)
    for r0 in range(0, height, tile_rows):
        r1 = min(height, r0 + tile_rows)
        band = buffer[: num_queries * (r1 - r0) * width].view(num_queries, r1 - r0, width)
        torch.sigmoid(mask_pred[:, r0:r1], out=band)
        torch.mm(probs_t, band.view(num_queries, -1), out=flat[:, r0 * width:r1 * width])
    return scores
