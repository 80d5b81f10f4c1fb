"""Export of MaskFormer's inference network to TorchScript and ONNX (``tools/export_model.py``).

The exported network maps one padded image of raw pixel values to the class and mask logits
(:class:`ExportableMaskFormer`); :func:`pad_image` makes its input and :class:`Postprocessor`
turns its outputs into the model's semantic, panoptic and instance results in Python. An
application layer: it builds models (``modeling``) and loads their weights (``checkpoint``).
"""
from .exporters import (
    build_exportable_model,
    example_image,
    export_onnx,
    export_program,
    load_torchscript,
    max_abs_diffs,
    onnx_runner,
    save_torchscript,
    trace_torchscript,
)
from .network import ExportableMaskFormer, pad_image
from .postprocess import Postprocessor

__all__ = [
    "ExportableMaskFormer",
    "Postprocessor",
    "build_exportable_model",
    "example_image",
    "export_onnx",
    "export_program",
    "load_torchscript",
    "max_abs_diffs",
    "onnx_runner",
    "pad_image",
    "save_torchscript",
    "trace_torchscript",
]
