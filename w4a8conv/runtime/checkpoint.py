"""Read a converted checkpoint for one tensor/expert-parallel rank, by slicing only.

Kept apart from the converter: it depends on the format constants and on `safetensors`, never on
the source readers or transforms. Every rank's tensors come out of the TP/EP-agnostic layout by
slicing and concatenation (`split.py`), plus a sum over the rank's share of the 16 down_proj bias chunks.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..constants import DESCRIPTION_NAME, INDEX_NAME, LAYOUT_NAME, LAYOUT_VERSION, STAMP_KEY
from ..errors import NotConvertedError, UsageError
from ..layout import TensorSpec, expert_tensor_specs, linear_tensor_specs, moe_tensor_specs
from .split import RankSplit, expert_rank_part

__all__ = ["NpuReadyCheckpoint", "RankSplit", "checked_stamp", "stamp_problem"]


_MOE_RECORD = {"kind": str, "variant": str, "num_experts": int, "projections": list, "hidden": int,
               "intermediate": int, "group_size": int}
_LINEAR_RECORD = {"kind": str, "variant": str, "out_features": int, "in_features": int, "group_size": int,
                  "bias": str, "bias_columns": int}


def _plain_name(name: str) -> bool:
    """A file name inside the directory: no separators, no parent references."""
    return bool(name) and "/" not in name and "\\" not in name and name not in (".", "..") and "\0" not in name


def stamp_problem(stamp: dict) -> str | None:
    """What is wrong with a stamp's records, or None (types only; shapes are checked per module)."""
    for key in ("modules", "shards", "source"):
        if not isinstance(stamp.get(key), dict):
            return f"stamp has no {key!r} record"
    lines = stamp.get("serving_releases", [])
    if not (isinstance(lines, list) and all(isinstance(line, str) for line in lines)):
        return "stamp's serving_releases is not a list of vllm-ascend release lines"
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


def checked_stamp(description: object, where: Path | str) -> dict:
    """The stamp of a converted description, or `NotConvertedError` naming `where` and the rule broken."""
    stamp = description.get(STAMP_KEY) if isinstance(description, dict) else None
    if not isinstance(stamp, dict):
        raise NotConvertedError(f"no {STAMP_KEY!r} stamp: not converted by w4a8conv (run w4a8conv convert)",
                                file=where)
    if stamp.get("layout") != LAYOUT_NAME:
        raise NotConvertedError(f"layout {stamp.get('layout')!r} is not {LAYOUT_NAME!r}", file=where)
    version = stamp.get("layout_version")
    if version != LAYOUT_VERSION:
        raise NotConvertedError(f"layout version {version!r}; this w4a8conv serves version {LAYOUT_VERSION} "
                                "only (convert again, or upgrade w4a8conv)", file=where)
    problem = stamp_problem(stamp)
    if problem:
        raise NotConvertedError(problem, file=where)
    return stamp


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
        stamp = checked_stamp(description, description_file)
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
        gate, up, down = m["projections"]

        def rank_part(expert: int, proj: str, output: str) -> torch.Tensor:
            name, _spec = expert_tensor_specs(prefix, expert, proj, proj == down, m["hidden"], m["intermediate"],
                                              m["group_size"])[output]
            return expert_rank_part(output, proj == down, self._slice(name)[:], intermediate=m["intermediate"],
                                    group_size=m["group_size"], tp_size=tp_size, tp_rank=tp_rank)

        experts = split.experts(m["num_experts"])
        tensors = {}
        for output in ("weight", "weight_scale", "scale_bias"):
            # vLLM's w13 holds gate's columns, then up's.
            tensors[f"w13_{output}"] = torch.stack([torch.cat([rank_part(e, gate, output), rank_part(e, up, output)],
                                                              dim=-1) for e in experts])
            tensors[f"w2_{output}"] = torch.stack([rank_part(e, down, output) for e in experts])
        return {key: tensors[key] for key in ("w13_weight", "w2_weight", "w13_weight_scale", "w2_weight_scale",
                                              "w13_scale_bias", "w2_scale_bias")}

    def linear(self, prefix: str) -> dict[str, torch.Tensor]:
        """A Linear layer's final tensors under vllm-ascend's names (tensor-parallel size 1):
        weight int32 [K, N/8], weight_scale_second fp32 [K/G, N], and weight_scale_bias ("0") or
        scale_bias ("1.0.0")."""
        self._module(prefix, "linear")
        head = prefix + "."
        return {name[len(head):]: self.tensor(name) for name in self._weight_map
                if name.startswith(head) and "." not in name[len(head):]}
