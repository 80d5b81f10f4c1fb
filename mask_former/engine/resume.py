"""Exact resumption of an interrupted training run.

A resumed run continues the data stream where the interrupted one stopped (instead of starting
the sampler over) and restores the Python, NumPy and torch random states saved with the
checkpoint, so augmentation and dropout draw the same numbers. With a fixed SEED, zero data
loader workers and deterministic kernels (CPU), the resumed run then reproduces the
uninterrupted one exactly. (Data loader workers have their own random states, which are not
saved: with workers, a resumed run is statistically equivalent, not identical.)
"""
import itertools
import random
from typing import Any, Dict, Optional

import numpy as np
import torch
from detectron2.data.samplers import TrainingSampler
from detectron2.engine import HookBase


class ResumableTrainingSampler(TrainingSampler):
    """detectron2's TrainingSampler (an infinite, seeded stream of shuffled indices shared by all
    processes) that skips the first ``start_sample`` indices of the global stream."""

    def __init__(self, size: int, shuffle: bool = True, seed: Optional[int] = None, start_sample: int = 0):
        super().__init__(size, shuffle=shuffle, seed=seed)
        if start_sample % self._world_size != 0:
            raise ValueError(
                f"start_sample={start_sample} must be a multiple of the number of processes "
                f"({self._world_size})"
            )
        self._start_sample = start_sample

    def __iter__(self):
        start = self._start_sample + self._rank
        yield from itertools.islice(self._infinite_indices(), start, None, self._world_size)


class RandomStates:
    """Checkpointable snapshot of the Python, NumPy and torch (CPU and CUDA) random states.

    ``load_state_dict`` only keeps the states; :class:`RestoreRandomStatesHook` applies them when
    training starts, after everything that draws random numbers once at start-up.
    """

    def __init__(self):
        self.pending: Optional[Dict[str, Any]] = None

    def state_dict(self) -> Dict[str, Any]:
        # Only tensors and plain Python values, so torch.load(weights_only=True) can read it.
        version, python_state, gauss = random.getstate()
        np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
        state = {
            "python": [version, torch.tensor(python_state, dtype=torch.int64), gauss],
            "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss),
                      float(np_gauss)],
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.pending = state

    def apply_pending(self) -> bool:
        if self.pending is None:
            return False
        state, self.pending = self.pending, None
        version, python_state, gauss = state["python"]
        random.setstate((version, tuple(python_state.tolist()), gauss))
        np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
        np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        return True


class RestoreRandomStatesHook(HookBase):
    """Restores the random states of the checkpoint right before the first resumed step.

    The train loader must not draw from the global torch generator when it starts (give it a
    seeded generator of its own), or the restored state would be shifted by that draw.
    """

    def __init__(self, random_states: RandomStates):
        self.random_states = random_states

    def before_train(self):
        self.random_states.apply_pending()
