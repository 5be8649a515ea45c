"""Reading tensor bytes with one open descriptor per file (thousands of small scales per layer)."""
from __future__ import annotations

import bisect
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from ..errors import InvalidCheckpointError
from .safetensors_file import TORCH_DTYPES, TensorRef

__all__ = ["TensorReader", "READ_AHEAD_BYTES"]

READ_AHEAD_BYTES = 128 * 2**20  # asked of the kernel ahead of the tensor being read
_FADV_WILLNEED = getattr(os, "POSIX_FADV_WILLNEED", None)


class TensorReader:
    """Loads tensors by `TensorRef` with positional reads; use as a context manager."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._ahead: dict[tuple[Path, int], int] = {}  # (file, offset) -> index in the announced order
        self._order: list[TensorRef] = []
        self._starts: list[int] = []  # each announced tensor's first byte in the order's byte stream
        self._advised = 0  # read-ahead requested up to this byte of the stream
        self.read_ahead_bytes = READ_AHEAD_BYTES

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _fd(self, file: Path) -> int:
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds[file] = os.open(file, os.O_RDONLY)
        return fd

    def announce(self, refs: Iterable[TensorRef]) -> None:
        """The tensors about to be read, in order: reading them then asks the kernel (posix_fadvise
        WILLNEED) to read the next `read_ahead_bytes` of them in the background, so a cold source's
        disk reads overlap the conversion. A tensor not announced (or read again) changes nothing."""
        self._order, self._ahead, self._starts, self._advised = [], {}, [], 0
        position = 0
        for ref in refs:
            if (ref.file, ref.offset) not in self._ahead:
                self._ahead[(ref.file, ref.offset)] = len(self._order)
                self._order.append(ref)
                self._starts.append(position)
                position += ref.nbytes

    def _read_ahead(self, ref: TensorRef, end: int) -> None:
        """Reading `ref` up to its byte `end`: when less than half the window is advised beyond that
        point, advise up to a whole window (contiguous tensors of one file in one call)."""
        index = self._ahead.get((ref.file, ref.offset))
        if index is None or _FADV_WILLNEED is None:
            return
        here = self._starts[index] + end
        if self._advised - here >= self.read_ahead_bytes // 2:
            return
        goal, at = here + self.read_ahead_bytes, max(self._advised, here)
        i = bisect.bisect_right(self._starts, at) - 1
        ranges: list[list] = []  # [file, offset, length]
        while i < len(self._order) and at < goal:
            target = self._order[i]
            skip = at - self._starts[i]
            length = min(target.nbytes - skip, goal - at)
            if length > 0:
                begin = target.offset + skip
                if ranges and ranges[-1][0] == target.file and ranges[-1][1] + ranges[-1][2] == begin:
                    ranges[-1][2] += length
                else:
                    ranges.append([target.file, begin, length])
            at += max(length, 0)
            i += 1
        self._advised = at
        for file, offset, length in ranges:
            try:
                os.posix_fadvise(self._fd(file), offset, length, _FADV_WILLNEED)
            except OSError:
                return  # advice only: a real problem is the read's to report

    def read_into(self, ref: TensorRef, buf: memoryview, start: int = 0) -> None:
        """Fill `buf` with the tensor's bytes from `start` on."""
        try:
            if self._order:
                self._read_ahead(ref, start + len(buf))
            self._read_into(ref, buf, start)
        except OSError as exc:
            raise InvalidCheckpointError(f"cannot read: {exc.strerror or exc}", file=ref.file,
                                         tensor=ref.name) from None

    def _read_into(self, ref: TensorRef, buf: memoryview, start: int) -> None:
        fd, done = self._fd(ref.file), 0
        while done < len(buf):
            got = os.preadv(fd, [buf[done:]], ref.offset + start + done)
            if got == 0:
                raise InvalidCheckpointError(
                    f"file ends after {start + done} of {ref.nbytes} bytes of this tensor",
                    file=ref.file, tensor=ref.name)
            done += got

    def read_bytes(self, ref: TensorRef) -> bytearray:
        buf = bytearray(ref.nbytes)
        self.read_into(ref, memoryview(buf))
        return buf

    def load(self, ref: TensorRef, into: np.ndarray | None = None) -> torch.Tensor:
        """The tensor on CPU: owning its memory, or a view of `into` (uint8, at least `ref.nbytes`,
        aligned for the dtype; a reused buffer), which it then reads into."""
        if ref.dtype not in TORCH_DTYPES:
            raise InvalidCheckpointError(f"dtype {ref.dtype} cannot be decoded", file=ref.file, tensor=ref.name)
        dtype = TORCH_DTYPES[ref.dtype]
        if ref.nbytes == 0:
            return torch.empty(ref.shape, dtype=dtype)
        if into is None:
            return torch.frombuffer(self.read_bytes(ref), dtype=dtype).reshape(ref.shape)
        raw = into[:ref.nbytes]
        self.read_into(ref, memoryview(raw))
        return torch.from_numpy(raw).view(dtype).reshape(ref.shape)
