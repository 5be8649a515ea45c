"""Streaming safetensors shards: header first (every shape is known from the plan), then each
tensor's pieces as they are produced, hashed on the way. A shard is written under a temporary name,
fsynced and renamed (`files.py`); `route.py` writes the index and the stamped description after every shard.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import queue
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .constants import SHARD_NAME
from .errors import WriteError
from .files import discard, fsync_dir, partial_name
from .journal import WrittenShard
from .plan import OutputTensor

__all__ = ["ShardPlan", "assign_shards", "plan_fingerprint", "shard_header", "write_shard"]

_ALIGN = 8  # safetensors pads the header so tensor data starts 8-byte aligned


@dataclass(frozen=True)
class ShardPlan:
    file_name: str
    tensors: tuple[OutputTensor, ...]

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def assign_shards(tensors: Iterable[OutputTensor], max_shard_bytes: int) -> list[ShardPlan]:
    """Greedy in output order: a shard closes before the tensor that would take it past the cap.

    A tensor larger than the cap gets a shard of its own. Names depend only on the plan.
    """
    groups: list[list[OutputTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if groups[-1] and size + tensor.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += tensor.nbytes
    count = len(groups)
    return [ShardPlan(SHARD_NAME.format(index=i + 1, count=count), tuple(g)) for i, g in enumerate(groups)]


def plan_fingerprint(shards: list[ShardPlan], metadata: Mapping[str, str]) -> str:
    """sha256 over what decides the output bytes: shard names, tensor names, dtypes, shapes, recipes."""
    digest = hashlib.sha256(json.dumps(dict(metadata), sort_keys=True).encode())
    for shard in shards:
        digest.update(f"\0{shard.file_name}".encode())
        for t in shard.tensors:
            digest.update(f"\0{t.name}:{t.dtype}:{list(t.shape)}:{type(t.recipe).__name__}".encode())
    return "sha256:" + digest.hexdigest()


def shard_header(tensors: Iterable[OutputTensor], metadata: dict[str, str]) -> bytes:
    """The safetensors header (length prefix included) for tensors stored back to back in order."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % _ALIGN)
    return len(raw).to_bytes(8, "little") + raw


class _Writeback:
    """Starts the kernel's writeback of each 64 MiB as soon as it is written (Linux sync_file_range)
    and waits for the range two steps behind, so dirty pages stay bounded, disk writes overlap the
    conversion, and the final fsync has little left to do. A no-op where the call is unavailable."""

    STEP = 64 * 2**20
    _WAIT_BEFORE, _WRITE, _WAIT_AFTER = 1, 2, 4

    def __init__(self, fd: int, offset: int):
        self.fd, self.started, self.written = fd, offset, offset
        self.call = _sync_file_range()

    def advance(self, nbytes: int) -> None:
        self.written += nbytes
        while self.call and self.written - self.started >= self.STEP:
            self.call(self.fd, self.started, self.STEP, self._WRITE)
            behind = self.started - 2 * self.STEP
            if behind >= 0:
                self.call(self.fd, behind, self.STEP, self._WAIT_BEFORE | self._WRITE | self._WAIT_AFTER)
            self.started += self.STEP


@functools.cache
def _sync_file_range():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return call


def _write_all(fd: int, data: memoryview | bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class _BackgroundSha256:
    """sha256 on a second thread: hashlib releases the GIL, so hashing overlaps producing and writing.

    Without SHA instructions sha256 runs at ~0.4 GB/s a core, as slow as the transforms themselves.
    """

    _DONE = None

    def __init__(self, max_pending: int = 8):
        self._digest = hashlib.sha256()
        self._queue: queue.Queue = queue.Queue(max_pending)  # bounds the pieces kept alive
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (piece := self._queue.get()) is not self._DONE:
            self._digest.update(piece)

    def update(self, piece: memoryview | bytes) -> None:
        self._queue.put(piece)

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(self._DONE)
            self._thread.join()

    def hexdigest(self) -> str:
        self.close()
        return self._digest.hexdigest()


def write_shard(directory: Path, shard: ShardPlan, metadata: dict[str, str],
                pieces: Callable[[OutputTensor], Iterable[memoryview]]) -> WrittenShard:
    """Write one shard crash-safely; returns its size and sha256. On failure no shard file remains."""
    final, temp = directory / shard.file_name, directory / partial_name(shard.file_name)
    digest = _BackgroundSha256()
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            head = shard_header(shard.tensors, metadata)
            _write_all(fd, head)
            digest.update(head)
            writeback = _Writeback(fd, len(head))
            total = len(head)
            for tensor in shard.tensors:
                written = 0
                for piece in pieces(tensor):
                    _write_all(fd, piece)
                    digest.update(piece)
                    writeback.advance(len(piece))
                    written += len(piece)
                if written != tensor.nbytes:
                    raise AssertionError(f"{tensor.name}: produced {written} bytes, the plan says {tensor.nbytes}")
                total += written
            sha256 = digest.hexdigest()
            os.fsync(fd)
        finally:
            digest.close()
            os.close(fd)
        os.replace(temp, final)
        fsync_dir(directory)
    except OSError as exc:
        discard(temp)
        raise WriteError(f"{final}: cannot write: {exc.strerror or exc}") from None
    except BaseException:
        discard(temp)
        raise
    return WrittenShard(shard.file_name, total, "sha256:" + sha256)
