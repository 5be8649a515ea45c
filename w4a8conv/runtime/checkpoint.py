"""Read a converted checkpoint for one tensor/expert-parallel rank, by slicing only.

Kept apart from the converter: it depends on the format constants and on `safetensors`, never on
the source readers or transforms. Every rank's tensors come out of the TP/EP-agnostic layout by
slicing and concatenation, plus a sum over the rank's share of the 16 down_proj bias chunks.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..constants import (DESCRIPTION_NAME, DOWN_BIAS_CHUNKS, INDEX_NAME, INT4_PER_INT32, LAYOUT_NAME,
                         LAYOUT_VERSION, STAMP_KEY)
from ..errors import NotConvertedError, UnsupportedSplitError, UsageError
from ..layout import TensorSpec, linear_tensor_specs, moe_tensor_specs

__all__ = ["NpuReadyCheckpoint", "RankSplit"]


@dataclass(frozen=True)
class RankSplit:
    """Which part of an MoE layer a rank holds: experts by EP rank, intermediate columns by TP rank."""

    tp_size: int = 1
    tp_rank: int = 0
    ep_size: int = 1
    ep_rank: int = 0

    def check(self, prefix: str, experts: int, intermediate: int, group_size: int) -> None:
        """Raise `UnsupportedSplitError` naming the rule a split breaks."""
        def refuse(rule: str) -> UnsupportedSplitError:
            return UnsupportedSplitError(f"{prefix}: tp_size={self.tp_size}, ep_size={self.ep_size}: {rule}")

        for size, rank, kind in ((self.tp_size, self.tp_rank, "tp"), (self.ep_size, self.ep_rank, "ep")):
            if size < 1 or not 0 <= rank < size:
                raise refuse(f"{kind}_rank {rank} is not in [0, {kind}_size)")
        if DOWN_BIAS_CHUNKS % self.tp_size:
            raise refuse(f"MoE TP size must divide {DOWN_BIAS_CHUNKS} (the down_proj bias chunks)")
        if experts % self.ep_size:
            raise refuse(f"{experts} experts do not split evenly over {self.ep_size} EP ranks")
        if intermediate % self.tp_size:
            raise refuse(f"intermediate size {intermediate} does not split over {self.tp_size} TP ranks")
        part = intermediate // self.tp_size
        if part % INT4_PER_INT32:
            raise refuse(f"intermediate part {part} is not a multiple of {INT4_PER_INT32} packed int4 values")
        if group_size and part % group_size:
            raise refuse(f"intermediate part {part} is not a multiple of group_size {group_size}")


_MOE_RECORD = {"kind": str, "variant": str, "num_experts": int, "projections": list, "hidden": int,
               "intermediate": int, "group_size": int}
_LINEAR_RECORD = {"kind": str, "variant": str, "out_features": int, "in_features": int, "group_size": int,
                  "bias": str, "bias_columns": int}


def _plain_name(name: str) -> bool:
    """A file name inside the directory: no separators, no parent references."""
    return bool(name) and "/" not in name and "\\" not in name and name not in (".", "..") and "\0" not in name


def _stamp_problem(stamp: dict) -> str | None:
    """What is wrong with a stamp's records, or None (types only; shapes are checked per module)."""
    for key in ("modules", "shards", "source"):
        if not isinstance(stamp.get(key), dict):
            return f"stamp has no {key!r} record"
    for name, entry in stamp["shards"].items():
        if not _plain_name(name):
            return f"stamp names shard {name!r}, which is not a file name in this directory"
        if not (isinstance(entry, dict) and type(entry.get("bytes")) is int and isinstance(entry.get("sha256"), str)):
            return f"stamp's record of shard {name} needs integer bytes and a sha256 string"
    for prefix, record in stamp["modules"].items():
        if not isinstance(record, dict):
            return f"stamp's record of module {prefix} is not an object"
        fields = _MOE_RECORD if record.get("kind") == "moe" else _LINEAR_RECORD
        for field, kind in fields.items():
            if not isinstance(record.get(field), kind) or (kind is int and isinstance(record.get(field), bool)):
                return f"stamp's record of module {prefix} needs {field} ({kind.__name__})"
        if record["kind"] not in ("moe", "linear"):
            return f"stamp's record of module {prefix} has unknown kind {record['kind']!r}"
        if record["kind"] == "moe" and (len(record["projections"]) != 3
                                        or not all(isinstance(p, str) for p in record["projections"])):
            return f"stamp's record of module {prefix} needs three projection names"
    return None


class NpuReadyCheckpoint:
    """A converted directory, stamp checked on open. Tensors are read lazily per request."""

    def __init__(self, root: Path, description: dict, weight_map: dict[str, str]):
        self.root = root
        self.description = description
        self.stamp: dict = description[STAMP_KEY]
        self._weight_map = weight_map
        self._handles: dict[str, object] = {}

    @classmethod
    def open(cls, root: Path | str) -> "NpuReadyCheckpoint":
        """Refuse anything but a complete directory in a layout this version serves."""
        root = Path(root)
        description_file = root / DESCRIPTION_NAME
        try:
            description = json.loads(description_file.read_text())
        except FileNotFoundError:
            raise NotConvertedError(f"no {DESCRIPTION_NAME}: not a w4a8conv output, or an incomplete one",
                                    file=root) from None
        except (OSError, ValueError) as exc:
            raise NotConvertedError(f"unreadable ({exc})", file=description_file) from None
        stamp = description.get(STAMP_KEY) if isinstance(description, dict) else None
        if not isinstance(stamp, dict):
            raise NotConvertedError(f"no {STAMP_KEY!r} stamp: not converted by w4a8conv (run w4a8conv convert)",
                                    file=description_file)
        if stamp.get("layout") != LAYOUT_NAME:
            raise NotConvertedError(f"layout {stamp.get('layout')!r} is not {LAYOUT_NAME!r}", file=description_file)
        version = stamp.get("layout_version")
        if version != LAYOUT_VERSION:
            raise NotConvertedError(f"layout version {version!r}; this w4a8conv serves version {LAYOUT_VERSION} "
                                    "only (convert again, or upgrade w4a8conv)", file=description_file)
        problem = _stamp_problem(stamp)
        if problem:
            raise NotConvertedError(problem, file=description_file)
        try:
            weight_map = json.loads((root / INDEX_NAME).read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise NotConvertedError(f"index unreadable ({exc})", file=root / INDEX_NAME) from None
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and _plain_name(v) for k, v in weight_map.items()):
            raise NotConvertedError("weight_map is not a map of tensor names to shard file names in this directory",
                                    file=root / INDEX_NAME)
        missing = sorted(set(stamp["shards"]) - {p.name for p in root.glob("*.safetensors")})
        if missing or set(weight_map.values()) - set(stamp["shards"]):
            raise NotConvertedError(f"shards named by the stamp are missing: {missing}" if missing else
                                    "index names shards the stamp does not record", file=root)
        return cls(root, description, weight_map)

    @property
    def tensor_names(self) -> list[str]:
        return list(self._weight_map)

    @property
    def weight_map(self) -> dict[str, str]:
        """Tensor name -> shard file name, from the index."""
        return dict(self._weight_map)

    def type_of(self, name: str) -> str | None:
        return self.description.get(name)

    def _slice(self, name: str):
        file_name = self._weight_map.get(name)
        if file_name is None:
            raise NotConvertedError("tensor is not in the index", file=self.root / INDEX_NAME, tensor=name)
        handle = self._handles.get(file_name)
        if handle is None:
            try:
                handle = self._handles[file_name] = safe_open(str(self.root / file_name), framework="pt")
            except (SafetensorError, OSError) as exc:
                raise NotConvertedError(f"cannot open shard ({exc})", file=self.root / file_name) from None
        return handle.get_slice(name)

    def tensor(self, name: str) -> torch.Tensor:
        """One stored tensor, whole, in memory of its own (the shard's mapping is never handed out)."""
        return self._slice(name)[:].clone()

    def _module(self, prefix: str, kind: str) -> dict:
        record = self.stamp["modules"].get(prefix)
        if record is None or record.get("kind") != kind:
            known = sorted(p for p, m in self.stamp["modules"].items() if m.get("kind") == kind)
            raise UsageError(f"{prefix!r} is not a converted {kind} layer (known: {', '.join(known[:6]) or 'none'}"
                             f"{', ...' if len(known) > 6 else ''})")
        problem = self.module_problem(prefix)
        if problem:
            raise NotConvertedError(problem, file=self.root / DESCRIPTION_NAME, tensor=prefix)
        return record

    def expected_tensors(self, prefix: str) -> dict[str, TensorSpec]:
        """Tensor name -> (dtype, shape) the stamp's record of a module implies (docs/format.md)."""
        m = self.stamp["modules"][prefix]
        if m["kind"] == "moe":
            specs = moe_tensor_specs(prefix, m["projections"], m["num_experts"], m["hidden"], m["intermediate"],
                                     m["group_size"]).values()
        else:
            specs = linear_tensor_specs(prefix, m["out_features"], m["in_features"], m["group_size"], m["bias"],
                                        m["bias_columns"]).values()
        return dict(specs)

    def module_problem(self, prefix: str) -> str | None:
        """Why the stored tensors of a module disagree with its stamp record, or None."""
        try:
            expected = self.expected_tensors(prefix)
        except (ZeroDivisionError, ValueError, KeyError) as exc:
            return f"stamp record cannot describe stored tensors ({exc})"
        for name, (dtype, shape) in expected.items():
            if name not in self._weight_map:
                return f"{name} is missing"
            stored = self._slice(name)
            if stored.get_dtype() != dtype or tuple(stored.get_shape()) != shape:
                return (f"{name} is stored as {stored.get_dtype()} {list(stored.get_shape())}, its stamp record "
                        f"says {dtype} {list(shape)}")
        return None

    def moe_layer(self, prefix: str, tp_size: int = 1, tp_rank: int = 0, ep_size: int = 1,
                  ep_rank: int = 0) -> dict[str, torch.Tensor]:
        """One rank's MoE tensors, as vllm-ascend 0.11 holds them after `process_weights_after_loading`.

        w13_weight int32 [E/ep, H, 2·Ip/8], w2_weight int32 [E/ep, Ip, H/8], w13_weight_scale int64
        [E/ep, H/G or 1, 2·Ip], w2_weight_scale int64 [E/ep, Ip/G or 1, H], w13_scale_bias fp32
        [E/ep, 2·Ip], w2_scale_bias fp32 [E/ep, H] (this rank's partial sum); Ip = I/tp.
        """
        m = self._module(prefix, "moe")
        split = RankSplit(tp_size, tp_rank, ep_size, ep_rank)
        split.check(prefix, m["num_experts"], m["intermediate"], m["group_size"])
        per_ep = m["num_experts"] // ep_size
        experts = slice(ep_rank * per_ep, (ep_rank + 1) * per_ep)
        part = m["intermediate"] // tp_size
        columns = slice(tp_rank * part, (tp_rank + 1) * part)
        words = slice(columns.start // INT4_PER_INT32, columns.stop // INT4_PER_INT32)
        chunks_per_rank = DOWN_BIAS_CHUNKS // tp_size
        chunks = slice(tp_rank * chunks_per_rank, (tp_rank + 1) * chunks_per_rank)
        gate, up, down = (f"{prefix}.experts.{p}." for p in m["projections"])

        def gate_up(suffix: str, last: slice) -> torch.Tensor:
            """Concatenate the rank's gate and up columns: vLLM puts gate first in w13."""
            pieces = []
            for proj in (gate, up):
                stored = self._slice(proj + suffix)
                middle = (slice(None),) * (len(stored.get_shape()) - 2)
                pieces.append(stored[(experts, *middle, last)])
            return torch.cat(pieces, dim=-1).contiguous()

        down_scale = self._slice(down + "weight_scale")
        if m["group_size"]:
            group_rows = slice(columns.start // m["group_size"], columns.stop // m["group_size"])
            w2_scale = down_scale[experts, group_rows, :]
        else:
            w2_scale = down_scale[experts, :, :]
        down_bias = self._slice(down + "scale_bias")[experts, :, chunks]
        return {
            "w13_weight": gate_up("weight", words),
            "w2_weight": self._slice(down + "weight")[experts, columns, :].clone(),
            "w13_weight_scale": gate_up("weight_scale", columns),
            "w2_weight_scale": w2_scale.clone(),
            "w13_scale_bias": gate_up("scale_bias", columns),
            # vllm-ascend sums the rank's chunks the same way (update_bias).
            "w2_scale_bias": down_bias.transpose(1, 2).contiguous().sum(dim=1),
        }

    def linear(self, prefix: str) -> dict[str, torch.Tensor]:
        """A Linear layer's final tensors under vllm-ascend's names (tensor-parallel size 1):
        weight int32 [K, N/8], weight_scale_second fp32 [K/G, N], and weight_scale_bias ("0") or
        scale_bias ("1.0.0")."""
        self._module(prefix, "linear")
        head = prefix + "."
        return {name[len(head):]: self.tensor(name) for name in self._weight_map
                if name.startswith(head) and "." not in name[len(head):]}
