"""The project's checkpointer: detectron2's, with atomic saves, the published key layout, safe
loading (safetensors; torch.load(weights_only=True); .pkl through a restricted unpickler) and
clear errors for files that are not checkpoints."""
import io
import os
import pickle
import re
from collections.abc import Mapping
from typing import Dict, Optional
from urllib.parse import parse_qs

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager

from .published_layout import remap_published_keys

__all__ = [
    "MaskFormerCheckpointer",
    "CheckpointLoadError",
    "WEIGHTS_FORMATS",
    "check_weights_available",
    "save_weights_file",
]

WEIGHTS_FORMATS = (
    ".safetensors (tensors only; the safe format), "
    ".pth/.pt (torch.save of a state dict or of {'model': state_dict, ...}, read with "
    "torch.load(weights_only=True)), "
    ".pkl (detectron2 / Detectron model-zoo pickle of numpy arrays, read by a restricted unpickler)"
)


class CheckpointLoadError(ValueError):
    """A weights file that is not a checkpoint this project can load (corrupt, empty, another
    format, or holding objects that could run code when unpickled), or, when mismatches are
    refused, one that does not fit the model."""


def _atomic_write(path: str, write) -> None:
    """Write through ``write(f)`` to a temporary file beside ``path``, flush it to disk, then
    rename it over ``path``: readers see the old complete file or the new complete one."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# what a weights pickle may refer to: containers, numpy arrays and scalars (numpy < 2 and >= 2
# spellings; Python 2 pickles name builtins "__builtin__")
_SAFE_PICKLE_GLOBALS = {
    ("collections", "OrderedDict"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("__builtin__", "set"),
    ("__builtin__", "frozenset"),
}


class _WeightsUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, numbers, strings and numpy arrays; refuses every other global, so
    that loading a weights pickle cannot run code."""

    def find_class(self, module, name):
        if (module, name) in _SAFE_PICKLE_GLOBALS or (
            module == "numpy.dtypes" and re.fullmatch(r"\w+DType", name)
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refuses the Python object {module}.{name}")


def _looks_like(filename: str) -> str:
    """A hint at what a file that is not a checkpoint is instead."""
    try:
        size = os.path.getsize(filename)
        with open(filename, "rb") as f:
            head = f.read(200)
    except OSError:
        return ""
    if size == 0:
        return "the file is empty (0 bytes), e.g. an interrupted download or copy"
    if head.startswith(b"version https://git-lfs"):
        return "the file is a Git LFS pointer, not the weights: fetch them with `git lfs pull`"
    if head.lstrip()[:1] == b"<":
        return "the file is HTML or XML, e.g. a web page saved instead of the download"
    return f"its {size} bytes are corrupt, truncated or in another format"


class MaskFormerCheckpointer(DetectionCheckpointer):
    """detectron2's DetectionCheckpointer with these changes:

    * checkpoints and the ``last_checkpoint`` tag are written atomically, so a run killed while
      saving resumes from the last complete checkpoint;
    * published MaskFormer checkpoints load with no missing keys: their flat pixel-decoder keys
      are moved under ``pixel_decoder.`` (see :func:`remap_published_keys`);
    * safe loading: ``.safetensors`` files load (tensors only, no code); ``.pth`` files load with
      ``torch.load(weights_only=True)``; ``.pkl`` files with an unpickler that accepts nothing but
      containers and numpy arrays. A file that is not a checkpoint, or that holds other objects,
      raises :class:`CheckpointLoadError` naming it and the accepted formats;
    * with ``allow_mismatch=False`` (for evaluation), weights whose shapes differ from the
      model's, or model parameters the file does not have, raise :class:`CheckpointLoadError`
      instead of leaving those parameters at their random initialization with a warning.

    Load MaskFormer weights with this class (the trainer, ``tools/demo.py`` and the converters do);
    detectron2's plain ``DetectionCheckpointer`` does not know the published layout.
    """

    def __init__(self, model, save_dir="", *, allow_mismatch: bool = True, save_to_disk=None,
                 **checkpointables):
        """
        Args:
            model, save_dir, save_to_disk, checkpointables: as for detectron2's
                ``DetectionCheckpointer``.
            allow_mismatch: load what fits and warn about the rest (detectron2's behaviour, what
                fine-tuning to other classes needs); False: refuse a file with parameters of other
                shapes or missing parameters (``--eval-only``).
        """
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.allow_mismatch = allow_mismatch
        self._loading_file: Optional[str] = None

    # ------------------------------------------------------------------ reading files

    def _load_file(self, filename: str) -> Dict:
        self._loading_file = filename
        if filename.endswith(".safetensors"):
            checkpoint = self._load_safetensors(filename)
        elif filename.endswith(".pkl"):
            checkpoint = self._load_weights_pickle(filename)
        else:  # .pth and others: detectron2's handling, torch.load through _torch_load below
            checkpoint = super()._load_file(filename)
        self._check_state_dict(filename, checkpoint)
        return checkpoint

    def _torch_load(self, filename: str) -> Dict:
        try:
            loaded = torch.load(filename, map_location=torch.device("cpu"), weights_only=True)
        except pickle.UnpicklingError as e:
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
            if found is None:  # garbage ("Unsupported operand", "invalid load key", ...)
                raise self._not_a_checkpoint(filename, e) from e
            what = f" (it refers to {found.group(1)})"
            raise CheckpointLoadError(
                f"{filename}: torch.load(weights_only=True) refused it: the file holds Python "
                f"objects besides tensors and plain containers{what}, and loading those could "
                "run code from the file. Save only the weights (torch.save({'model': "
                "model.state_dict()}, path)) or convert them to .safetensors. Accepted: "
                f"{WEIGHTS_FORMATS}"
            ) from e
        except Exception as e:  # corrupt files fail in many ways (EOFError, IndexError, RuntimeError, ...)
            raise self._not_a_checkpoint(filename, e) from e
        if not isinstance(loaded, Mapping):
            raise CheckpointLoadError(
                f"{filename}: holds a {type(loaded).__name__}, not a checkpoint (a dict of "
                f"tensors, or {{'model': dict of tensors, ...}}). Accepted: {WEIGHTS_FORMATS}"
            )
        return loaded  # as is: a state dict's _metadata (module versions) must survive

    def _load_weights_pickle(self, filename: str) -> Dict:
        try:
            with PathManager.open(filename, "rb") as f:
                data = _WeightsUnpickler(f, encoding="latin1").load()
        except pickle.UnpicklingError as e:
            if str(e).startswith("refuses the Python object"):
                raise CheckpointLoadError(
                    f"{filename}: the pickle refers to {str(e)[len('refuses '):]}; a weights pickle needs "
                    "only dicts, lists, numbers, strings and numpy arrays, and unpickling other "
                    "objects could run code from the file. Convert the weights to .safetensors "
                    f"or to a pickle of numpy arrays. Accepted: {WEIGHTS_FORMATS}"
                ) from e
            raise self._not_a_checkpoint(filename, e) from e
        except Exception as e:  # corrupt files fail in many ways
            raise self._not_a_checkpoint(filename, e) from e
        if not isinstance(data, Mapping):
            raise CheckpointLoadError(
                f"{filename}: the pickle holds a {type(data).__name__}, not a dict of weights. "
                f"Accepted: {WEIGHTS_FORMATS}"
            )
        # as detectron2's DetectionCheckpointer reads .pkl files
        if "model" in data and "__author__" in data:
            self.logger.info(f"Reading a file from '{data['__author__']}'")
            return dict(data)
        if "blobs" in data:  # Detectron1 / Caffe2 detection models
            data = data["blobs"]
        data = {k: v for k, v in data.items() if not str(k).endswith("_momentum")}
        return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}

    def _load_safetensors(self, filename: str) -> Dict:
        try:
            from safetensors import safe_open  # optional dependency (the `hf` extra)
        except ImportError as e:
            raise ImportError(
                f"{filename}: reading .safetensors weights needs the safetensors package "
                "(pip install safetensors)"
            ) from e
        try:
            tensors, metadata = {}, {}
            with safe_open(filename, framework="pt", device="cpu") as f:
                metadata = f.metadata() or {}
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except Exception as e:  # corrupt files fail in many ways
            raise self._not_a_checkpoint(filename, e) from e
        heuristics = metadata.get("matching_heuristics", "False") == "True"
        parsed_url = self._parsed_url_during_load
        if parsed_url is not None and parse_qs(parsed_url.query).get("matching_heuristics") == ["True"]:
            heuristics = True
        return {
            "model": tensors,
            "__author__": metadata.get("__author__", "safetensors"),
            "matching_heuristics": heuristics,
        }

    @staticmethod
    def _not_a_checkpoint(filename: str, error: Exception) -> CheckpointLoadError:
        hint = _looks_like(filename)
        reason = str(error)
        # torch's weights-only unpickler wraps the actual problem in advice to load unsafely
        found = re.search(r"WeightsUnpickler error:\s*(.+?)(\n\n|$)", reason, re.S)
        reason = (found.group(1) if found else reason).strip().splitlines()[0][:200] if reason.strip() else ""
        return CheckpointLoadError(
            f"{filename}: not a checkpoint{': ' + hint if hint else ''} "
            f"({type(error).__name__}{': ' + reason if reason else ''}). "
            f"Accepted weights formats: {WEIGHTS_FORMATS}"
        )

    @staticmethod
    def _check_state_dict(filename: str, checkpoint) -> None:
        weights = checkpoint.get("model") if isinstance(checkpoint, Mapping) else None
        if not isinstance(weights, Mapping):
            raise CheckpointLoadError(
                f"{filename}: its 'model' entry is a {type(weights).__name__}, not a state dict "
                f"(names -> tensors). Accepted: {WEIGHTS_FORMATS}"
            )
        for key, value in weights.items():
            if not isinstance(value, (torch.Tensor, np.ndarray)):
                raise CheckpointLoadError(
                    f"{filename}: weight {key!r} is a {type(value).__name__}, not a tensor or "
                    f"numpy array. Accepted: {WEIGHTS_FORMATS}"
                )

    # ------------------------------------------------------------------ fitting the model

    def _load_model(self, checkpoint):
        remap_published_keys(checkpoint["model"], self.model.state_dict().keys())
        incompatible = super()._load_model(checkpoint)
        if not self.allow_mismatch and incompatible is not None:
            self._refuse_mismatch(incompatible)
        return incompatible

    def _refuse_mismatch(self, incompatible) -> None:
        problems = [
            f"{key}: {tuple(shape_file)} in the file, {tuple(shape_model)} in the model"
            for key, shape_file, shape_model in incompatible.incorrect_shapes
        ]
        missing = list(incompatible.missing_keys)
        if not problems and not missing:
            return
        lines = []
        if problems:
            lines.append(f"{len(problems)} weight(s) of another shape: " + "; ".join(problems[:5])
                         + ("; ..." if len(problems) > 5 else ""))
        if missing:
            lines.append(f"{len(missing)} model parameter(s) missing from the file: "
                         + ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else ""))
        raise CheckpointLoadError(
            f"{self._loading_file}: does not fit the model ({'. '.join(lines)}); those "
            "parameters would keep their random initialization. Check that the config matches "
            "the checkpoint (MODEL.SEM_SEG_HEAD.NUM_CLASSES, the architecture), or allow it "
            "explicitly to evaluate a partly loaded model."
        )

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        _atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        save_file = os.path.join(self.save_dir, "last_checkpoint")
        _atomic_write(save_file, lambda f: f.write(last_filename_basename.encode()))


def check_weights_available(weights: str) -> None:
    """Fail before training when MODEL.WEIGHTS names a file that does not exist or a URL that
    cannot be fetched (detectron2 would only fail with an assertion at load time)."""
    if not weights:
        return
    try:
        local = PathManager.get_local_path(weights)
    except Exception as e:  # download errors come in many types
        raise FileNotFoundError(
            f"MODEL.WEIGHTS={weights!r} could not be fetched ({type(e).__name__}: {e}). Download it "
            "on a machine with internet access and set MODEL.WEIGHTS to the local file."
        ) from e
    if not os.path.isfile(local):
        raise FileNotFoundError(f"MODEL.WEIGHTS={weights!r}: no such file ({local})")


def save_weights_file(weights: Dict[str, np.ndarray], path: str, *, author: str,
                      matching_heuristics: bool) -> None:
    """
    Write converted weights for ``MODEL.WEIGHTS`` (atomically): ``.safetensors`` when ``path``
    ends so (tensors only; ``author`` and ``matching_heuristics`` go into its metadata), else a
    detectron2 pickle ``{"model": weights, "__author__": author, "matching_heuristics": ...}``.

    Args:
        weights: name -> numpy array.
    """
    if path.endswith(".safetensors"):
        try:
            from safetensors.numpy import save as safetensors_bytes  # optional dependency
        except ImportError as e:
            raise ImportError(f"{path}: writing .safetensors needs `pip install safetensors`") from e
        arrays = {k: np.ascontiguousarray(v) for k, v in weights.items()}
        metadata = {"__author__": author, "matching_heuristics": str(bool(matching_heuristics))}
        data = safetensors_bytes(arrays, metadata=metadata)
        _atomic_write(path, lambda f: f.write(data))
        return
    payload = {"model": weights, "__author__": author, "matching_heuristics": matching_heuristics}
    buffer = io.BytesIO()
    pickle.dump(payload, buffer)
    _atomic_write(path, lambda f: f.write(buffer.getvalue()))
