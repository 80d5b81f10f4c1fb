"""Export of :class:`ExportableMaskFormer` to TorchScript (tracing) and ONNX (``torch.export`` +
the dynamo ONNX exporter), and the checks of an exported file against PyTorch."""
import contextlib
import logging
import warnings
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.modeling import build_model
from torch import Tensor

from ..checkpoint import MaskFormerCheckpointer, check_weights_available
from .network import ExportableMaskFormer

__all__ = [
    "build_exportable_model",
    "example_image",
    "trace_torchscript",
    "export_program",
    "export_onnx",
    "load_torchscript",
    "save_torchscript",
    "onnx_runner",
    "max_abs_diffs",
]

logger = logging.getLogger(__name__)

Outputs = Tuple[Tensor, Tensor]


def build_exportable_model(cfg) -> Tuple[ExportableMaskFormer, torch.nn.Module]:
    """
    Build the model of ``cfg``, load ``MODEL.WEIGHTS`` with :class:`MaskFormerCheckpointer`
    (published layouts remapped; every parameter must be in the file, as for ``--eval-only``),
    and wrap it. An empty ``MODEL.WEIGHTS`` keeps the random initialization (with a warning).

    Returns:
        the wrapper and the model (they share their modules).
    """
    model = build_model(cfg)
    model.eval()
    weights = cfg.MODEL.WEIGHTS
    if weights:
        check_weights_available(weights)
        MaskFormerCheckpointer(model, allow_mismatch=False).load(weights)
    else:
        logger.warning("MODEL.WEIGHTS is empty: exporting a randomly initialized model")
    return ExportableMaskFormer(model), model


def example_image(height: int, width: int, seed: int = 0, device="cpu") -> Tensor:
    """A 1 x 3 x H x W random image of raw pixel values (0-255), the network's input."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand((1, 3, height, width), generator=generator) * 255).to(device)


def _check_example(module: ExportableMaskFormer, image: Tensor) -> None:
    d = module.size_divisibility
    if image.dim() != 4 or image.shape[:2] != (1, 3):
        raise ValueError(f"the example image must be 1 x 3 x H x W, got {tuple(image.shape)}")
    if image.shape[2] % d or image.shape[3] % d:
        raise ValueError(f"the example image's height and width must be multiples of {d} (the "
                         f"network's size divisibility), got {tuple(image.shape[2:])}")


@contextlib.contextmanager
def _quiet_jit() -> Iterator[None]:
    """torch.jit is deprecated in favour of torch.export (the ONNX path); it still works."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated", category=FutureWarning)
        yield


def trace_torchscript(module: ExportableMaskFormer, image: Tensor) -> torch.jit.ScriptModule:
    """
    TorchScript of ``module`` by tracing on ``image`` (1 x 3 x H x W). The traced graph works for
    any H, W (multiples of the size divisibility): every size in the network is computed from the
    input's shape (``tests/test_export.py`` checks other sizes). Scripting is not possible:
    detectron2's ResNet keeps its stages in a plain list, which TorchScript cannot compile.
    """
    _check_example(module, image)
    with torch.no_grad(), _quiet_jit(), warnings.catch_warnings():
        # The tracer warns where Python checks read tensor values: nn.MultiheadAttention's and
        # group_norm's input checks and the transformer decoder's channel check, none of which
        # changes the graph.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        return torch.jit.trace(module, (image,), check_trace=False)


def save_torchscript(module: torch.jit.ScriptModule, path: str) -> None:
    with _quiet_jit():
        torch.jit.save(module, path)


def load_torchscript(path: str, map_location="cpu") -> torch.jit.ScriptModule:
    with _quiet_jit():
        return torch.jit.load(path, map_location=map_location)


def _dynamic_shapes(module: ExportableMaskFormer) -> Dict[str, Dict[int, object]]:
    d = module.size_divisibility
    Dim = torch.export.Dim
    return {"image": {2: d * Dim("height_blocks", min=1), 3: d * Dim("width_blocks", min=1)}}


def export_program(module: ExportableMaskFormer, image: Tensor) -> "torch.export.ExportedProgram":
    """``torch.export`` of ``module`` with a dynamic height and width (multiples of the size
    divisibility); ``image`` gives the other dimensions (batch 1, 3 channels)."""
    _check_example(module, image)
    with torch.no_grad():
        return torch.export.export(module, (image,), dynamic_shapes=_dynamic_shapes(module))


def export_onnx(module: ExportableMaskFormer, image: Tensor, path: str, *,
                program: Optional["torch.export.ExportedProgram"] = None, opset_version: Optional[int] = None,
                optimize: bool = True, external_data: bool = False) -> None:
    """
    Write the ONNX model of ``module`` to ``path`` with ``torch.onnx.export``'s dynamo exporter
    (through ``torch.export``; pass ``program`` to reuse one from :func:`export_program`). Input
    ``image`` (1 x 3 x H x W, H and W symbolic multiples of the size divisibility), outputs
    ``pred_logits`` and ``pred_masks``.

    Args:
        opset_version: the ONNX opset (default: the exporter's recommended one).
        optimize: run the ONNX optimizer (constant folding, ...) on the graph.
        external_data: weights in ``path + ".data"`` beside the model; needed above 2 GB.
    """
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter's dependency; check it first)
    except ImportError as e:
        raise ImportError("ONNX export needs the onnx and onnxscript packages "
                          "(pip install -r requirements-dev.txt)") from e
    if program is None:
        program = export_program(module, image)
    # The ONNX optimizer warns for every multi-output op it does not constant-fold (harmless).
    folding_logger = logging.getLogger("onnxscript.optimizer._constant_folding")
    level = folding_logger.level
    folding_logger.setLevel(logging.ERROR)
    try:
        with torch.no_grad():
            torch.onnx.export(
                program, (image,), path, dynamo=True, input_names=list(module.input_names),
                output_names=list(module.output_names), opset_version=opset_version,
                optimize=optimize, external_data=external_data, verbose=False,
            )
    finally:
        folding_logger.setLevel(level)


def onnx_runner(path: str, num_threads: Optional[int] = None) -> Callable[[Tensor], Outputs]:
    """An onnxruntime (CPU) session of the model at ``path`` as a function image -> outputs."""
    import onnxruntime  # optional: the tests' and the checks' runtime

    options = onnxruntime.SessionOptions()
    if num_threads:
        options.intra_op_num_threads = num_threads
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def run(image: Tensor) -> Outputs:
        outputs = session.run(None, {input_name: image.detach().cpu().numpy().astype(np.float32)})
        return tuple(torch.from_numpy(o) for o in outputs)

    return run


def max_abs_diffs(expected: Sequence[Tensor], actual: Sequence[Tensor]) -> Tuple[float, ...]:
    """Per output, the largest absolute difference (shapes must agree)."""
    diffs = []
    for name, e, a in zip(ExportableMaskFormer.output_names, expected, actual):
        a = torch.as_tensor(a)
        if tuple(e.shape) != tuple(a.shape):
            raise ValueError(f"{name}: shape {tuple(a.shape)}, expected {tuple(e.shape)}")
        diffs.append(float((e.float() - a.float()).abs().max()) if e.numel() else 0.0)
    return tuple(diffs)
