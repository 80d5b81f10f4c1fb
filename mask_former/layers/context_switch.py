"""A switch that a block of code turns on for everything it calls."""
import contextlib
from contextvars import ContextVar
from typing import Iterator

__all__ = ["ContextSwitch"]


class ContextSwitch:
    """
    A boolean, off by default, that ``with switch(True):`` turns on (and ``with switch(False):``
    off) for the code inside the block, however deep the calls go, and ``switch.enabled()`` reads.
    Kept in a ``ContextVar``: each thread and asyncio task has its own, and leaving the block
    restores the value it had before, also on an exception.
    """

    def __init__(self, name: str):
        self._value: ContextVar[bool] = ContextVar(name, default=False)

    @contextlib.contextmanager
    def __call__(self, enabled: bool = True) -> Iterator[None]:
        token = self._value.set(enabled)
        try:
            yield
        finally:
            self._value.reset(token)

    def enabled(self) -> bool:
        return self._value.get()
