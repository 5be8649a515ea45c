"""What a conversion will cost, known before it starts: bytes to read and write, shards, an estimate
of each worker's peak memory, and the disk it needs against the disk it has."""
from __future__ import annotations

import math
import os
import resource
import shutil
from dataclasses import dataclass
from pathlib import Path

from .plan import Plan
from .produce import memory_bytes
from .staging import BUFFER_BYTES, BUFFERS
from .writer import ShardPlan

__all__ = ["ResourcePlan", "estimate_resources", "free_disk_bytes", "peak_rss_bytes", "usable_cpus", "default_workers",
           "DEFAULT_WORKERS_RULE",
           "BASELINE_RSS_BYTES"]

# RSS of a worker before it converts anything (python + torch + safetensors), measured on x86_64.
BASELINE_RSS_BYTES = 350 * 2**20


@dataclass(frozen=True)
class ResourcePlan:
    shards: list[dict]
    read_bytes: int
    write_bytes: int
    peak_worker_bytes: int
    workers: int  # worker processes used: the request (or the default) capped at the shards and the usable CPUs
    workers_requested: int | None  # None: the default, `default_workers()`
    disk_free_bytes: int | None  # measured by the caller where the output goes (None: not measured)

    @property
    def peak_total_bytes(self) -> int:
        return self.peak_worker_bytes * self.workers

    def summary(self) -> dict:
        return {"shards": self.shards, "read_bytes": self.read_bytes, "write_bytes": self.write_bytes,
                "peak_worker_bytes": self.peak_worker_bytes, "workers": self.workers,
                "workers_requested": self.workers_requested,
                "workers_choice": "requested" if self.workers_requested is not None else DEFAULT_WORKERS_RULE,
                "peak_total_bytes": self.peak_total_bytes, "disk_free_bytes": self.disk_free_bytes}


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, as a container or taskset sets it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


DEFAULT_WORKERS_RULE = "default: one per two usable CPUs, one per shard at most"


def default_workers() -> int:
    """One worker per two usable CPUs: a worker keeps two CPUs busy (the transforms, and the hashing and
    writing threads of staging.py), so two workers on two CPUs only contend (measured, docs/benchmarks.md)."""
    return max(1, usable_cpus() // 2)


def free_disk_bytes(path: Path) -> int | None:
    """Free bytes on the file system that holds `path` (or its nearest existing parent)."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def estimate_resources(plan: Plan, shards: list[ShardPlan], workers: int | None, *,
                       disk_free_bytes: int | None = None) -> ResourcePlan:
    """The plan's cost; `workers` None takes `default_workers()`; `disk_free_bytes` is whatever the
    caller measured where the output goes (once)."""
    tensors = [t for s in shards for t in s.tensors]
    peak = (BASELINE_RSS_BYTES + BUFFERS * BUFFER_BYTES
            + max((memory_bytes(t, plan.source.tensors) for t in tensors), default=0))
    return ResourcePlan(
        shards=[{"file": s.file_name, "tensors": len(s.tensors), "bytes": s.data_bytes} for s in shards],
        read_bytes=sum(r.nbytes for r in plan.source.tensors.values()),
        write_bytes=sum(s.data_bytes for s in shards),
        peak_worker_bytes=int(math.ceil(peak)),
        workers=max(1, min(default_workers() if workers is None else workers, len(shards), usable_cpus())),
        workers_requested=workers,
        disk_free_bytes=disk_free_bytes,
    )


def peak_rss_bytes() -> int:
    """Largest resident set of this process or any finished worker.

    For this process VmHWM is read, because Linux carries ru_maxrss over an exec from the parent
    (a launcher's size would show up as ours); workers start small, so their ru_maxrss is theirs.
    """
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    try:
        status = Path("/proc/self/status").read_text()
        own = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024
    except (OSError, StopIteration, ValueError):
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return max(own, children)
