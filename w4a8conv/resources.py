"""What a conversion will cost, known before it starts: bytes to read and write, shards, an estimate
of each worker's peak memory, and the disk it needs against the disk it has."""
from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .plan import CopyBytes, ExpertTensor, OutputTensor, Plan, TranslatedTensor
from .produce import COPY_CHUNK_BYTES, source_names
from .writer import ShardPlan

__all__ = ["ResourcePlan", "estimate_resources", "free_disk_bytes", "usable_cpus", "BASELINE_RSS_BYTES"]

# RSS of a worker before it converts anything (python + torch + safetensors), measured on x86_64.
BASELINE_RSS_BYTES = 350 * 2**20
# Float temporaries per weight element while computing a bias (fp32 values, product, reshape copy).
_BIAS_BYTES_PER_ELEMENT = 12
# int8 transposes and the packed copy per weight element while packing.
_PACK_BYTES_PER_ELEMENT = 3


@dataclass(frozen=True)
class ResourcePlan:
    shards: list[dict]
    read_bytes: int
    write_bytes: int
    peak_worker_bytes: int
    workers: int  # worker processes used: the request capped at the shards and the usable CPUs
    workers_requested: int
    disk_free_bytes: int | None

    @property
    def peak_total_bytes(self) -> int:
        return self.peak_worker_bytes * self.workers

    def summary(self) -> dict:
        return {"shards": self.shards, "read_bytes": self.read_bytes, "write_bytes": self.write_bytes,
                "peak_worker_bytes": self.peak_worker_bytes, "workers": self.workers,
                "workers_requested": self.workers_requested,
                "peak_total_bytes": self.peak_total_bytes, "disk_free_bytes": self.disk_free_bytes}


def _working_set(plan: Plan, tensor: OutputTensor) -> int:
    """Bytes one output tensor needs in memory at once (one expert, or one copy chunk)."""
    recipe = tensor.recipe
    if isinstance(recipe, CopyBytes):
        return min(COPY_CHUNK_BYTES, tensor.nbytes)
    names = source_names(tensor)
    if isinstance(recipe, TranslatedTensor):  # a scale-sized tensor and its source
        return tensor.nbytes + sum(plan.source.tensors[n].nbytes for n in names)
    if isinstance(recipe, ExpertTensor):
        out, inp = recipe.layer.dims(recipe.proj)
    else:
        out, inp = recipe.module.out_features, recipe.module.in_features
    loaded = sum(plan.source.tensors[n].nbytes for n in names)
    piece = tensor.nbytes
    reads_weight = any(n.endswith(".weight") for n in names)
    per_element = (_BIAS_BYTES_PER_ELEMENT if recipe.output.endswith("bias") else _PACK_BYTES_PER_ELEMENT)
    return loaded + piece + (per_element * out * inp if reads_weight else 2 * loaded)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, as a container or taskset sets it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def free_disk_bytes(path: Path) -> int | None:
    """Free bytes on the file system that holds `path` (or its nearest existing parent)."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def estimate_resources(plan: Plan, shards: list[ShardPlan], output: Path, workers: int) -> ResourcePlan:
    tensors = [t for s in shards for t in s.tensors]
    peak = BASELINE_RSS_BYTES + max((_working_set(plan, t) for t in tensors), default=0)
    return ResourcePlan(
        shards=[{"file": s.file_name, "tensors": len(s.tensors), "bytes": s.data_bytes} for s in shards],
        read_bytes=sum(r.nbytes for r in plan.source.tensors.values()),
        write_bytes=sum(s.data_bytes for s in shards),
        peak_worker_bytes=int(math.ceil(peak)),
        workers=max(1, min(workers, len(shards), usable_cpus())),
        workers_requested=workers,
        disk_free_bytes=free_disk_bytes(output),
    )
