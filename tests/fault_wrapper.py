"""Runs the real CLI (`w4a8conv.cli.main`) with one fault injected, for tests/test_faults.py.

    W4A8_FAULT=<name> W4A8_FAULT_ARG=<arg> python tests/fault_wrapper.py convert SRC OUT ...

Spawned worker processes import this file again as `__mp_main__`, so the patches below apply in them
too (`slow`, `kill-worker`). Faults:

  enospc-shard ARG        os.pwrite in w4a8conv.staging fails with ENOSPC after 100 bytes of the shard
                          whose name contains ARG
  enospc-index            writing model.safetensors.index.json fails with ENOSPC
  sigkill-before-record N SIGKILL after the N-th shard is renamed into place, before the journal records it
  sigkill-before-description / sigkill-after-description
                          SIGKILL just before / just after the stamped description is written
  sigterm-mid-shard N     SIGTERM to itself at the N-th produced tensor (workers 1)
  slow SECONDS            every produced tensor takes SECONDS longer (for signals sent from outside)
  kill-worker N           a worker process SIGKILLs itself at its N-th tensor (the OOM killer)
"""
from __future__ import annotations

import builtins
import errno
import os
import signal
import sys
import time
from pathlib import Path

import w4a8conv.engine as engine
import w4a8conv.files as files
import w4a8conv.journal as journal
import w4a8conv.route as route
import w4a8conv.staging as staging
import w4a8conv.writer as writer
from w4a8conv.constants import DESCRIPTION_NAME, INDEX_NAME

FAULT = os.environ.get("W4A8_FAULT", "")
ARG = os.environ.get("W4A8_FAULT_ARG", "")
IN_WORKER = __name__ == "__mp_main__"


def enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class FullDiskOs:
    """Stands in for the `os` module inside w4a8conv.writer: writes to files whose path contains `match`
    fail with ENOSPC once `after` bytes went to them. Everything else is the real `os`."""

    def __init__(self, match: str, after: int = 100):
        self.match, self.after = match, after
        self.watched: dict[int, int] = {}

    def __getattr__(self, name: str):
        return getattr(os, name)

    def open(self, path, *args, **kwargs):
        fd = os.open(path, *args, **kwargs)
        if self.match in os.fspath(path):
            self.watched[fd] = 0
        return fd

    def write(self, fd, data):
        if fd in self.watched:
            if self.watched[fd] + len(data) > self.after:
                raise enospc()
            self.watched[fd] += len(data)
        return os.write(fd, data)

    def pwrite(self, fd, data, offset):
        if fd in self.watched:
            if self.watched[fd] + len(data) > self.after:
                raise enospc()
            self.watched[fd] += len(data)
        return os.pwrite(fd, data, offset)

    def close(self, fd):
        self.watched.pop(fd, None)
        return os.close(fd)


def _suicide(signum: int) -> None:
    os.kill(os.getpid(), signum)
    time.sleep(10)  # SIGKILL never comes back; a handled SIGTERM raises out of this sleep


def _patch_produce(hook) -> None:
    original = engine.produce
    count = [0]

    def produce(tensor, producer, tensors, staged):
        count[0] += 1
        hook(count[0])
        original(tensor, producer, tensors, staged)
    engine.produce = produce


def _patch_json(hook) -> None:
    original = route.write_json_atomic

    def write_json_atomic(path, obj):
        hook(Path(path).name, "before")
        original(path, obj)
        hook(Path(path).name, "after")
    route.write_json_atomic = write_json_atomic


if FAULT == "enospc-shard":
    writer.os = staging.os = FullDiskOs(ARG)  # the shard is opened by the writer, written by staging
elif FAULT == "enospc-index":
    class _FullFile:
        def __init__(self, f):
            self._f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

        def write(self, _data):
            raise enospc()

        def __getattr__(self, name):
            return getattr(self._f, name)

    def _open(path, *args, **kwargs):
        f = builtins.open(path, *args, **kwargs)
        return _FullFile(f) if Path(path).name == files.partial_name(INDEX_NAME) else f
    files.open = _open
elif FAULT == "sigkill-before-record":
    _record, _calls = journal.Journal.record, [0]

    def _record_then_maybe_die(self, shard):
        _calls[0] += 1
        if _calls[0] == int(ARG):
            _suicide(signal.SIGKILL)
        _record(self, shard)
    journal.Journal.record = _record_then_maybe_die
elif FAULT in ("sigkill-before-description", "sigkill-after-description"):
    _when = FAULT.split("-")[1]
    _patch_json(lambda name, when: _suicide(signal.SIGKILL) if name == DESCRIPTION_NAME and when == _when else None)
elif FAULT == "sigterm-mid-shard" and not IN_WORKER:
    _patch_produce(lambda n: _suicide(signal.SIGTERM) if n == int(ARG) else None)
elif FAULT == "slow":
    _patch_produce(lambda n: time.sleep(float(ARG)))
elif FAULT == "kill-worker" and IN_WORKER:
    _patch_produce(lambda n: _suicide(signal.SIGKILL) if n == int(ARG) else None)


if __name__ == "__main__":
    from w4a8conv.cli import main

    sys.argv = ["w4a8conv", *sys.argv[1:]]
    main()
