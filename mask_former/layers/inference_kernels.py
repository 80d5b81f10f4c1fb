"""The switch of the inference-only kernels of ``mask_former.layers``.

Inside :func:`inference_kernels` (entered by the optimised inference paths of both
meta-architectures), with gradients off, two layers compute what they compute anyway with faster
kernels, equal to float rounding:

* ``fused_linear.linear``: a linear layer, its bias and its activation as one oneDNN call;
* ``ms_deform_attn.ms_deform_attn``: the deformable attention's bilinear samples and their
  weighted sum as weighted sums of gathered rows (one ``F.embedding_bag`` call), without the
  per-sample intermediate of ``grid_sample``; ``MSDeformAttn`` computes the samples' pixel
  coordinates straight from its offsets for it.

Both apply on CPU only (where they were measured); on GPUs the layers run as built.

Outside it, and whenever gradients are on, the layers run as built.
"""
from typing import ContextManager

from .context_switch import ContextSwitch

__all__ = ["inference_kernels", "inference_kernels_enabled"]

_INFERENCE_KERNELS = ContextSwitch("inference_kernels")


def inference_kernels(enabled: bool = True) -> ContextManager[None]:
    """Within this context the layers listed in the module docstring use their inference
    kernels; ``enabled=False`` turns them off inside an enclosing context."""
    return _INFERENCE_KERNELS(enabled)


def inference_kernels_enabled() -> bool:
    """Whether the code runs inside ``inference_kernels()``."""
    return _INFERENCE_KERNELS.enabled()
