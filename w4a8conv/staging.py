"""Staging buffers between the transforms and the disk: a shard's bytes are produced straight into one
of two reused, page-aligned 64 MiB buffers; when one is full, a hashing thread and a writing thread
(`pwrite`, then `sync_file_range` write-behind) both read it, and the last of them to finish hands it
back. Producing, hashing and writing overlap (hashlib and `pwrite` release the GIL; sha256, the
slowest of them on many hosts, never waits for the disk), and memory stays two buffers whatever the
model.

A `StagingPool` lives as long as a process converts (its buffers are allocated and faulted in once);
a `StagedFile` writes one file through it. An error of either thread (a full disk, a failing hash)
is raised again, as the same exception, by the producing thread's next call.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import mmap
import os
import queue
import sys
import threading
from collections.abc import Callable

__all__ = ["BUFFER_BYTES", "BUFFERS", "StagingPool", "StagedFile"]

BUFFER_BYTES = 64 * 2**20
BUFFERS = 2  # one filling, one being hashed and written


class StagingPool:
    """`count` anonymous mappings of `buffer_bytes`, page-aligned and faulted in at creation (so the
    resident set does not grow as they fill), handed out and taken back through a queue."""

    def __init__(self, buffer_bytes: int = BUFFER_BYTES, count: int = BUFFERS):
        if buffer_bytes <= 0 or count < 2:
            raise ValueError(f"a staging pool needs at least two buffers of a positive size, got {count} x "
                             f"{buffer_bytes}")
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
        self.buffer_bytes = buffer_bytes
        self._maps = [mmap.mmap(-1, buffer_bytes, flags=flags) for _ in range(count)]
        self._free: queue.Queue[memoryview] = queue.Queue()
        for mapped in self._maps:
            self._free.put(memoryview(mapped))

    @property
    def count(self) -> int:
        return len(self._maps)

    def take(self) -> memoryview:
        return self._free.get()

    def give_back(self, buffer: memoryview) -> None:
        self._free.put(buffer)

    def idle(self) -> int:
        """Buffers in the pool right now (all of them between files)."""
        return self._free.qsize()


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


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        done = os.pwrite(fd, data, offset)
        data, offset = data[done:], offset + done


class StagedFile:
    """One file written from offset 0 through the pool's buffers; sha256 of every byte on the way.

    `reserve(n)` lends the next n bytes of the current buffer (the caller fills them before its next
    call); `write(data)` copies bytes of any length; `finish()` writes the rest and returns the
    digest; `abort()` stops the thread and drops what was not written. Either ends the file's use of
    the pool, which then holds all its buffers again."""

    _DONE = None

    def __init__(self, pool: StagingPool, fd: int):
        self._pool, self._fd = pool, fd
        self._digest = hashlib.sha256()
        self._error: BaseException | None = None
        self._aborted = False
        self._buffer: memoryview | None = pool.take()
        self._used = 0
        self._handed = 0  # bytes of full buffers handed to the threads
        self._offset = 0  # where the writing thread writes next
        self._writeback = _Writeback(fd, 0)
        self._readers_lock = threading.Lock()  # guards each handed buffer's count of threads still reading it
        self._queues: list[queue.Queue] = [queue.Queue(), queue.Queue()]
        self._threads = [threading.Thread(target=self._run, args=(q, work), name=f"w4a8conv-{name}", daemon=True)
                         for q, work, name in zip(self._queues, (self._hash, self._write), ("hash", "write"))]
        for thread in self._threads:
            thread.start()

    @property
    def capacity(self) -> int:
        """The largest `reserve`."""
        return self._pool.buffer_bytes

    def _hash(self, data: memoryview) -> None:
        self._digest.update(data)

    def _write(self, data: memoryview) -> None:
        _pwrite_all(self._fd, data, self._offset)
        self._offset += len(data)
        self._writeback.advance(len(data))

    def _run(self, full: queue.Queue, work: Callable[[memoryview], None]) -> None:
        while (item := full.get()) is not self._DONE:
            buffer, used, readers = item
            if self._error is None and not self._aborted:
                try:
                    work(buffer[:used])
                except BaseException as exc:  # raised again by the producing thread
                    self._error = exc
            with self._readers_lock:
                readers[0] -= 1
                last = not readers[0]
            if last:
                self._pool.give_back(buffer)

    def _hand_over(self, buffer: memoryview, used: int) -> None:
        readers = [len(self._queues)]  # the last thread to finish with the buffer gives it back
        for full in self._queues:
            full.put((buffer, used, readers))

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    @property
    def staged_bytes(self) -> int:
        """Bytes put into the file so far (written or still in a buffer)."""
        return self._handed + self._used

    def _next_buffer(self) -> None:
        """Hand the current buffer to the hashing and writing threads and take the next free one."""
        self._hand_over(self._buffer, self._used)
        self._handed += self._used
        self._buffer, self._used = None, 0
        self._buffer = self._pool.take()
        self._raise_error()

    def reserve(self, nbytes: int) -> memoryview:
        """The next `nbytes` of the file as a writable view of a staging buffer (at most `capacity`)."""
        if nbytes > self.capacity:
            raise ValueError(f"cannot reserve {nbytes} bytes in a {self.capacity}-byte staging buffer")
        if self._buffer is None:
            raise ValueError("the staged file is finished")
        if self._used + nbytes > self.capacity:
            self._next_buffer()
        start = self._used
        self._used += nbytes
        return self._buffer[start:self._used]

    def reserve_some(self, nbytes: int) -> memoryview:
        """The next bytes of the file, at most `nbytes` and at least one: what the current buffer has
        room for (the next buffer's when it is full)."""
        if self._buffer is not None and self._used == self.capacity:
            self._next_buffer()
        return self.reserve(min(nbytes, self.capacity - self._used))

    def write(self, data: memoryview | bytes) -> None:
        """Copy `data` into the buffers (any length)."""
        view = memoryview(data).cast("B")
        while view:
            region = self.reserve_some(len(view))
            region[:] = view[:len(region)]
            view = view[len(region):]

    def finish(self) -> str:
        """Write what is staged, wait for both threads; the sha256 hex digest of the whole file."""
        if self._used:
            self._hand_over(self._buffer, self._used)
        elif self._buffer is not None:
            self._pool.give_back(self._buffer)
        self._buffer = None
        self._stop()
        self._raise_error()
        return self._digest.hexdigest()

    def abort(self) -> None:
        """Stop without writing what is staged (after an error); the buffers go back to the pool."""
        self._aborted = True
        if self._buffer is not None:
            self._pool.give_back(self._buffer)
            self._buffer = None
        self._stop()

    def _stop(self) -> None:
        for full, thread in zip(self._queues, self._threads):
            if thread.is_alive():
                full.put(self._DONE)
                thread.join()
