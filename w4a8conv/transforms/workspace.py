"""Reusable work buffers for the transforms.

A conversion applies the same transforms to tens of thousands of equally shaped expert projections;
a fresh temporary per call costs a page fault per 4 KiB (system time as large as the arithmetic).
A `Workspace` keeps one buffer per role, grown to the largest request and then reused, so the
steady state allocates nothing. A transform given no workspace allocates as before.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["Workspace"]

_ALIGN = 64  # a cache line: the word views of a buffer (int64, fp32) are always aligned


class Workspace:
    """One growable, 64-byte aligned byte buffer per role; `array` hands out a view of it.

    Two roles never share memory, so a transform may hold several at once; the same role asked for
    twice returns the same memory (the caller is done with the first view by then).
    """

    def __init__(self) -> None:
        self._buffers: dict[str, np.ndarray] = {}

    def array(self, role: str, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
        """A C-contiguous array of `shape` and `dtype` over the role's buffer (contents undefined)."""
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        buffer = self._buffers.get(role)
        if buffer is None or buffer.nbytes < nbytes:
            raw = np.empty(nbytes + _ALIGN, np.uint8)
            start = -raw.ctypes.data % _ALIGN
            buffer = self._buffers[role] = raw[start:start + nbytes]
        return buffer[:nbytes].view(dtype).reshape(shape)

    @property
    def nbytes(self) -> int:
        """Bytes held by every role's buffer."""
        return sum(b.nbytes for b in self._buffers.values())
