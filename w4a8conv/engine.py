"""Runs a plan's shards: in this process or in worker processes, each finished shard journaled.

Every shard's bytes depend on the plan alone, so the output is identical for any worker count and
for a run that was interrupted and resumed (`journal.py` says which shards are done).
"""
from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import queue as queue_module
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import resource_tracker
from pathlib import Path

import torch

from .errors import WriteError
from .files import partial_name
from .journal import Journal, WrittenShard, sha256_file
from .produce import Producer, produce, torch_threads
from .source.reader import TensorReader
from .source.safetensors_file import TensorRef
from .staging import StagingPool
from .writer import ShardPlan, write_shard

__all__ = ["run_shards"]


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
    _WORKER.update(progress=progress, producer=Producer(TensorReader()), pool=StagingPool())


def _worker_shard(output: Path, shard: ShardPlan, metadata: dict[str, str],
                  tensors: Mapping[str, TensorRef]) -> WrittenShard:
    return _write(output, shard, metadata, _WORKER["producer"], _WORKER["pool"], tensors, _WORKER["progress"].put)


def _write(output: Path, shard: ShardPlan, metadata: dict[str, str], producer: Producer, pool: StagingPool,
           tensors: Mapping[str, TensorRef], report: Callable[[int], None]) -> WrittenShard:
    """One shard: its sources announced for read-ahead, each tensor produced into the staging buffers."""
    producer.forget()
    producer.announce(shard.tensors, tensors)

    def one(tensor, staged):
        produce(tensor, producer, tensors, staged)
        report(tensor.nbytes)
    return write_shard(output, shard, metadata, pool, one)


def run_shards(output: Path, shards: list[ShardPlan], metadata: dict[str, str], tensors: Mapping[str, TensorRef],
               journal: Journal, workers: int, on_bytes: Callable[[int], None]) -> list[WrittenShard]:
    """Write every shard the journal does not already hold; returns all shards in plan order."""
    done = {s.file_name: w for s in shards if (w := journal.still_valid(output, s.file_name))}
    for name in done:
        on_bytes(next(s.data_bytes for s in shards if s.file_name == name))
    todo = [s for s in shards if s.file_name not in done]
    if workers <= 1 or len(todo) <= 1:
        with TensorReader() as reader, torch_threads(1):
            producer, pool = Producer(reader), StagingPool() if todo else None
            for shard in todo:
                written = _write(output, shard, metadata, producer, pool, tensors, on_bytes)
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
