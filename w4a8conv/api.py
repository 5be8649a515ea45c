"""The verbs the CLI, CI scripts and the runtime share: `convert` and `inspect`."""
from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from .constants import CONVERTED_TYPE, DESCRIPTION_NAME, MAX_OPTION_VALUE, STAMP_KEY, Variant
from .errors import UsageError
from .journal import Journal, WrittenShard
from .output import human_bytes
from .plan import CopyBytes, LinearModule, MoeLayer, Plan, make_plan
from .produce import check_small_tensors
from .resources import ResourcePlan, estimate_resources, free_disk_bytes, peak_rss_bytes, usable_cpus
from .route import OutputRoute
from .runtime.vllm_ascend import serving_release_lines
from .source import TensorReader, open_source
from .source.checkpoint import DEFAULT_GROUP_SIZE, GroupSizeFrom, SourceCheckpoint, read_json
from .stamp import LinearRecord, ModuleRecord, MoeRecord, ShardRecord, SourceRecord, Stamp
from .transforms import LINEAR_SPECS, kernels
from .version import __version__
from .writer import assign_shards

__all__ = ["ConvertOptions", "ConvertReport", "convert", "inspect", "build_stamp", "DEFAULT_MAX_SHARD_BYTES"]

DEFAULT_MAX_SHARD_BYTES = 4 * 10**9

_WARNINGS = {
    Variant.MOE_CHANNEL_V0: "per-channel version \"0\" experts carry no scale_bias and vllm-ascend 0.11 "
                            "serves them without the MSD bias; w4a8conv computes it (8·Σ W·s)",
}


@dataclass(frozen=True)
class ConvertOptions:
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    model_dtype: str | None = None  # overrides config.json's torch_dtype
    group_size: int | None = None   # states the group size of a description that has none
    workers: int | None = None  # None: one per two usable CPUs (`resources.default_workers`)
    resume: bool = False  # finish an interrupted conversion into the same directory
    force: bool = False   # replace a previous w4a8conv output in the directory
    dry_run: bool = False  # validate and plan; write nothing


@dataclass
class ConvertReport:
    output: Path
    resources: ResourcePlan
    shards: list[WrittenShard]
    tensors_written: int
    modules_converted: int
    tensors_passed_through: int
    source_bytes: int
    output_bytes: int
    seconds: float
    peak_rss_bytes: int
    dry_run: bool = False
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "output": str(self.output), "dry_run": self.dry_run, "shards": len(self.resources.shards),
            "tensors": self.tensors_written, "modules_converted": self.modules_converted,
            "tensors_passed_through": self.tensors_passed_through, "source_bytes": self.source_bytes,
            "output_bytes": self.output_bytes, "seconds": round(self.seconds, 3),
            "peak_rss_bytes": self.peak_rss_bytes, "workers": self.resources.workers,
            "workers_requested": self.resources.workers_requested,
            "workers_choice": self.resources.summary()["workers_choice"], "usable_cpus": usable_cpus(),
            "kernels": kernels.NAME, "plan": self.resources.summary(), "warnings": self.warnings,
        }


def _source_warnings(source: SourceCheckpoint) -> list[str]:
    if source.group_size_from is GroupSizeFrom.SHAPES:
        return [f"{source.description_file.name} has no group_size: group size {source.group_size} inferred from "
                f"the weight_scale_second shapes (vllm-ascend would have used {DEFAULT_GROUP_SIZE})"]
    return []


def _module_record(module: MoeLayer | LinearModule) -> ModuleRecord:
    if isinstance(module, MoeLayer):
        return MoeRecord(variant=module.variant, num_experts=module.num_experts, projections=module.projections,
                         hidden=module.hidden, intermediate=module.intermediate, group_size=module.group_size)
    return LinearRecord(variant=module.variant, out_features=module.out_features, in_features=module.in_features,
                        group_size=module.group_size, bias=LINEAR_SPECS[module.variant].bias_name,
                        bias_columns=module.bias_columns)


def build_stamp(plan: Plan, shards: list[WrittenShard], source_fingerprint: str) -> Stamp:
    """The record the runtime checks before serving: layout, source variant, modules, shard hashes."""
    source = plan.source
    return Stamp(
        # vllm-ascend lines the plugin of this w4a8conv serves this model on
        serving_releases=tuple(serving_release_lines(source.model_type)),
        tool_version=__version__,
        source=SourceRecord(
            producer=source.producer, version=source.version, group_size=source.group_size,
            group_size_from=source.group_size_from,
            model_dtype=str(source.model_dtype).removeprefix("torch.") if source.model_dtype else None,
            fingerprint=source_fingerprint),
        modules={m.prefix: _module_record(m) for m in (*plan.moe_layers, *plan.linears)},
        shards={s.file_name: ShardRecord(bytes=s.nbytes, sha256=s.sha256) for s in shards},
    )


def _check_options(options: ConvertOptions) -> None:
    for name, value in (("max_shard_bytes", options.max_shard_bytes), ("workers", options.workers)):
        if value is None and name == "workers":
            continue
        if type(value) is not int or not 1 <= value <= MAX_OPTION_VALUE:
            raise UsageError(f"{name} {value!r} is not an integer from 1 to {MAX_OPTION_VALUE}")


def _warnings(plan: Plan) -> list[str]:
    variants = Counter(m.variant for m in (*plan.moe_layers, *plan.linears))
    return _source_warnings(plan.source) + [_WARNINGS[v] for v in variants if v in _WARNINGS]


def _writing_phase(route: OutputRoute, workers: int, journal: Journal) -> str:
    before = f" ({len(journal.done):,} finished before: re-hashed and kept)" if journal.done else ""
    return (f"writing {len(route.shards):,} shard(s), {human_bytes(route.write_bytes)}, with {workers} "
            f"worker(s){before}")


def _report(route: OutputRoute, resources: ResourcePlan, disk_free_bytes: int | None, written: list[WrittenShard],
            started: float, warnings: list[str], *, dry_run: bool = False) -> ConvertReport:
    plan = route.plan
    return ConvertReport(
        output=route.output, resources=replace(resources, disk_free_bytes=disk_free_bytes), shards=written,
        tensors_written=len(plan.tensors), modules_converted=len(plan.moe_layers) + len(plan.linears),
        tensors_passed_through=len(plan.passthrough), source_bytes=resources.read_bytes,
        output_bytes=sum(s.nbytes for s in written) if written else resources.write_bytes,
        seconds=time.monotonic() - started, peak_rss_bytes=peak_rss_bytes(), dry_run=dry_run, warnings=warnings)


def convert(source: Path | str, output: Path | str, *, options: ConvertOptions | None = None,
            on_progress: Callable[[int, int], None] | None = None,
            on_phase: Callable[[str], None] | None = None) -> ConvertReport:
    """Convert an msModelSlim W4A8_DYNAMIC checkpoint into NPU-ready shards.

    The whole source is validated (structure from headers; scales, offsets and biases from data)
    before the first byte is written; version "0" weights are range-checked as they are packed.
    Shards are written under temporary names and renamed when complete; the index, then the stamped
    description, come last, so a directory without the description is visibly incomplete (`route.py`).
    `on_progress(new_bytes, total_bytes)` is called as output tensor bytes are written, `on_phase(text)`
    as each step starts ("validating 1,234 tensors in 12 files").

    Example:
        >>> convert("qwen3-w4a8", "qwen3-npu").tensors_written  # doctest: +SKIP
    """
    options = options or ConvertOptions()
    _check_options(options)
    started, phase, progress = time.monotonic(), on_phase or (lambda _text: None), on_progress or (lambda *_: None)
    src = open_source(Path(source), model_dtype=options.model_dtype, group_size=options.group_size)
    phase(f"validating {len(src.tensors):,} tensors in {len(src.headers):,} file(s)")
    plan = make_plan(src)
    route = OutputRoute.of(plan, Path(output), options.max_shard_bytes)
    route.check(resume=options.resume, force=options.force)
    resources, warnings = estimate_resources(plan, route.shards, options.workers), _warnings(plan)
    with TensorReader() as reader:
        check_small_tensors(plan, reader)
    if options.dry_run:
        return _report(route, resources, route.free_disk_bytes(), [], started, warnings, dry_run=True)
    with route.prepare(resume=options.resume, force=options.force, warnings=warnings) as prepared:
        phase(_writing_phase(route, resources.workers, prepared.journal))
        written = prepared.write(resources.workers, lambda n: progress(n, route.write_bytes))
        prepared.commit(build_stamp(plan, written, prepared.journal.source_fingerprint))
    return _report(route, resources, prepared.disk_free_bytes, written, started, warnings)


def _is_converted(path: Path) -> bool:
    description = path / DESCRIPTION_NAME
    if not description.is_file():
        return False
    _raw, parsed = read_json(description)
    return isinstance(parsed, dict) and STAMP_KEY in parsed


def _inspect_source(path: Path, model_dtype: str | None, group_size: int | None,
                    plan_for: tuple[int, int | None] | None) -> dict:
    src = open_source(path, model_dtype=model_dtype, group_size=group_size)
    plan = make_plan(src)
    resources = None
    if plan_for:
        max_shard_bytes, workers = plan_for
        resources = estimate_resources(plan, assign_shards(plan.tensors, max_shard_bytes), workers,
                                       disk_free_bytes=free_disk_bytes(path)).summary()
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
        "group_size_from": src.group_size_from.value,
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
        "warnings": _warnings(plan),
        "plan": resources,
    }


def _inspect_converted(path: Path) -> dict:
    from .runtime import NpuReadyCheckpoint

    ckpt = NpuReadyCheckpoint.open(path)
    stamp = ckpt.stamp
    variants = Counter(m.variant for m in stamp.modules.values())
    return {
        "kind": "converted",
        "path": str(path),
        "layout": f"{stamp.layout}/{stamp.layout_version}",
        "tool_version": stamp.tool_version,
        "serving_releases": list(stamp.release_lines),
        "source": stamp.source.to_json(),
        "variants": {v.value: n for v, n in variants.items()},
        "moe_layers": [{"prefix": p, "variant": m.variant.value, "experts": m.num_experts, "hidden": m.hidden,
                        "intermediate": m.intermediate} for p, m in stamp.records(MoeRecord).items()],
        "linear_layers": [{"prefix": p, "variant": m.variant.value, "out": m.out_features, "in": m.in_features}
                          for p, m in stamp.records(LinearRecord).items()],
        "files": len(stamp.shards),
        "tensors": len(ckpt.tensor_names),
        "tensors_converted": sum(1 for n in ckpt.tensor_names if ckpt.type_of(n) == CONVERTED_TYPE),
        "output_bytes": sum(s.bytes for s in stamp.shards.values()),
        "warnings": [_WARNINGS[v] for v in variants if v in _WARNINGS],
    }


def inspect(path: Path | str, *, model_dtype: str | None = None, group_size: int | None = None,
            plan_for: tuple[int, int] | None = None) -> dict:
    """Describe a source checkpoint (after validating its structure) or a converted directory.

    `plan_for=(max_shard_bytes, workers)` adds the conversion plan (shards, bytes, memory, disk); it and
    `model_dtype` are refused (`UsageError`) for a converted directory."""
    path = Path(path)
    if not _is_converted(path):
        return _inspect_source(path, model_dtype, group_size, plan_for)
    if plan_for is not None or model_dtype is not None or group_size is not None:
        option = "--plan" if plan_for is not None else "--model-dtype" if model_dtype is not None else "--group-size"
        raise UsageError(f"{path}: is already converted; {option} applies to a source checkpoint (inspect the "
                         "directory it was converted from)")
    return _inspect_converted(path)
