"""`verify`: is a converted directory complete and intact, and (with the source) faithful to it?

Integrity needs no tensor in memory: every shard is hashed in 16 MiB blocks and its header is
checked against its size, the index and the stamp. Fidelity (`source=`) decodes a sample of the
converted tensors (unpack int4, decode int64 scales) and compares them with the source's values.
Numerics (`numerics=True`, needs the source) runs sampled MoE layers through the reference backend
and an fp32 forward of the source and compares the error with its bound (`numerics.py`).
"""
from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .constants import DESCRIPTION_NAME, DOWN_BIAS_CHUNKS, INDEX_NAME
from .journal import sha256_file
from .layout import expert_tensor_specs
from .errors import InvalidCheckpointError, NotConvertedError, UsageError, W4A8Error
from .numerics import LayerNumerics, LinearNumerics, check_numerics, open_converted_source, source_mismatch
from .plan import CopyBytes, TranslatedTensor, make_plan
from .produce import check_parts
from .runtime import NpuReadyCheckpoint
from .source import SourceCheckpoint, TensorReader
from .source.checkpoint import OPTIONAL_KEY, described_files
from .source.safetensors_file import TensorRef, read_header
from .transforms import LINEAR_SPECS, MOE_SPECS, TRANSLATIONS
from .transforms.int4 import unpack_int32_to_int4
from .transforms.scales import decode_int64_to_fp32, high_words_are_zero, round_to_dtype

__all__ = ["VerifyReport", "verify"]

BIAS_RELATIVE_TOLERANCE = 1e-5  # of max|bias|: an fp32 sum in another order


@dataclass
class VerifyReport:
    path: Path
    problems: list[str] = field(default_factory=list)
    shards_checked: int = 0
    bytes_hashed: int = 0
    tensors_compared: int = 0
    worst: dict[str, float] = field(default_factory=dict)  # kind -> worst relative error seen
    numerics: list[LayerNumerics | LinearNumerics] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def note_error(self, kind: str, value: float) -> None:
        self.worst[kind] = max(self.worst.get(kind, 0.0), value)

    def summary(self) -> dict:
        return {"path": str(self.path), "ok": self.ok, "problems": self.problems,
                "shards_checked": self.shards_checked, "bytes_hashed": self.bytes_hashed,
                "tensors_compared": self.tensors_compared, "worst_relative_error": self.worst,
                "numerics": [layer.as_dict() for layer in self.numerics]}


def _check_integrity(ckpt: NpuReadyCheckpoint, report: VerifyReport) -> dict[str, TensorRef]:
    """Shards present, sized, hashed and consistent with the index; returns stored tensors by name."""
    stored: dict[str, TensorRef] = {}
    for name, entry in sorted(ckpt.stamp.shards.items()):
        path = ckpt.root / name
        if not path.is_file():
            report.problems.append(f"{path}: shard is missing")
            continue
        size = path.stat().st_size
        if size != entry.bytes:
            report.problems.append(f"{path}: {size} bytes, the stamp records {entry.bytes}")
            continue
        try:
            header = read_header(path)
        except InvalidCheckpointError as exc:
            report.problems.append(str(exc))
            continue
        end = max((r.offset + r.nbytes for r in header.tensors.values()), default=0)
        if header.tensors and end != size:
            report.problems.append(f"{path}: tensor data ends at byte {end} of {size}")
        digest = sha256_file(path)
        report.bytes_hashed += size
        report.shards_checked += 1
        if digest != entry.sha256:
            report.problems.append(f"{path}: sha256 {digest} differs from the stamp's {entry.sha256}")
        stored.update(header.tensors)
    weight_map = ckpt.weight_map
    for tensor, file_name in weight_map.items():
        ref = stored.get(tensor)
        if ref is not None and ref.file.name != file_name:
            report.problems.append(f"{ckpt.root / INDEX_NAME}: {tensor}: indexed in {file_name} but stored in "
                                   f"{ref.file.name}")
        elif ref is None and (ckpt.root / file_name).is_file() and file_name in ckpt.stamp.shards:
            report.problems.append(f"{ckpt.root / INDEX_NAME}: {tensor}: indexed in {file_name}, which does not "
                                   "hold it")
    for tensor, ref in stored.items():
        if tensor not in weight_map:
            report.problems.append(f"{ckpt.root / INDEX_NAME}: {tensor}: stored in {ref.file.name} but not indexed")
        if tensor not in ckpt.description:
            report.problems.append(f"{ckpt.root / DESCRIPTION_NAME}: {tensor}: has no quantization type")
    for extra in sorted(set(p.name for p in ckpt.root.glob("*.safetensors")) - set(ckpt.stamp.shards)):
        report.problems.append(f"{ckpt.root / extra}: shard not recorded in the stamp")
    root = os.path.realpath(ckpt.root)
    for name in described_files(ckpt.description):  # optional/quarot.safetensors, copied from the source
        path = ckpt.root / name
        if not path.is_file() or os.path.commonpath([root, os.path.realpath(path)]) != root:
            report.problems.append(f"{ckpt.root / DESCRIPTION_NAME}: names the file {name!r} ({OPTIONAL_KEY} "
                                   "section), which is not a file inside the directory")
    if report.ok:
        for prefix in ckpt.stamp.modules:
            problem = ckpt.module_problem(prefix)
            if problem:
                report.problems.append(f"{ckpt.root / DESCRIPTION_NAME}: {prefix}: {problem}")
    return stored


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    diff = float((actual.double() - expected.double()).abs().max()) if expected.numel() else 0.0
    return diff / scale if scale else diff


def _expected_bias(values: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor | None, chunks: int) -> torch.Tensor:
    """float64 reference of 8·Σ_k W·s2·s1 over `chunks` slices of the input dimension: [out, chunks]."""
    w = values.double()
    n, k = w.shape
    if s2 is not None:
        w = (w.reshape(n, s2.shape[1], -1) * s2.double().reshape(n, s2.shape[1], 1)).reshape(n, k)
    return 8 * (w * s1.double().reshape(n, 1)).reshape(n, chunks, k // chunks).sum(dim=2)


class _Fidelity:
    def __init__(self, report: VerifyReport, reader: TensorReader, source_reader: TensorReader,
                 source_tensors: dict[str, TensorRef], stored: dict[str, TensorRef]):
        self.report, self.reader, self.source_reader = report, reader, source_reader
        self.source, self.stored = source_tensors, stored

    def src(self, name: str) -> torch.Tensor:
        return self.source_reader.load(self.source[name])

    def fail(self, tensor: str, rule: str) -> None:
        self.report.problems.append(f"{tensor}: {rule}")

    def source_parts(self, names: dict[str, str], packed_pairs: bool,
                     model_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The source values of one projection or Linear layer, under the content rules the conversion
        applies: a source edited after converting must not pass as the values that were converted
        (`InvalidCheckpointError`, exit 3, as `convert` would give)."""
        parts = {suffix: self.src(name) for suffix, name in names.items()}
        check_parts(parts, {suffix: self.source[name] for suffix, name in names.items()}, packed_pairs=packed_pairs,
                    model_dtype=model_dtype)
        return parts

    def compare_int4(self, name: str, unpacked: torch.Tensor, expected: torch.Tensor) -> None:
        """Every int4 value that differs is counted; the first few are named ([in, out])."""
        differ = unpacked != expected
        count = int(differ.sum())
        if count:
            where = torch.nonzero(differ)[:4].tolist()
            self.fail(name, f"{count} of {differ.numel()} unpacked int4 values differ from the source's "
                            f"(at [in, out] {where}{' ...' if count > 4 else ''})")

    def projection(self, name: str, values: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor | None,
                   fp16_fused: bool, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                   checkpoint_bias: torch.Tensor | None, chunks: int) -> None:
        """Compare one decoded projection (kernel orientation) with its source values."""
        self.report.tensors_compared += 1
        self.compare_int4(name, unpack_int32_to_int4(packed), values.t())
        if not high_words_are_zero(scale):
            self.fail(name, "an int64 scale has a non-zero high word")
        decoded = decode_int64_to_fp32(scale)
        exact = (s1.float().reshape(1, -1) * s2.float().t() if s2 is not None else s1.float().reshape(1, -1))
        expected = exact.half().float() if fp16_fused else exact
        if not torch.equal(decoded, expected):
            self.fail(name, "decoded scales differ from the source's " +
                      ("fp16-rounded scale x scale_second" if fp16_fused else "weight_scale"))
        self.report.note_error("scale", _relative(decoded, exact))
        if checkpoint_bias is not None and checkpoint_bias.shape[-1] != chunks:
            checkpoint_bias = None  # a [out, 1] total where 16 chunks are stored: compare with the recomputation
        reference = checkpoint_bias.double() if checkpoint_bias is not None else _expected_bias(values, s1, s2, chunks)
        error = _relative(bias.reshape(reference.shape), reference)
        self.report.note_error("bias", error)
        if error > BIAS_RELATIVE_TOLERANCE or (checkpoint_bias is not None and error != 0):
            self.fail(name, f"scale_bias differs from the source's by {error:.3g} of its maximum")


def _sample_experts(count: int, sample: int | None, rng: random.Random) -> list[int]:
    """All experts, or `sample` of them: the first and the last, then seeded random ones."""
    if sample is None or sample >= count:
        return list(range(count))
    chosen = {0, count - 1} if sample >= 2 else {0}
    chosen |= set(rng.sample(range(1, count - 1), max(0, sample - len(chosen))))
    return sorted(chosen)


class _OutputReader(TensorReader):
    """Reads the converted shards: what goes wrong there is a problem of the output, not of the source."""

    def read_into(self, ref: TensorRef, buf: memoryview, start: int = 0) -> None:
        try:
            super().read_into(ref, buf, start)
        except InvalidCheckpointError as exc:
            raise NotConvertedError(exc.rule, file=exc.file, tensor=exc.tensor) from None


def _check_fidelity(ckpt: NpuReadyCheckpoint, src: SourceCheckpoint, stored: dict[str, TensorRef],
                    report: VerifyReport, sample: int | None, seed: int) -> None:
    """Compare decoded tensors with the source's values."""
    plan = make_plan(src)
    rng = random.Random(seed)
    with _OutputReader() as reader, TensorReader() as source_reader:
        check = _Fidelity(report, reader, source_reader, src.tensors, stored)
        for layer in plan.moe_layers:
            spec = MOE_SPECS[layer.variant]
            for e in _sample_experts(layer.num_experts, sample, rng):
                for proj in layer.projections:
                    is_down = proj == layer.projections[2]
                    specs = expert_tensor_specs(layer.prefix, e, proj, is_down, layer.hidden, layer.intermediate,
                                                layer.group_size)
                    outs = {o: stored.get(name) for o, (name, _spec) in specs.items()}
                    if None in outs.values():
                        report.problems.append(f"{layer.prefix}.experts.{e}.{proj}: converted tensors missing")
                        continue
                    parts = check.source_parts({s: layer.source_name(e, proj, s) for s in layer.source_suffixes()},
                                               spec.packed_pairs)
                    check.projection(
                        f"{layer.source_name(e, proj, '*')}", spec.int4_values(parts["weight"]),
                        *spec.scales.factors(parts), spec.scales.fp16_fused,
                        *(reader.load(outs[o]) for o in outs),
                        parts.get("scale_bias"),
                        DOWN_BIAS_CHUNKS if is_down else 1)
        for module in plan.linears:
            spec = LINEAR_SPECS[module.variant]
            names = {o: f"{module.prefix}.{o}" for o in spec.outputs}
            if any(n not in stored for n in names.values()):
                report.problems.append(f"{module.prefix}: converted tensors missing")
                continue
            report.tensors_compared += 1
            dtype = src.model_dtype
            parts = check.source_parts({s: module.source_name(s) for s in module.source_suffixes()},
                                       spec.packed_pairs, dtype)
            get = parts.__getitem__
            check.compare_int4(names["weight"], unpack_int32_to_int4(reader.load(stored[names["weight"]])),
                               spec.int4_values(get("weight")).t())
            exact = get("weight_scale").float().reshape(1, -1) * get("weight_scale_second").float().t()
            expected = (round_to_dtype(get("weight_scale"), dtype).reshape(1, -1)
                        * round_to_dtype(get("weight_scale_second"), dtype).t())
            antiquant = reader.load(stored[names["weight_scale_second"]])
            if not torch.equal(antiquant, expected):
                check.fail(names["weight_scale_second"], f"differs from the {dtype}-rounded scale product")
            report.note_error("scale", _relative(antiquant, exact))
        for tensor in (t for t in plan.tensors if isinstance(t.recipe, TranslatedTensor)):
            report.tensors_compared += 1
            ref = stored.get(tensor.name)
            translation = TRANSLATIONS[tensor.recipe.translation][tensor.recipe.output]
            source_value = check.source_parts(tensor.recipe.sources(), packed_pairs=True)[translation.needs]
            if ref is None or ref.dtype != tensor.dtype or ref.shape != tensor.shape:
                report.problems.append(f"{tensor.name}: translated tensor missing or reshaped")
            elif not torch.equal(reader.load(ref), translation.make({translation.needs: source_value})):
                report.problems.append(f"{tensor.name}: differs from its {tensor.recipe.translation} translation of "
                                       f"{', '.join(tensor.recipe.sources().values())}")
        passthrough = [t for t in plan.tensors if isinstance(t.recipe, CopyBytes)]
        if sample is not None:
            passthrough = rng.sample(passthrough, min(len(passthrough), 4 * max(sample, 1)))
        for tensor in passthrough:
            report.tensors_compared += 1
            ref = stored.get(tensor.name)
            if ref is None or ref.dtype != tensor.dtype or ref.shape != tensor.shape:
                report.problems.append(f"{tensor.name}: passed-through tensor missing or reshaped")
            elif reader.read_bytes(ref) != source_reader.read_bytes(tensor.recipe.ref):
                report.problems.append(f"{tensor.name}: passed-through bytes differ from the source")


def _check_numerics(ckpt: NpuReadyCheckpoint, src: SourceCheckpoint, report: VerifyReport, layers: int | None,
                    seed: int) -> None:
    report.numerics = check_numerics(ckpt, src, layers=layers, seed=seed)
    if not report.numerics:
        report.problems.append(f"{ckpt.root}: numerics: nothing to check (no W4A8 MoE or Linear layer)")
    for layer in report.numerics:
        report.note_error("numerics", layer.error)
        if not layer.ok:
            report.problems.append(layer.problem())


def verify(path: Path | str, *, source: Path | str | None = None, sample: int | None = 2,
           seed: int = 0, numerics: bool = False, on_phase: Callable[[str], None] | None = None) -> VerifyReport:
    """Check a converted directory; with `source`, also decode `sample` experts per layer (None: all);
    with `numerics` as well, run `sample` MoE layers (None: all) through the reference backend
    against the source's fp32 forward, and `sample` W4A8 Linear layers through the A16W4 emulation
    (`report.numerics`, `report.worst["numerics"]`); nothing to run is a problem.

    Never raises for a damaged output: every finding is in `report.problems` (the CLI's exit 5).
    Raises `InvalidCheckpointError` only for a `source` that is unreadable or breaks a rule the
    conversion applies, content rules included (exit 3); `numerics` without `source` is a `UsageError`.
    `on_phase(text)` is told each step as it starts (hashing, reading the source, comparing, numerics).
    """
    if numerics and source is None:
        raise UsageError("the numerics check needs the source checkpoint (source=...)")
    path = Path(path)
    report = VerifyReport(path)
    try:
        ckpt = NpuReadyCheckpoint.open(path)
    except W4A8Error as exc:
        report.problems.append(str(exc))
        return report
    phase = on_phase or (lambda _text: None)
    phase(f"hashing {len(ckpt.stamp.shards):,} shard(s)")
    try:
        stored = _check_integrity(ckpt, report)
    except (W4A8Error, OSError) as exc:  # a file that changed while it was checked
        report.problems.append(str(exc) if isinstance(exc, W4A8Error) else f"{exc.filename}: {exc.strerror or exc}")
        return report
    if source is None or not report.ok:
        return report
    phase(f"reading the source {source}")
    src = open_converted_source(ckpt, source)  # an invalid source is exit 3, not a problem of the output
    mismatch = source_mismatch(ckpt, src)
    if mismatch:
        report.problems.append(f"{source}: {mismatch}")
        return report
    try:
        phase("comparing " + ("every expert" if sample is None else f"{sample} sampled expert(s) per layer")
              + " with the source")
        _check_fidelity(ckpt, src, stored, report, sample, seed)
        # Numerics runs even when fidelity found differences: its errors say how much they matter.
        if numerics:
            phase("running the numerics check against an fp32 forward of the source")
            _check_numerics(ckpt, src, report, sample, seed)
    except NotConvertedError as exc:  # the output (source errors propagate: the source is invalid)
        report.problems.append(str(exc))
    return report
