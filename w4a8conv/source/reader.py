"""Reading tensor bytes with one open descriptor per file (thousands of small scales per layer)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import InvalidCheckpointError
from .safetensors_file import TORCH_DTYPES, TensorRef

__all__ = ["TensorReader"]


class TensorReader:
    """Loads tensors by `TensorRef` with positional reads; use as a context manager."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

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

    def read_into(self, ref: TensorRef, buf: memoryview, start: int = 0) -> None:
        """Fill `buf` with the tensor's bytes from `start` on."""
        try:
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

    def load(self, ref: TensorRef) -> torch.Tensor:
        """The tensor on CPU, owning its memory."""
        if ref.dtype not in TORCH_DTYPES:
            raise InvalidCheckpointError(f"dtype {ref.dtype} cannot be decoded", file=ref.file, tensor=ref.name)
        dtype = TORCH_DTYPES[ref.dtype]
        if ref.nbytes == 0:
            return torch.empty(ref.shape, dtype=dtype)
        return torch.frombuffer(self.read_bytes(ref), dtype=dtype).reshape(ref.shape)
