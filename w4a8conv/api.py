"""The verbs the CLI, CI scripts and the runtime share: `convert` and `inspect`."""
from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .constants import (CONVERTED_TYPE, DESCRIPTION_NAME, INDEX_NAME, LAYOUT_NAME, LAYOUT_VERSION, STAMP_KEY,
                        TARGET_VLLM_ASCEND, Variant)
from .errors import OutputLocationError
from .plan import CopyBytes, LinearModule, MoeLayer, Plan, make_plan
from .produce import check_small_tensors, produce
from .source import TensorReader, open_source
from .source.checkpoint import read_json
from .writer import WrittenShard, assign_shards, copy_file_atomic, write_json_atomic, write_shard

__all__ = ["ConvertOptions", "ConvertReport", "convert", "inspect", "build_stamp", "DEFAULT_MAX_SHARD_BYTES"]

DEFAULT_MAX_SHARD_BYTES = 4 * 10**9

_NOTES = {
    Variant.MOE_CHANNEL_V0: "per-channel version \"0\" experts carry no scale_bias and vllm-ascend 0.11 "
                            "serves them without the MSD bias; w4a8conv computes it (8·Σ W·s)",
}


@dataclass(frozen=True)
class ConvertOptions:
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    model_dtype: str | None = None  # overrides config.json's torch_dtype


@dataclass
class ConvertReport:
    output: Path
    shards: list[WrittenShard]
    tensors_written: int
    modules_converted: int
    tensors_passed_through: int
    source_bytes: int
    output_bytes: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "output": str(self.output), "shards": len(self.shards), "tensors": self.tensors_written,
            "modules_converted": self.modules_converted, "tensors_passed_through": self.tensors_passed_through,
            "source_bytes": self.source_bytes, "output_bytes": self.output_bytes,
            "seconds": round(self.seconds, 3), "notes": self.notes,
        }


def _module_record(module: MoeLayer | LinearModule) -> dict:
    if isinstance(module, MoeLayer):
        return {"kind": "moe", "variant": module.variant.value, "num_experts": module.num_experts,
                "projections": list(module.projections), "hidden": module.hidden,
                "intermediate": module.intermediate, "group_size": module.group_size}
    return {"kind": "linear", "variant": module.variant.value, "out_features": module.out_features,
            "in_features": module.in_features, "group_size": module.group_size}


def build_stamp(plan: Plan, shards: list[WrittenShard]) -> dict:
    """The record the runtime checks before serving: layout, source variant, modules, shard hashes."""
    source = plan.source
    return {
        "layout": LAYOUT_NAME,
        "layout_version": LAYOUT_VERSION,
        "vllm_ascend": TARGET_VLLM_ASCEND,
        "tool_version": __version__,
        "source": {
            "version": source.version.value,
            "group_size": source.group_size,
            "model_dtype": str(source.model_dtype).removeprefix("torch.") if source.model_dtype else None,
            "fingerprint": source.fingerprint(),
        },
        "modules": {m.prefix: _module_record(m) for m in (*plan.moe_layers, *plan.linears)},
        "shards": {s.file_name: {"bytes": s.nbytes, "sha256": s.sha256} for s in shards},
    }


def _check_output_location(source_root: Path, output: Path) -> None:
    src, dst = os.path.realpath(source_root), os.path.realpath(output)
    if dst == src or os.path.commonpath([src, dst]) == src:
        raise OutputLocationError(f"{output}: the output directory must not be the source directory or inside it")
    if os.path.commonpath([src, dst]) == dst:
        raise OutputLocationError(f"{output}: the output directory must not contain the source directory")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise OutputLocationError(f"{output}: exists and is not an empty directory")


def convert(source: Path | str, output: Path | str, *, options: ConvertOptions | None = None) -> ConvertReport:
    """Convert an msModelSlim W4A8_DYNAMIC checkpoint into NPU-ready shards.

    The whole source is validated (structure from headers, scales and offsets from data) before the
    first byte is written; version "0" weights are range-checked as they are packed. The stamped
    description is written last, so a directory without it is visibly incomplete.

    Example:
        >>> convert("qwen3-w4a8", "qwen3-npu").tensors_written  # doctest: +SKIP
    """
    options = options or ConvertOptions()
    started = time.monotonic()
    source_root, output = Path(source), Path(output)
    src = open_source(source_root, model_dtype=options.model_dtype)
    _check_output_location(source_root, output)
    plan = make_plan(src)
    shards = assign_shards(plan.tensors, options.max_shard_bytes)
    with TensorReader() as reader:
        check_small_tensors(plan, reader)
        try:
            output.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputLocationError(f"{output}: cannot create: {exc.strerror or exc}") from None
        metadata = {"format": "pt", STAMP_KEY: f"{LAYOUT_NAME}/{LAYOUT_VERSION}"}
        written = [write_shard(output, shard, metadata, lambda t: produce(t, reader, src.tensors))
                   for shard in shards]
    for extra in src.non_weight_files():
        copy_file_atomic(extra, output / extra.name)
    weight_map = {t.name: shard.file_name for shard in shards for t in shard.tensors}
    write_json_atomic(output / INDEX_NAME, {"metadata": {"total_size": sum(s.data_bytes for s in shards)},
                                            "weight_map": weight_map})
    description = plan.output_description()
    description[STAMP_KEY] = build_stamp(plan, written)
    write_json_atomic(output / DESCRIPTION_NAME, description)
    variants = Counter(m.variant for m in (*plan.moe_layers, *plan.linears))
    return ConvertReport(
        output=output, shards=written, tensors_written=len(plan.tensors),
        modules_converted=len(plan.moe_layers) + len(plan.linears),
        tensors_passed_through=len(plan.passthrough),
        source_bytes=sum(r.nbytes for r in src.tensors.values()),
        output_bytes=sum(s.nbytes for s in written), seconds=time.monotonic() - started,
        notes=[_NOTES[v] for v in variants if v in _NOTES])


def _is_converted(path: Path) -> bool:
    description = path / DESCRIPTION_NAME
    if not description.is_file():
        return False
    _raw, parsed = read_json(description)
    return isinstance(parsed, dict) and STAMP_KEY in parsed


def _inspect_source(path: Path, model_dtype: str | None) -> dict:
    src = open_source(path, model_dtype=model_dtype)
    plan = make_plan(src)
    consumed_bytes = sum(src.tensors[n].nbytes for n in plan.consumed)
    variants = Counter(m.variant.value for m in (*plan.moe_layers, *plan.linears))
    return {
        "kind": "source",
        "path": str(path),
        "description": src.description_file.name,
        "index": src.index_file.name if src.index_file else None,
        "files": len(src.headers),
        "version": src.version.value,
        "group_size": src.group_size,
        "group_size_given": src.group_size_given,
        "model_dtype": str(src.model_dtype).removeprefix("torch.") if src.model_dtype else None,
        "variants": dict(variants),
        "moe_layers": [{"prefix": m.prefix, "variant": m.variant.value, "experts": m.num_experts,
                        "hidden": m.hidden, "intermediate": m.intermediate} for m in plan.moe_layers],
        "linear_layers": [{"prefix": m.prefix, "variant": m.variant.value, "out": m.out_features,
                           "in": m.in_features} for m in plan.linears],
        "tensors": len(src.tensors),
        "tensors_converted": len(plan.consumed),
        "tensors_passed_through": len(plan.passthrough),
        "passthrough_types": dict(Counter(src.type_of(t.name) for t in plan.passthrough)),
        "source_bytes": sum(r.nbytes for r in src.tensors.values()),
        "converted_source_bytes": consumed_bytes,
        "converted_output_bytes": sum(t.nbytes for t in plan.tensors if not isinstance(t.recipe, CopyBytes)),
        "output_bytes": sum(t.nbytes for t in plan.tensors),
        "notes": [_NOTES[Variant(v)] for v in variants if Variant(v) in _NOTES],
    }


def _inspect_converted(path: Path) -> dict:
    from .runtime import NpuReadyCheckpoint

    ckpt = NpuReadyCheckpoint.open(path)
    stamp = ckpt.stamp
    modules = stamp["modules"]
    variants = Counter(m["variant"] for m in modules.values())
    return {
        "kind": "converted",
        "path": str(path),
        "layout": f"{stamp['layout']}/{stamp['layout_version']}",
        "tool_version": stamp["tool_version"],
        "vllm_ascend": stamp["vllm_ascend"],
        "source": stamp["source"],
        "variants": dict(variants),
        "moe_layers": [{"prefix": p, "variant": m["variant"], "experts": m["num_experts"], "hidden": m["hidden"],
                        "intermediate": m["intermediate"]} for p, m in modules.items() if m["kind"] == "moe"],
        "linear_layers": [{"prefix": p, "variant": m["variant"], "out": m["out_features"], "in": m["in_features"]}
                          for p, m in modules.items() if m["kind"] == "linear"],
        "files": len(stamp["shards"]),
        "tensors": len(ckpt.tensor_names),
        "tensors_converted": sum(1 for n in ckpt.tensor_names if ckpt.type_of(n) == CONVERTED_TYPE),
        "output_bytes": sum(s["bytes"] for s in stamp["shards"].values()),
        "notes": [_NOTES[Variant(v)] for v in variants if Variant(v) in _NOTES],
    }


def inspect(path: Path | str, *, model_dtype: str | None = None) -> dict:
    """Describe a source checkpoint (after validating its structure) or a converted directory."""
    path = Path(path)
    return _inspect_converted(path) if _is_converted(path) else _inspect_source(path, model_dtype)
