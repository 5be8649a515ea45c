"""Runs a plan's shards: in this process or in worker processes, with a journal for resume.

Every shard's bytes depend on the plan alone, so the output is identical for any worker count and
for a run that was interrupted and resumed. The journal records each finished shard's size and
sha256 as soon as its rename is durable; `--resume` re-hashes those files and skips the ones that
still match.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import multiprocessing
import os
import queue as queue_module
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import resource_tracker
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import OutputLocationError, WriteError
from .produce import produce
from .source.reader import TensorReader
from .source.safetensors_file import TensorRef
from .writer import ShardPlan, WrittenShard, partial_name, write_json_atomic, write_shard

__all__ = ["JOURNAL_NAME", "Journal", "run_shards", "sha256_file", "plan_fingerprint", "source_files_identity"]

JOURNAL_NAME = ".w4a8conv-journal.json"
_HASH_BLOCK = 16 * 2**20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def plan_fingerprint(shards: list[ShardPlan], metadata: Mapping[str, str]) -> str:
    """sha256 over what decides the output bytes: shard names, tensor names, dtypes, shapes, recipes."""
    digest = hashlib.sha256(json.dumps(dict(metadata), sort_keys=True).encode())
    for shard in shards:
        digest.update(f"\0{shard.file_name}".encode())
        for t in shard.tensors:
            digest.update(f"\0{t.name}:{t.dtype}:{list(t.shape)}:{type(t.recipe).__name__}".encode())
    return "sha256:" + digest.hexdigest()


def source_files_identity(files: list[Path]) -> str:
    """sha256 over each weight file's name, size, modification time and inode: the fingerprint covers
    headers only, so this is what tells a resume that tensor bytes were edited in place."""
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"\0{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0{stat.st_ino}".encode())
    return "sha256:" + digest.hexdigest()


@dataclass
class Journal:
    """What a run has finished, keyed to the source and the plan it was made for."""

    path: Path
    source_fingerprint: str
    source_files: str  # identity of the weight files' contents on disk (see `source_files_identity`)
    plan_fingerprint: str
    done: dict[str, dict]

    @classmethod
    def start(cls, output: Path, source_fingerprint: str, source_files: str, plan_fp: str) -> "Journal":
        journal = cls(output / JOURNAL_NAME, source_fingerprint, source_files, plan_fp, {})
        journal.save()
        return journal

    @classmethod
    def resume(cls, output: Path, source_fingerprint: str, source_files: str, plan_fp: str) -> "Journal":
        path = output / JOURNAL_NAME
        try:
            raw = json.loads(path.read_text())
            journal = cls(path, raw["source_fingerprint"], raw["source_files"], raw["plan_fingerprint"],
                          {str(k): {"bytes": int(v["bytes"]), "sha256": str(v["sha256"])}
                           for k, v in raw["shards"].items()})
        except FileNotFoundError:
            raise OutputLocationError(f"{output}: nothing to resume (no {JOURNAL_NAME}); "
                                      "start a new conversion") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise OutputLocationError(f"{path}: unreadable journal ({exc}); use --force to start over") from None
        if journal.source_fingerprint != source_fingerprint:
            raise OutputLocationError(f"{output}: the source changed since the interrupted run "
                                      "(fingerprint mismatch); use --force to start over")
        if journal.source_files != source_files:
            raise OutputLocationError(f"{output}: the source changed since the interrupted run (its weight files "
                                      "were modified or replaced); use --force to start over")
        if journal.plan_fingerprint != plan_fp:
            raise OutputLocationError(f"{output}: the interrupted run used other options (shard size or "
                                      "model dtype); resume with the same options or use --force")
        return journal

    def save(self) -> None:
        write_json_atomic(self.path, {"source_fingerprint": self.source_fingerprint,
                                      "source_files": self.source_files,
                                      "plan_fingerprint": self.plan_fingerprint, "shards": self.done})

    def record(self, shard: WrittenShard) -> None:
        self.done[shard.file_name] = {"bytes": shard.nbytes, "sha256": shard.sha256}
        self.save()

    def still_valid(self, output: Path, name: str) -> WrittenShard | None:
        """The journaled shard, if its file is still there with the recorded size and hash."""
        entry, path = self.done.get(name), output / name
        try:
            if entry is None or not path.is_file() or path.stat().st_size != entry["bytes"]:
                return None
            if sha256_file(path) != entry["sha256"]:
                return None
        except OSError:  # unreadable: written again (and a write that fails too names the path)
            return None
        return WrittenShard(name, entry["bytes"], entry["sha256"])


@contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    """The transforms are many small ops; torch's intra-op pool only adds hand-offs (and spinning on a
    busy machine), so conversion runs them single-threaded and restores the caller's setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


_PR_SET_PDEATHSIG = 1

# Worker-process state, set once by the pool initializer.
_WORKER: dict = {}


def _die_with_parent(parent: int) -> None:
    """A worker must not outlive a killed parent (it would finish and rename a shard behind a resume)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _init_worker(progress, parent: int) -> None:
    _die_with_parent(parent)
    for signum in (signal.SIGINT, signal.SIGHUP):  # Ctrl-C and a hangup reach the parent, which stops the workers
        signal.signal(signum, signal.SIG_IGN)
    torch.set_num_threads(1)  # one shard per core; intra-op threads would oversubscribe
    _WORKER.update(progress=progress, reader=TensorReader())


def _worker_shard(output: Path, shard: ShardPlan, metadata: dict[str, str],
                  tensors: Mapping[str, TensorRef]) -> WrittenShard:
    return _write(output, shard, metadata, _WORKER["reader"], tensors, _WORKER["progress"].put)


def _write(output: Path, shard: ShardPlan, metadata: dict[str, str], reader: TensorReader,
           tensors: Mapping[str, TensorRef], report: Callable[[int], None]) -> WrittenShard:
    def pieces(tensor):
        for piece in produce(tensor, reader, tensors):
            yield piece
            report(len(piece))
    return write_shard(output, shard, metadata, pieces)


def run_shards(output: Path, shards: list[ShardPlan], metadata: dict[str, str], tensors: Mapping[str, TensorRef],
               journal: Journal, workers: int, on_bytes: Callable[[int], None]) -> list[WrittenShard]:
    """Write every shard the journal does not already hold; returns all shards in plan order."""
    done = {s.file_name: w for s in shards if (w := journal.still_valid(output, s.file_name))}
    for name in done:
        on_bytes(next(s.data_bytes for s in shards if s.file_name == name))
    todo = [s for s in shards if s.file_name not in done]
    if workers <= 1 or len(todo) <= 1:
        with TensorReader() as reader, _torch_threads(1):
            for shard in todo:
                written = _write(output, shard, metadata, reader, tensors, on_bytes)
                journal.record(written)
                done[written.file_name] = written
    else:
        _run_in_workers(output, todo, metadata, tensors, journal, min(workers, len(todo)), on_bytes, done)
    return [done[s.file_name] for s in shards]


def _start_resource_tracker() -> None:
    """multiprocessing's helper process ignores SIGINT and SIGTERM, not SIGHUP: started with SIGHUP
    ignored (kept across its exec), it survives a hangup sent to the whole process group, and the run
    stops in order instead of printing the helper's tracebacks."""
    if threading.current_thread() is not threading.main_thread():
        resource_tracker.ensure_running()
        return
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        resource_tracker.ensure_running()
    finally:
        signal.signal(signal.SIGHUP, previous)


def _run_in_workers(output: Path, todo: list[ShardPlan], metadata: dict[str, str], tensors: Mapping[str, TensorRef],
                    journal: Journal, workers: int, on_bytes: Callable[[int], None],
                    done: dict[str, WrittenShard]) -> None:
    """One shard per task in `spawn` processes; on any error or signal the other workers are stopped at
    once and their unfinished `.partial` files removed, while finished shards stay journaled."""
    context = multiprocessing.get_context("spawn")
    _start_resource_tracker()
    progress = context.Queue()
    stop_draining = threading.Event()
    drain = threading.Thread(target=_drain, args=(progress, on_bytes, stop_draining), daemon=True)
    drain.start()
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                               initargs=(progress, os.getpid()))
    # Each task carries only the source references its shard reads: the whole map of a 600 GB model
    # is ~300k references (~35 MB pickled), too much to send to every worker.
    running = {pool.submit(_worker_shard, output, shard, metadata,
                           {n: tensors[n] for t in shard.tensors for n in t.recipe.sources().values()}): shard
               for shard in todo}
    try:
        pending = set(running)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                written = future.result()  # re-raises the worker's error
                journal.record(written)  # journaled as soon as it is durable, for a later --resume
                done[written.file_name] = written
        pool.shutdown()
    except BaseException as exc:
        # ProcessPoolExecutor would let running shards finish; a failed or interrupted run must stop now.
        processes = list(getattr(pool, "_processes", {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.terminate()
        for process in processes:
            process.join()
        pool.shutdown(wait=True)  # joins the executor's own thread before the interpreter exits
        for shard in todo:
            with contextlib.suppress(OSError):  # reported below: the error that stopped the run
                (output / partial_name(shard.file_name)).unlink(missing_ok=True)
            final = output / shard.file_name
            if shard.file_name not in done and final.is_file():
                # Renamed by a worker whose result never arrived: a shard only gets its final name
                # after it was fully written and fsynced, so journal it for --resume.
                with contextlib.suppress(OSError):  # unreadable: --resume writes it again
                    written = WrittenShard(shard.file_name, final.stat().st_size, sha256_file(final))
                    journal.record(written)
        if isinstance(exc, BrokenProcessPool):
            unfinished = sorted(s.file_name for s in todo if s.file_name not in done)
            raise WriteError(f"{output}: a worker process died (killed by a signal or out of memory) while "
                             f"converting {', '.join(unfinished[:4])}; finished shards are kept: run again "
                             "with --resume") from None
        raise
    finally:
        stop_draining.set()
        drain.join()


def _drain(queue, on_bytes: Callable[[int], None], stop: threading.Event) -> None:
    """Report workers' progress until stopped and drained. No sentinel through the queue: a worker
    killed while writing to it leaves its cross-process write lock held, and a put would block forever."""
    while True:
        try:
            on_bytes(queue.get(timeout=0.05))
        except queue_module.Empty:
            if stop.is_set():
                return
