"""The switch of the inference-only kernels of ``mask_former.layers``.

Inside :func:`inference_kernels` (entered by the optimised inference paths of both
meta-architectures), with gradients off, two layers compute what they compute anyway with faster
kernels, equal to float rounding:

* ``fused_linear.linear``: a linear layer, its bias and its activation as one oneDNN call;
* ``ms_deform_attn.ms_deform_attn``: the deformable attention's bilinear samples and their
  weighted sum as weighted sums of gathered rows (``F.embedding_bag``), without the
  per-sample intermediate of ``grid_sample``.

Both apply on CPU only (where they were measured); on GPUs the layers run as built.

Outside it, and whenever gradients are on, the layers run as built.
"""
import contextlib
from contextvars import ContextVar
from typing import Iterator

__all__ = ["inference_kernels", "inference_kernels_enabled"]

_INFERENCE_KERNELS: ContextVar[bool] = ContextVar("inference_kernels", default=False)


@contextlib.contextmanager
def inference_kernels(enabled: bool = True) -> Iterator[None]:
    """Within this context the layers listed in the module docstring use their inference
    kernels; ``enabled=False`` turns them off inside an enclosing context."""
    token = _INFERENCE_KERNELS.set(enabled)
    try:
        yield
    finally:
        _INFERENCE_KERNELS.reset(token)


def inference_kernels_enabled() -> bool:
    """Whether the code runs inside ``inference_kernels()``."""
    return _INFERENCE_KERNELS.get()
