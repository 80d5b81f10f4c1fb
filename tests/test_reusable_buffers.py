"""ReusableBuffers: memory lent again only when nothing else refers to it any more."""
import copy
import pickle
import threading

import numpy as np
import pytest
import torch

from mask_former.modeling.reusable_buffers import ReusableBuffers


def test_memory_let_go_of_is_lent_again():
    buffers = ReusableBuffers()
    first = buffers.empty("scores", (3, 4, 5))
    address = first.data_ptr()
    del first
    second = buffers.empty("scores", (3, 4, 5))
    assert second.data_ptr() == address
    assert second.shape == (3, 4, 5) and second.dtype == torch.float32 and second.is_contiguous()
    assert len(buffers) == 1


def test_same_size_another_dtype_and_shape_reuses_the_memory():
    buffers = ReusableBuffers()
    address = buffers.empty("k", (4, 6)).data_ptr()  # 96 bytes, dropped at once
    again = buffers.empty("k", (12, 4), dtype=torch.int16)  # 96 bytes
    assert again.data_ptr() == address and again.dtype == torch.int16 and again.shape == (12, 4)


# Everything through which a caller can still reach the memory of an output it was given, and
# how to read the values back through it.
HOLDERS = {
    "the tensor": (lambda t: t, torch.as_tensor),
    "a view": (lambda t: t[1:, :2], torch.as_tensor),
    "a reshaped view": (lambda t: t.view(-1), torch.as_tensor),
    "a NumPy array": (lambda t: t.numpy(), torch.as_tensor),
    "a slice of a NumPy array": (lambda t: t.numpy()[1:], torch.as_tensor),
    "a tensor from the NumPy array": (lambda t: torch.from_numpy(t.numpy()), torch.as_tensor),
    "the storage object": (lambda t: t.untyped_storage(), lambda s: torch.empty(0).set_(s, 0, (3, 4))),
    "a DLPack capsule": (torch.utils.dlpack.to_dlpack, torch.utils.dlpack.from_dlpack),
}


@pytest.mark.parametrize("holder", list(HOLDERS))
def test_memory_still_referred_to_is_never_lent_again(holder):
    hold, read = HOLDERS[holder]
    values = torch.arange(12.0).view(3, 4)
    expected = read(hold(values.clone())).clone()
    buffers = ReusableBuffers()
    first = buffers.empty("scores", (3, 4))
    first.copy_(values)
    address = first.data_ptr()
    kept = hold(first)
    del first
    second = buffers.empty("scores", (3, 4))
    assert second.data_ptr() != address
    second.fill_(-1.0)
    assert torch.equal(read(kept), expected)  # what the caller kept still holds its values
    # the second block is the one kept now; once it is let go of, it is lent again
    address = second.data_ptr()
    del second
    assert buffers.empty("scores", (3, 4)).data_ptr() == address


def test_other_sizes_and_keys_get_their_own_memory():
    buffers = ReusableBuffers()
    a = buffers.empty(("sem_seg", 0), (2, 3))
    address = a.data_ptr()
    del a
    b = buffers.empty(("sem_seg", 1), (2, 3))  # another key: its own block
    c = buffers.empty(("sem_seg", 0), (2, 4))  # another size: new memory, kept instead
    assert b.data_ptr() != address and c.data_ptr() != address and b.data_ptr() != c.data_ptr()
    assert len(buffers) == 2
    buffers.clear()
    assert len(buffers) == 0


def test_other_devices_get_new_tensors_not_kept():
    buffers = ReusableBuffers()
    t = buffers.empty("k", (2, 2), device="meta")
    assert t.device.type == "meta" and t.shape == (2, 2)
    assert len(buffers) == 0


def test_a_buffer_taken_in_another_thread_is_not_lent_twice():
    buffers = ReusableBuffers()
    buffers.empty("k", (256,))  # a block to compete for, let go of at once
    taken, ready = [], threading.Barrier(4)

    def take():
        ready.wait()
        taken.append(buffers.empty("k", (256,)))

    threads = [threading.Thread(target=take) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # every thread still holds its tensor: at most one of them got the old block
    assert len({t.data_ptr() for t in taken}) == 4


def test_numpy_view_values_survive_reuse_of_a_later_block():
    """A NumPy array is the usual way results leave the model (the evaluators, the demo)."""
    buffers = ReusableBuffers()
    results = []
    for value in range(3):
        out = buffers.empty("scores", (5,))
        out.fill_(float(value))
        results.append(out.numpy())
        del out
    assert [r.tolist() for r in results] == [[0.0] * 5, [1.0] * 5, [2.0] * 5]
    assert len({r.ctypes.data for r in results}) == 3
    assert not np.shares_memory(results[2], buffers.empty("scores", (5,)).numpy())


def test_a_copy_starts_empty():
    buffers = ReusableBuffers()
    buffers.empty("k", (4,))
    for copied in (copy.deepcopy(buffers), pickle.loads(pickle.dumps(buffers))):
        assert len(copied) == 0
        assert copied.empty("k", (4,)).shape == (4,) and len(copied) == 1
