"""Streaming safetensors shards: header first (every shape is known from the plan), then each
tensor's bytes as they are produced into the staging buffers, hashed and written on the staging
thread (`staging.py`). A shard is written under a temporary name,
fsynced and renamed (`files.py`); `route.py` writes the index and the stamped description after every shard.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .constants import SHARD_NAME
from .errors import WriteError
from .files import discard, fsync_dir, partial_name
from .journal import WrittenShard
from .plan import OutputTensor
from .staging import StagedFile, StagingPool

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


def write_shard(directory: Path, shard: ShardPlan, metadata: dict[str, str], pool: StagingPool,
                produce: Callable[[OutputTensor, StagedFile], None]) -> WrittenShard:
    """Write one shard crash-safely through `pool`'s staging buffers: the header, then each tensor as
    `produce(tensor, staged)` puts its bytes into `staged`; returns the shard's size and sha256. On
    failure (the producer's, or the writing thread's, raised again here) no shard file remains."""
    final, temp = directory / shard.file_name, directory / partial_name(shard.file_name)
    staged = None
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            staged = StagedFile(pool, fd)
            head = shard_header(shard.tensors, metadata)
            staged.write(head)
            total = len(head)
            for tensor in shard.tensors:
                before = staged.staged_bytes
                produce(tensor, staged)
                written = staged.staged_bytes - before
                if written != tensor.nbytes:
                    raise AssertionError(f"{tensor.name}: produced {written} bytes, the plan says {tensor.nbytes}")
                total += written
            sha256 = staged.finish()
            staged = None
            os.fsync(fd)
        finally:
            if staged is not None:
                staged.abort()
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
