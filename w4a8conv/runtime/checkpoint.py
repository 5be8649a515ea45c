"""Read a converted checkpoint for one tensor/expert-parallel rank, by slicing only.

Kept apart from the converter: it depends on the format constants, the layout and the stamp
(`stamp.py`), never on the source readers or transforms. Every rank's tensors come out of the
TP/EP-agnostic layout by slicing and concatenation (`split.py`), plus a sum over the rank's share of the 16 down_proj bias chunks.

Shards are read with positional reads, not mapped: a mapped file that shrinks kills the process with
SIGBUS at the next access, while a short read is a `NotConvertedError` naming the file. Each shard's
size and header are checked against the stamp and the index before any tensor is read from it.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..constants import DESCRIPTION_NAME, INDEX_NAME
from ..dtypes import DTYPE_SIZES, TORCH_DTYPES, torch_shape_problem
from ..errors import NotConvertedError, UsageError
from ..layout import MOE_OUTPUTS, MOE_PARAMS, TensorSpec, expert_tensor_specs, linear_tensor_specs, moe_tensor_specs
from ..stamp import LinearRecord, MoeRecord, ShardRecord, Stamp, plain_file_name
from .split import RankSplit, expert_rank_part

__all__ = ["NpuReadyCheckpoint", "RankSplit", "StoredTensor", "check_shards"]

_MAX_HEADER_BYTES = 100 * 2**20


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor of a shard lies, from the shard's header."""

    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the shard file
    nbytes: int


def _pread_exact(fd: int, nbytes: int, offset: int, path: Path, what: str) -> bytearray:
    buf = bytearray(nbytes)
    view, done = memoryview(buf), 0
    while done < nbytes:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise NotConvertedError(f"the file ends at byte {offset + done}, inside {what}: it changed or was "
                                    "truncated after it was checked", file=path)
        done += got
    return buf


def _shard_header(fd: int, size: int, path: Path) -> dict[str, StoredTensor]:
    """The tensors a shard's header declares, which must tile its data region exactly, in order."""
    def refuse(rule: str, tensor: str | None = None) -> NotConvertedError:
        return NotConvertedError(f"shard header: {rule}", file=path, tensor=tensor)

    if size < 8:
        raise refuse(f"{size} bytes, shorter than the 8-byte header length")
    length = int.from_bytes(_pread_exact(fd, 8, 0, path, "the header length"), "little")
    if length > min(_MAX_HEADER_BYTES, size - 8):
        raise refuse(f"header length {length} does not fit the {size}-byte file")
    try:
        header = json.loads(_pread_exact(fd, length, 8, path, "the header"))
    except (ValueError, RecursionError) as exc:  # also integers past Python's int-string limit
        raise refuse(f"not valid JSON ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise refuse("not a JSON object")
    header.pop("__metadata__", None)
    tensors, data_start, position = {}, 8 + length, 0
    entries = []
    for name, entry in header.items():
        ok = (isinstance(entry, dict) and entry.get("dtype") in DTYPE_SIZES and isinstance(entry.get("shape"), list)
              and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2
              and all(type(o) is int for o in entry["data_offsets"]))
        if not ok:
            raise refuse(f"entry is not a dtype, a shape and two data offsets", name)
        problem = torch_shape_problem(entry["shape"])
        if problem:
            raise refuse(f"shape {entry['shape']} {problem}", name)
        entries.append((entry["data_offsets"], name, entry))
    for (begin, end), name, entry in sorted(entries, key=lambda e: (e[0][0], e[0][1])):
        nbytes = math.prod(entry["shape"]) * DTYPE_SIZES[entry["dtype"]]
        if begin != position or end - begin != nbytes:
            raise refuse(f"data_offsets {[begin, end]} do not follow the previous tensor at {position} "
                         f"with {nbytes} bytes", name)
        position = end
        tensors[name] = StoredTensor(entry["dtype"], tuple(entry["shape"]), data_start + begin, nbytes)
    if data_start + position != size:
        raise refuse(f"tensor data ends at byte {data_start + position} of {size}")
    return tensors


def _by_file(weight_map: dict[str, str]) -> dict[str, set[str]]:
    held: dict[str, set[str]] = {}
    for name, file_name in weight_map.items():
        held.setdefault(file_name, set()).add(name)
    return held


def _checked_shard(fd: int, path: Path, record: ShardRecord, weight_map: dict[str, str],
                   held: set[str]) -> dict[str, StoredTensor]:
    """A shard's tensors, after its size and header were checked against its stamp record and the index."""
    size = os.fstat(fd).st_size
    if size != record.bytes:
        raise NotConvertedError(f"{size} bytes, the stamp records {record.bytes}: the file changed since it "
                                "was converted", file=path)
    tensors = _shard_header(fd, size, path)
    for name in tensors:
        if weight_map.get(name) != path.name:
            where = f"indexed in {weight_map[name]}" if name in weight_map else "not indexed"
            raise NotConvertedError(f"stored here but {where}: the file was replaced or renamed, or the index "
                                    "edited, since it was converted", file=path, tensor=name)
    for name in sorted(held - set(tensors))[:1]:
        raise NotConvertedError("indexed in this file, which does not hold it: the file was replaced or renamed, or "
                                "the index edited, since it was converted", file=path, tensor=name)
    return tensors


def check_shards(root: Path | str, stamp: Stamp, weight_map: dict[str, str]) -> None:
    """Every shard the stamp records exists with the recorded size and a header that declares exactly
    the tensors the index maps to it; `NotConvertedError` naming the first file that does not.

    The runtime runs this on open, the vLLM plugin before vLLM maps the shards."""
    root = Path(root)
    for file_name in sorted(set(weight_map.values()) - set(stamp.shards))[:1]:
        raise NotConvertedError("the index maps tensors to this file, which the stamp does not record",
                                file=root / file_name)
    held = _by_file(weight_map)
    for file_name, record in stamp.shards.items():
        path = root / file_name
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise NotConvertedError(f"cannot open shard ({exc.strerror or exc})", file=path) from None
        try:
            _checked_shard(fd, path, record, weight_map, held.get(file_name, set()))
        finally:
            os.close(fd)


class NpuReadyCheckpoint:
    """A converted directory, stamp checked on open. Tensors are read lazily per request."""

    def __init__(self, root: Path, description: dict, stamp: Stamp, weight_map: dict[str, str]):
        self.root = root
        self.description = description
        self.stamp = stamp
        self._weight_map = weight_map
        self._held = _by_file(weight_map)
        self._shards: dict[str, tuple[int, dict[str, StoredTensor]]] = {}  # file name -> (fd, tensors)

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        """Close the shard files (reading again reopens and re-checks them)."""
        shards, self._shards = getattr(self, "_shards", {}), {}
        for fd, _tensors in shards.values():
            os.close(fd)

    @classmethod
    def open(cls, root: Path | str) -> "NpuReadyCheckpoint":
        """Refuse anything but a complete directory in a layout this version serves, whose shards have
        the sizes the stamp records and headers that hold what the index says."""
        root = Path(root)
        description_file = root / DESCRIPTION_NAME
        try:
            description = json.loads(description_file.read_text())
        except FileNotFoundError:
            raise NotConvertedError(f"no {DESCRIPTION_NAME}: not a w4a8conv output, or an incomplete one",
                                    file=root) from None
        except (OSError, ValueError, RecursionError) as exc:
            raise NotConvertedError(f"unreadable ({type(exc).__name__}: {exc})"[:300], file=description_file) from None
        stamp = Stamp.of_description(description, file=description_file)
        if not stamp.modules:  # the plugin refuses it layer by layer: no layer is recorded
            raise NotConvertedError("stamp records no converted module: there is nothing for the A8W4 kernels to "
                                    "serve (was the source an already converted directory, or one without "
                                    "W4A8_DYNAMIC modules?)", file=description_file)
        try:
            weight_map = json.loads((root / INDEX_NAME).read_text())["weight_map"]
        except (OSError, ValueError, RecursionError, KeyError, TypeError) as exc:
            raise NotConvertedError(f"index unreadable ({type(exc).__name__}: {exc})"[:300],
                                    file=root / INDEX_NAME) from None
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and plain_file_name(v) for k, v in weight_map.items()):
            raise NotConvertedError("weight_map is not a map of tensor names to shard file names in this directory",
                                    file=root / INDEX_NAME)
        missing = sorted(set(stamp.shards) - {p.name for p in root.glob("*.safetensors")})
        if missing or set(weight_map.values()) - set(stamp.shards):
            raise NotConvertedError(f"shards named by the stamp are missing: {missing}" if missing else
                                    "index names shards the stamp does not record", file=root)
        check_shards(root, stamp, weight_map)
        return cls(root, description, stamp, weight_map)

    @property
    def tensor_names(self) -> list[str]:
        return list(self._weight_map)

    @property
    def weight_map(self) -> dict[str, str]:
        """Tensor name -> shard file name, from the index."""
        return dict(self._weight_map)

    def type_of(self, name: str) -> str | None:
        return self.description.get(name)

    def _shard_of(self, name: str) -> tuple[int, Path, StoredTensor]:
        file_name = self._weight_map.get(name)
        if file_name is None:
            raise NotConvertedError("tensor is not in the index", file=self.root / INDEX_NAME, tensor=name)
        path = self.root / file_name
        if file_name not in self._shards:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as exc:
                raise NotConvertedError(f"cannot open shard ({exc.strerror or exc})", file=path) from None
            try:
                self._shards[file_name] = fd, _checked_shard(fd, path, self.stamp.shards[file_name],
                                                             self._weight_map, self._held[file_name])
            except BaseException:
                os.close(fd)
                raise
        fd, tensors = self._shards[file_name]
        return fd, path, tensors[name]

    def stored(self, name: str) -> StoredTensor:
        """Dtype, shape and place of a stored tensor, from its shard's checked header."""
        return self._shard_of(name)[2]

    def tensor(self, name: str) -> torch.Tensor:
        """One stored tensor, whole, in memory of its own, read from the file (never a mapping of it)."""
        fd, path, stored = self._shard_of(name)
        dtype = TORCH_DTYPES[stored.dtype]
        if stored.nbytes == 0:
            return torch.empty(stored.shape, dtype=dtype)
        data = _pread_exact(fd, stored.nbytes, stored.offset, path, name)
        return torch.frombuffer(data, dtype=dtype).reshape(stored.shape)

    def _module(self, prefix: str, kind: type[MoeRecord] | type[LinearRecord]) -> MoeRecord | LinearRecord:
        record = self.stamp.modules.get(prefix)
        if not isinstance(record, kind):
            known = sorted(self.stamp.records(kind))
            raise UsageError(f"{prefix!r} is not a converted {kind.kind} layer (known: {', '.join(known[:6]) or 'none'}"
                             f"{', ...' if len(known) > 6 else ''})")
        problem = self.module_problem(prefix)
        if problem:
            raise NotConvertedError(problem, file=self.root / DESCRIPTION_NAME, tensor=prefix)
        return record

    def expected_tensors(self, prefix: str) -> dict[str, TensorSpec]:
        """Tensor name -> (dtype, shape) the stamp's record of a module implies (docs/format.md)."""
        m = self.stamp.modules[prefix]
        if isinstance(m, MoeRecord):
            specs = moe_tensor_specs(prefix, m.projections, m.num_experts, m.hidden, m.intermediate,
                                     m.group_size).values()
        else:
            specs = linear_tensor_specs(prefix, m.out_features, m.in_features, m.group_size, m.bias,
                                        m.bias_columns).values()
        return dict(specs)

    def module_problem(self, prefix: str) -> str | None:
        """Why the stored tensors of a module disagree with its stamp record, or None."""
        for name, (dtype, shape) in self.expected_tensors(prefix).items():
            if name not in self._weight_map:
                return f"{name} is missing"
            stored = self.stored(name)
            if stored.dtype != dtype or stored.shape != shape:
                return (f"{name} is stored as {stored.dtype} {list(stored.shape)}, its stamp record "
                        f"says {dtype} {list(shape)}")
        return None

    def moe_layer(self, prefix: str, tp_size: int = 1, tp_rank: int = 0, ep_size: int = 1,
                  ep_rank: int = 0) -> dict[str, torch.Tensor]:
        """One rank's MoE tensors, as vllm-ascend 0.11 holds them after `process_weights_after_loading`:
        `layout.moe_param_specs(E/ep, H, I/tp, G)` (w13_weight int32 [E/ep, H, 2·Ip/8], ...; w2_scale_bias
        is this rank's partial sum of the down_proj bias chunks)."""
        m = self._module(prefix, MoeRecord)
        split = RankSplit(tp_size, tp_rank, ep_size, ep_rank)
        split.check(prefix, m.num_experts, m.intermediate, m.group_size)
        gate, up, down = m.projections

        def rank_part(expert: int, proj: str, output: str) -> torch.Tensor:
            name, _spec = expert_tensor_specs(prefix, expert, proj, proj == down, m.hidden, m.intermediate,
                                              m.group_size)[output]
            return expert_rank_part(output, proj == down, self.tensor(name), intermediate=m.intermediate,
                                    group_size=m.group_size, tp_size=tp_size, tp_rank=tp_rank)

        experts = split.experts(m.num_experts)
        parts = {(output, down_proj): [torch.cat([rank_part(e, gate, output), rank_part(e, up, output)], dim=-1)
                                       if not down_proj else rank_part(e, down, output) for e in experts]
                 for output in MOE_OUTPUTS for down_proj in (False, True)}
        # vLLM's w13 holds gate's columns, then up's; w2 the down projection's.
        return {name: torch.stack(parts[param.output, param.down]) for name, param in MOE_PARAMS.items()}

    def linear(self, prefix: str) -> dict[str, torch.Tensor]:
        """A Linear layer's final tensors under vllm-ascend's names (tensor-parallel size 1):
        weight int32 [K, N/8], weight_scale_second fp32 [K/G, N], and weight_scale_bias ("0") or
        scale_bias ("1.0.0")."""
        self._module(prefix, LinearRecord)
        head = prefix + "."
        return {name[len(head):]: self.tensor(name) for name in self._weight_map
                if name.startswith(head) and "." not in name[len(head):]}
