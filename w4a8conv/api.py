"""The verbs the CLI, CI scripts and the runtime share: `convert` and `inspect`."""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import resource
import stat
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .version import __version__
from .constants import (CONVERTED_TYPE, DESCRIPTION_NAME, INDEX_NAME, LAYOUT_NAME, LAYOUT_VERSION, MAX_OPTION_VALUE,
                        STAMP_KEY, Variant)
from .engine import JOURNAL_NAME, Journal, plan_fingerprint, run_shards, source_files_identity
from .errors import InvalidCheckpointError, OutputLocationError, UsageError, WriteError
from .output import human_bytes
from .plan import CopyBytes, LinearModule, MoeLayer, Plan, make_plan
from .produce import check_small_tensors
from .resources import ResourcePlan, estimate_resources, free_disk_bytes, usable_cpus
from .runtime.vllm_ascend import serving_release_lines
from .source import TensorReader, open_source
from .source.checkpoint import DEFAULT_GROUP_SIZE, GroupSizeFrom, SourceCheckpoint, read_json
from .stamp import LinearRecord, ModuleRecord, MoeRecord, ShardRecord, SourceRecord, Stamp
from .transforms import LINEAR_SPECS
from .writer import WrittenShard, assign_shards, copy_file_atomic, write_json_atomic

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
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
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
            "workers_requested": self.resources.workers_requested, "usable_cpus": usable_cpus(),
            "plan": self.resources.summary(), "warnings": self.warnings,
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
        serving_releases=tuple(serving_release_lines()),  # vllm-ascend lines the plugin of this w4a8conv serves
        tool_version=__version__,
        source=SourceRecord(
            producer=source.producer, version=source.version, group_size=source.group_size,
            group_size_from=source.group_size_from,
            model_dtype=str(source.model_dtype).removeprefix("torch.") if source.model_dtype else None,
            fingerprint=source_fingerprint),
        modules={m.prefix: _module_record(m) for m in (*plan.moe_layers, *plan.linears)},
        shards={s.file_name: ShardRecord(bytes=s.nbytes, sha256=s.sha256) for s in shards},
    )


_OWN_FILE = re.compile(r"^(model-\d{5}-of-\d{5}\.safetensors|\..+\.partial)$")


def _check_options(options: ConvertOptions) -> None:
    for name, value in (("max_shard_bytes", options.max_shard_bytes), ("workers", options.workers)):
        if type(value) is not int or not 1 <= value <= MAX_OPTION_VALUE:
            raise UsageError(f"{name} {value!r} is not an integer from 1 to {MAX_OPTION_VALUE}")


def _existing_entries(output: Path) -> list[Path] | None:
    """The output directory's entries, or None when it does not exist; exit 2 when it cannot be used."""
    try:
        info = os.stat(output)
    except (FileNotFoundError, NotADirectoryError):  # to be created (or refused by mkdir)
        return None
    except OSError as exc:  # a component over the name limit, a loop of links, no permission to look
        raise OutputLocationError(f"{output}: cannot use as the output directory: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise OutputLocationError(f"{output}: exists and is not a directory")
    try:
        return sorted(output.iterdir())
    except OSError as exc:
        raise OutputLocationError(f"{output}: cannot list: {exc.strerror or exc}") from None


@contextlib.contextmanager
def _exclusive_lock(output: Path, warnings: list[str]) -> Iterator[None]:
    """flock(2) on the output directory for the whole run: a second run into it is refused at once.

    The kernel drops the lock when the process dies (SIGKILL included). On a file system without
    flock support the run goes on unlocked and says so (docs/reliability.md, "Concurrent runs")."""
    try:
        fd = os.open(output, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise OutputLocationError(f"{output}: cannot open: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputLocationError(f"{output}: another w4a8conv run is writing into this directory (it holds "
                                      "the directory's lock); wait for it to end, or stop it and use "
                                      "--resume") from None
        except OSError as exc:
            warnings.append(f"{output}: the file system does not support locks ({exc.strerror or exc}); a second "
                            "run into this directory is not excluded")
        yield
    finally:
        os.close(fd)


def _remove(path: Path, what: str, error: type[OutputLocationError] | type[WriteError]) -> None:
    """Remove one file of ours; an OS error (read-only file system, a directory in its place) names the path."""
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        raise error(f"{path}: cannot remove {what}: {exc.strerror or exc}") from None


def _prepare_output(source_root: Path, output: Path, copied: set[str], options: ConvertOptions, *,
                    remove: bool) -> None:
    """Refuse unsafe locations; with --force and `remove`, clear a previous output's files (and nothing else)."""
    src, dst = os.path.realpath(source_root), os.path.realpath(output)
    if dst == src or os.path.commonpath([src, dst]) == src:
        raise OutputLocationError(f"{output}: the output directory must not be the source directory or inside it")
    if os.path.commonpath([src, dst]) == dst:
        raise OutputLocationError(f"{output}: the output directory must not contain the source directory")
    entries = _existing_entries(output) or []
    if not entries or options.resume:
        return
    if not options.force:
        raise OutputLocationError(f"{output}: exists and is not empty (use --resume to finish an interrupted "
                                  "conversion, or --force to replace a previous one)")
    ours = {INDEX_NAME, DESCRIPTION_NAME, JOURNAL_NAME, *copied}
    foreign = [p.name for p in entries
               if (p.name not in ours and not _OWN_FILE.match(p.name)) or (p.is_dir() and not p.is_symlink())]
    if foreign:
        raise OutputLocationError(f"{output}: --force replaces only a previous w4a8conv output, and "
                                  f"{', '.join(foreign[:5])} is not part of one")
    if remove:
        for entry in entries:
            _remove(entry, "the previous output's file (--force)", OutputLocationError)


def _peak_rss_bytes() -> int:
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


def convert(source: Path | str, output: Path | str, *, options: ConvertOptions | None = None,
            on_progress: Callable[[int, int], None] | None = None,
            on_phase: Callable[[str], None] | None = None) -> ConvertReport:
    """Convert an msModelSlim W4A8_DYNAMIC checkpoint into NPU-ready shards.

    The whole source is validated (structure from headers; scales, offsets and biases from data)
    before the first byte is written; version "0" weights are range-checked as they are packed.
    Shards are written under temporary names and renamed when complete; the index, then the stamped
    description, come last, so a directory without the description is visibly incomplete.
    `on_progress(new_bytes, total_bytes)` is called as output tensor bytes are written, `on_phase(text)`
    as each step starts ("validating 1,234 tensors in 12 files").

    Example:
        >>> convert("qwen3-w4a8", "qwen3-npu").tensors_written  # doctest: +SKIP
    """
    options = options or ConvertOptions()
    _check_options(options)
    started = time.monotonic()
    source_root, output = Path(source), Path(output)
    phase = on_phase or (lambda _text: None)
    src = open_source(source_root, model_dtype=options.model_dtype, group_size=options.group_size)
    phase(f"validating {len(src.tensors):,} tensors in {len(src.headers):,} file(s)")
    plan = make_plan(src)
    copied = src.non_weight_files()
    _prepare_output(source_root, output, {p.name for p in copied} | set(src.rewritten_json), options, remove=False)
    shards = assign_shards(plan.tensors, options.max_shard_bytes)
    resources = estimate_resources(plan, shards, output, options.workers)
    variants = Counter(m.variant for m in (*plan.moe_layers, *plan.linears))
    warnings = _source_warnings(src) + [_WARNINGS[v] for v in variants if v in _WARNINGS]

    def report(written: list[WrittenShard]) -> ConvertReport:
        return ConvertReport(
            output=output, resources=resources, shards=written, tensors_written=len(plan.tensors),
            modules_converted=len(plan.moe_layers) + len(plan.linears),
            tensors_passed_through=len(plan.passthrough), source_bytes=resources.read_bytes,
            output_bytes=sum(s.nbytes for s in written) if written else resources.write_bytes,
            seconds=time.monotonic() - started, peak_rss_bytes=_peak_rss_bytes(), dry_run=options.dry_run,
            warnings=warnings)

    with TensorReader() as reader:
        check_small_tensors(plan, reader)
    if options.dry_run:
        return report([])
    created = not output.exists()
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputLocationError(f"{output}: cannot create: {exc.strerror or exc}") from None
    with _exclusive_lock(output, warnings):
        # Under the lock, look again: another run may have filled the directory since the first look.
        _prepare_output(source_root, output, {p.name for p in copied} | set(src.rewritten_json), options,
                        remove=True)
        free = free_disk_bytes(output)
        present = sum((output / s.file_name).stat().st_size for s in shards if (output / s.file_name).is_file())
        if free is not None and free < resources.write_bytes - present:
            if created:
                output.rmdir()
            raise WriteError(f"{output}: needs {resources.write_bytes - present} more bytes, the file system has "
                             f"{free} free")
        metadata = {"format": "pt", STAMP_KEY: f"{LAYOUT_NAME}/{LAYOUT_VERSION}"}
        fingerprint = src.fingerprint()
        plan_fp = plan_fingerprint(shards, metadata)
        files = source_files_identity(list(src.weight_files))
        if options.resume:
            journal = Journal.resume(output, fingerprint, files, plan_fp)
            for stale in output.glob(".*.partial"):
                _remove(stale, "a partial file of the interrupted run", WriteError)
        else:
            journal = Journal.start(output, fingerprint, files, plan_fp)
        total = resources.write_bytes
        phase(f"writing {len(shards):,} shard(s), {human_bytes(total)}, with {resources.workers} worker(s)"
              + (f" ({len(journal.done):,} finished before: re-hashed and kept)" if journal.done else ""))
        try:
            written = run_shards(output, shards, metadata, src.tensors, journal, resources.workers,
                                 (lambda n: on_progress(n, total)) if on_progress else (lambda _n: None))
        except InvalidCheckpointError:
            # The source itself is bad (a weight found out of range): nothing here is worth resuming.
            with contextlib.suppress(OSError):  # best effort: the error to report is the source's
                for name in [s.file_name for s in shards] + [JOURNAL_NAME]:
                    (output / name).unlink(missing_ok=True)
                if created:
                    output.rmdir()
            raise
        for extra in copied:
            copy_file_atomic(extra, output / extra.name)
        for name, content in src.rewritten_json.items():
            write_json_atomic(output / name, content)
        weight_map = {t.name: shard.file_name for shard in shards for t in shard.tensors}
        write_json_atomic(output / INDEX_NAME, {"metadata": {"total_size": resources.write_bytes},
                                                "weight_map": weight_map})
        description = plan.output_description()
        description[STAMP_KEY] = build_stamp(plan, written, fingerprint).to_json()
        write_json_atomic(output / DESCRIPTION_NAME, description)
        _remove(journal.path, "the journal of the finished run", WriteError)
        return report(written)


def _is_converted(path: Path) -> bool:
    description = path / DESCRIPTION_NAME
    if not description.is_file():
        return False
    _raw, parsed = read_json(description)
    return isinstance(parsed, dict) and STAMP_KEY in parsed


def _inspect_source(path: Path, model_dtype: str | None, group_size: int | None,
                    plan_for: tuple[int, int] | None) -> dict:
    src = open_source(path, model_dtype=model_dtype, group_size=group_size)
    plan = make_plan(src)
    resources = None
    if plan_for:
        max_shard_bytes, workers = plan_for
        resources = estimate_resources(plan, assign_shards(plan.tensors, max_shard_bytes), path, workers).summary()
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
        "warnings": _source_warnings(src) + [_WARNINGS[Variant(v)] for v in variants if Variant(v) in _WARNINGS],
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
