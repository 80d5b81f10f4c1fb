"""Training-time speed-ups that keep a model's losses, gradients (to float rounding) and state dict.

:func:`folded_frozen_norms` runs every detectron2 ``Conv2d`` whose norm is a ``FrozenBatchNorm2d``
as one convolution with the norm folded into its weight and bias. The folded weight is computed
from the layer's own parameters at every call, so their gradients are those of the unfolded pair
(the norm's buffers get none, as before); it saves the norm's two passes over the activation in
the forward and one in the backward.

``MaskFormer`` trains so (``optimize_training``, on by default), with the images channels-last:
oneDNN's convolutions then run in their own layout, without a reorder of every input, output and
gradient. Measured with ``tools/benchmark_training.py`` (R50 at 512x512, 2 threads): both together
about 0.9x of the step; 1x1 convolutions as matrix products, as inference runs them, made the
training step slower and are not used here. :func:`channels_last_conv_weights` stores the
convolutions' weights channels-last too, so that neither the weights nor their gradients are
reordered at every call (values and state-dict keys unchanged; the AdamW moments take the same
layout): about 0.94x of the R50 step again.

:func:`checkpoint_activations` trades time for memory (``MODEL.ACTIVATION_CHECKPOINTING``): the
named submodules keep only their inputs for the backward and run their forward again there
(``torch.utils.checkpoint``, non-reentrant), with the same losses and gradients.
"""
import contextlib
from typing import Callable, ContextManager, Iterator, Sequence, Tuple

import torch
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..layers.winograd_conv import is_winograd_conv
from .backbone.swin import zero_masked_attention, zero_masked_attention_enabled
from .inference_optimization import run_conv
from .transformer_decoder.standard_transformer_decoder import pixel_major_mask_logits, pixel_major_mask_logits_enabled

__all__ = ["frozen_norm_affine", "folded_frozen_norms", "winograd_convolutions", "channels_last_conv_weights",
           "checkpoint_activations", "has_checkpointed_activations"]


def frozen_norm_affine(norm: FrozenBatchNorm2d) -> Tuple[Tensor, Tensor]:
    """``(scale, shift)`` (C each) with ``norm(x) == x * scale + shift`` per channel."""
    scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
    return scale, norm.bias - norm.running_mean * scale


class _FoldedConvForward:
    """``forward`` of one detectron2 ``Conv2d`` with a frozen batch norm: the norm folded into the
    weight and bias, differentiably with respect to the convolution's own parameters."""

    __slots__ = ("conv",)

    def __init__(self, conv: Conv2d):
        self.conv = conv

    def __call__(self, x: Tensor) -> Tensor:
        conv = self.conv
        scale, shift = frozen_norm_affine(conv.norm)
        weight = conv.weight * scale.view(-1, 1, 1, 1)
        bias = shift if conv.bias is None else conv.bias * scale + shift
        return run_conv(conv, x, weight, bias, norm_folded=True, pointwise=False)


@contextlib.contextmanager
def _replaced_forwards(module: nn.Module, wanted: Callable[[Conv2d], bool],
                       make_forward: Callable[[Conv2d], Callable]) -> Iterator[None]:
    """Within this context, every detectron2 ``Conv2d`` of ``module`` that is ``wanted`` and whose
    ``forward`` no enclosing context replaced runs ``make_forward(conv)`` instead (set on the
    instance, removed on exit)."""
    installed = []
    try:
        for conv in module.modules():
            if isinstance(conv, Conv2d) and "forward" not in conv.__dict__ and wanted(conv):
                conv.forward = make_forward(conv)
                installed.append(conv)
        yield
    finally:
        for conv in installed:
            conv.__dict__.pop("forward", None)


def folded_frozen_norms(module: nn.Module) -> ContextManager[None]:
    """Within this context, every detectron2 ``Conv2d`` of ``module`` with a ``FrozenBatchNorm2d``
    runs with the norm folded in (its ``forward`` is set on the instance and removed on exit; the
    autograd graph built inside stays valid after it). Other layers run as built. Nested use is
    allowed: a convolution already folded by an enclosing context is left to it."""
    return _replaced_forwards(module, lambda conv: isinstance(conv.norm, FrozenBatchNorm2d), _FoldedConvForward)


class _WinogradConvForward:
    """``forward`` of one large 3x3 detectron2 ``Conv2d``: by Winograd where the input is large
    enough (``winograd_conv.winograd_pays``), differentiably; its norm and activation as built."""

    __slots__ = ("conv",)

    def __init__(self, conv: Conv2d):
        self.conv = conv

    def __call__(self, x: Tensor) -> Tensor:
        conv = self.conv
        return run_conv(conv, x, conv.weight, conv.bias, norm_folded=False, pointwise=False, winograd=True)


def winograd_convolutions(module: nn.Module, enabled: bool = True) -> ContextManager[None]:
    """Within this context (when ``enabled``), every detectron2 ``Conv2d`` of ``module`` that
    ``winograd_conv.is_winograd_conv`` accepts (3x3, stride 1, >= 256 channels in and out) runs by
    Winograd's algorithm on float32 CPU maps large enough (``winograd_conv.winograd_pays``): the
    same losses and gradients to float rounding. Layers whose ``forward`` an enclosing context
    replaced are left to it; the autograd graph built inside stays valid after it."""
    return _replaced_forwards(module, is_winograd_conv if enabled else (lambda conv: False), _WinogradConvForward)


def channels_last_conv_weights(module: nn.Module, channels_last: bool = True) -> int:
    """Store the weight of every ``nn.Conv2d`` of ``module`` channels-last (or, with
    ``channels_last`` False, planar: contiguous), in place (the same values and ``Parameter``
    objects, so an optimizer built before keeps them). Returns how many weights changed layout.
    Call it before the optimizer's first step: moments made before have the old layout, which is
    correct but slower."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    changed = 0
    for conv in module.modules():
        if isinstance(conv, nn.Conv2d) and not conv.weight.is_contiguous(memory_format=layout):
            conv.weight.data = conv.weight.data.contiguous(memory_format=layout)
            changed += 1
    return changed


def _has_forwards(module: nn.Module, kind: type) -> bool:
    return any(isinstance(m.__dict__.get("forward"), kind) for m in module.modules())


class _CheckpointedMethod:
    """A module's ``forward`` (or another method of it) whose activations are recomputed in the
    backward: in training with gradients on, the method runs under ``torch.utils.checkpoint``
    (non-reentrant, random state preserved, so dropout draws the same masks). Convolutions folded
    by an enclosing :func:`folded_frozen_norms` when it ran are folded again for the
    recomputation, which happens after that context has exited, so are the Winograd convolutions
    of an enclosing :func:`winograd_convolutions`, Swin's windows are masked as they were
    (``zero_masked_attention``) and the mask logits laid out as they were
    (``pixel_major_mask_logits``)."""

    __slots__ = ("module", "method")

    def __init__(self, module: nn.Module, method: str):
        self.module = module
        self.method = method

    def __call__(self, *args, **kwargs):
        module = self.module
        method = getattr(type(module), self.method)
        if not (module.training and torch.is_grad_enabled()):
            return method(module, *args, **kwargs)
        folded = _has_forwards(module, _FoldedConvForward)
        winograd = _has_forwards(module, _WinogradConvForward)
        zero_masked = zero_masked_attention_enabled()
        pixel_major = pixel_major_mask_logits_enabled()

        def run(*inputs):
            with folded_frozen_norms(module) if folded else contextlib.nullcontext(), \
                    winograd_convolutions(module, winograd), zero_masked_attention(zero_masked), \
                    pixel_major_mask_logits(pixel_major):
                return method(module, *inputs, **kwargs)

        return checkpoint(run, *args, use_reentrant=False)


def checkpoint_activations(model: nn.Module, names: Sequence[str]) -> None:
    """
    Recompute the activations of parts of ``model`` in the backward instead of keeping them: each
    keeps only its inputs (and the outputs that later layers keep). A name is a submodule's dotted
    name as in ``named_modules()`` (e.g. ``backbone.res2``: its ``forward``), or a submodule's name
    and one of its methods (e.g. ``sem_seg_head.pixel_decoder.forward_features``, which MaskFormer's
    head calls instead of the pixel decoder's ``forward``). Parameters and state dict are unchanged.
    ValueError for a name that is neither, or that is given twice.
    """
    if isinstance(names, str):
        raise ValueError(f"MODEL.ACTIVATION_CHECKPOINTING must be a list of names, got the string {names!r}")
    for name in names:
        module, method = _resolve(model, name)
        if method in module.__dict__:
            raise ValueError(f"MODEL.ACTIVATION_CHECKPOINTING: {name!r} is listed twice or its {method} is replaced")
        setattr(module, method, _CheckpointedMethod(module, method))


def has_checkpointed_activations(model: nn.Module) -> bool:
    """Whether :func:`checkpoint_activations` recomputes any part of ``model``."""
    return any(isinstance(attr, _CheckpointedMethod) for m in model.modules() for attr in m.__dict__.values())


def _resolve(model: nn.Module, name: str) -> Tuple[nn.Module, str]:
    """(module, method name) of an entry of ``checkpoint_activations``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"MODEL.ACTIVATION_CHECKPOINTING: entries are dotted submodule names, got {name!r}")
    try:
        return model.get_submodule(name), "forward"
    except AttributeError:
        pass
    parent, _, method = name.rpartition(".")
    try:
        module = model.get_submodule(parent)
    except AttributeError:
        module = None
    if module is not None and method and callable(getattr(type(module), method, None)):
        return module, method
    children = ", ".join(n for n, _ in model.named_children())
    raise ValueError(
        f"MODEL.ACTIVATION_CHECKPOINTING: {name!r} is neither a submodule of {type(model).__name__} nor a "
        f"method of one (dotted names from named_modules(); its children: {children})"
    )
