"""Checkpointing that never leaves a half-written file behind ``last_checkpoint``."""
import os

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager
import torch


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


class AtomicDetectionCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer whose checkpoints and ``last_checkpoint`` tag are written atomically,
    so a run killed while saving resumes from the last complete checkpoint."""

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
