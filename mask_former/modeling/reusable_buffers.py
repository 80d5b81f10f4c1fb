"""Memory that an inference call takes over from the previous call once the caller has let go of it.

On the CPU, PyTorch returns the memory of a large tensor to the operating system when the tensor
is freed, and the next tensor of that size is faulted in again, page by page, at its first touch.
For MaskFormer's 150 x 512 x 512 semantic scores (157 MB) that was about 40 ms of a 200 ms
bfloat16 inference on the development VM: more than the matrix product that fills them.

:class:`ReusableBuffers` keeps the memory of such outputs between calls and hands it out again only
when nothing else refers to it any more. It asks torch how many references the memory has (the
count torch.compile's CUDA graph trees check before they reuse an output's memory) and Python how
many the storage object has, so a tensor of the output or a view of it, a NumPy array made from
it, its storage object or a DLPack capsule all keep it from being reused. An output that the caller
keeps is never written again: the next call gets new memory. On other devices the caching
allocator of the device already reuses memory; there the buffers are plain new tensors.
"""
import sys
import threading
from math import prod
from typing import Dict, Hashable, Sequence, Union

import torch
from torch import Tensor

__all__ = ["ReusableBuffers"]


class ReusableBuffers:
    """One block of memory per key, lent out by :meth:`empty` again and again.

    The memory of each key stays allocated between calls (``clear`` frees it), so a model holds at
    most one of each of its large outputs beyond what its callers keep.
    """

    def __init__(self):
        self._storages: Dict[Hashable, torch.UntypedStorage] = {}
        self._lock = threading.Lock()  # two threads must not both find a block free

    def __getstate__(self):
        return {}  # a copy (copy.deepcopy, pickle) starts without memory of its own

    def __setstate__(self, state):
        self.__init__()

    def __len__(self) -> int:
        return len(self._storages)

    def clear(self) -> None:
        """Forget every block (the memory is freed once the callers have let go of it too)."""
        with self._lock:
            self._storages.clear()

    def empty(self, key: Hashable, shape: Sequence[int], dtype: torch.dtype = torch.float32,
              device: Union[str, torch.device] = "cpu") -> Tensor:
        """
        An uninitialised contiguous tensor of ``shape`` and ``dtype``: in the memory last lent
        under ``key`` when that memory is the same size and nothing else refers to it any more,
        else in new memory, which is then kept under ``key`` instead.
        """
        shape = tuple(int(size) for size in shape)
        device = torch.device(device)
        if device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        nbytes = prod(shape) * dtype.itemsize
        with self._lock:
            storage = self._storages.get(key)
            if storage is not None and storage.nbytes() == nbytes and self._only_here(storage):
                return torch.empty(0, dtype=dtype).set_(storage, 0, shape)
            tensor = torch.empty(shape, dtype=dtype)
            self._storages[key] = tensor.untyped_storage()
            return tensor

    @staticmethod
    def _only_here(storage: torch.UntypedStorage) -> bool:
        # Torch counts one reference for the storage object however many Python names it has, so
        # the Python references are counted too: the dict's, ``empty``'s name and this argument,
        # plus getrefcount's own.
        return torch._C._storage_Use_Count(storage._cdata) == 1 and sys.getrefcount(storage) == 4
