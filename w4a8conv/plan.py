"""The conversion plan: every output tensor with its dtype, shape and recipe, from headers alone.

Building the plan validates the checkpoint's structure (module membership, dtypes, shapes, group
divisibility); no tensor data is read here. `produce.py` executes recipes, `writer.py` stores them.
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass
from .constants import (CONVERTED_TYPE, DOWN_BIAS_CHUNKS, INT4_PER_INT32, SOURCE_TYPE, STAMP_KEY, QuantVersion,
                        Variant)
from .errors import InvalidCheckpointError
from .layout import MOE_OUTPUTS, linear_tensor_specs, moe_tensor_specs
from .source.checkpoint import MSMODELSLIM, SourceCheckpoint
from .source.compressed_tensors import COMPRESSED_TENSORS
from .source.safetensors_file import DTYPE_SIZES, TensorRef
from .transforms import LINEAR_SPECS, MOE_SPECS, TRANSLATIONS

__all__ = [
    "PROJECTION_NAMES", "MoeLayer", "LinearModule", "CopyBytes", "ExpertTensor", "LinearTensor", "TranslatedTensor",
    "Recipe", "OutputTensor", "Plan", "make_plan", "natural_key", "MOE_OUTPUTS",
]

# Expert projection names per model family: (gate, up, down).
PROJECTION_NAMES: tuple[tuple[str, str, str], ...] = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))
_EXPERT_WEIGHT = re.compile(r"^(?P<layer>.+)\.experts\.(?P<expert>\d+)\.(?P<proj>[^.]+)\.weight$")
_MAX_EXPERT_ID_DIGITS = 18
_FLOAT_DTYPES = {"F32", "F16", "BF16"}
# Offsets are only checked to be zero, by value: llm_ptq writes weight_offset_second as int64.
_OFFSET_DTYPES = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8"}
_MOE_VARIANT = {  # (producer, version, per group) -> variant
    (MSMODELSLIM, QuantVersion.V0, True): Variant.MOE_GROUP_V0,
    (MSMODELSLIM, QuantVersion.V1, True): Variant.MOE_GROUP_V1,
    (MSMODELSLIM, QuantVersion.V0, False): Variant.MOE_CHANNEL_V0,
    (MSMODELSLIM, QuantVersion.V1, False): Variant.MOE_CHANNEL_V1,
    (COMPRESSED_TENSORS, QuantVersion.V0, True): Variant.MOE_GROUP_CT,
    (COMPRESSED_TENSORS, QuantVersion.V0, False): Variant.MOE_CHANNEL_CT,
}
_LINEAR_VARIANT = {QuantVersion.V0: Variant.LINEAR_GROUP_V0, QuantVersion.V1: Variant.LINEAR_GROUP_V1}


def _suffixes_with_offsets(outputs) -> tuple[str, ...]:
    """Every source suffix the outputs read, plus the zero offsets that accompany the scales."""
    needs = {suffix for output in outputs for suffix in output.needs}
    offsets = {s.replace("scale", "offset") for s in needs if s in ("weight_scale", "weight_scale_second")}
    return tuple(sorted(needs | offsets))


_ASCII_DIGITS = re.compile(r"([0-9]+)")


def natural_key(name: str) -> tuple:
    """Sort key that puts layers.2 before layers.10.

    Digit runs compare by (length without leading zeros, text), the order of their values without
    converting them: names from the internet may hold runs past Python's int-string limit, and
    str.isdigit() accepts digits (superscripts, other scripts) that int() refuses."""
    return tuple((0, len(p.lstrip("0")), p.lstrip("0")) if i % 2 else (1, 0, p)
                 for i, p in enumerate(_ASCII_DIGITS.split(name)))


@dataclass(frozen=True)
class MoeLayer:
    """One MoE layer's W4A8 experts: E experts x (gate [I, H], up [I, H], down [H, I])."""

    prefix: str
    variant: Variant
    num_experts: int
    projections: tuple[str, str, str]
    hidden: int
    intermediate: int
    group_size: int  # 0 = per-channel

    def source_name(self, expert: int, proj: str, suffix: str) -> str:
        return f"{self.prefix}.experts.{expert}.{proj}.{suffix}"

    def dims(self, proj: str) -> tuple[int, int]:
        """(out, in) of a projection in source orientation."""
        return (self.hidden, self.intermediate) if proj == self.projections[2] else (self.intermediate, self.hidden)

    def source_suffixes(self) -> tuple[str, ...]:
        spec = MOE_SPECS[self.variant]
        stored = {"weight", *spec.scales.shapes(1, self.group_size, self.group_size)}
        return tuple(sorted((stored | {"scale_bias"}) if spec.bias_in_checkpoint else stored))


@dataclass(frozen=True)
class LinearModule:
    """One W4A8 Linear layer: weight [N, K] in source orientation."""

    prefix: str
    variant: Variant
    out_features: int
    in_features: int
    group_size: int
    bias_columns: int  # 1, or 16 for a row-parallel "1.0.0" layer's scale_bias

    def source_name(self, suffix: str) -> str:
        return f"{self.prefix}.{suffix}"

    def source_suffixes(self) -> tuple[str, ...]:
        return _suffixes_with_offsets(LINEAR_SPECS[self.variant].outputs.values())


@dataclass(frozen=True)
class CopyBytes:
    """A tensor that is not W4A8_DYNAMIC: copied byte for byte."""

    ref: TensorRef
    description_type = None  # keeps the source description's entry

    def sources(self) -> dict[str, str]:
        """The one source tensor it copies (keyed by its own name: no transform reads it by part)."""
        return {self.ref.name: self.ref.name}


@dataclass(frozen=True)
class ExpertTensor:
    """One output of one expert projection, in kernel orientation."""

    layer: MoeLayer
    expert: int
    proj: str
    output: str  # one of MOE_OUTPUTS
    description_type = CONVERTED_TYPE

    def sources(self) -> dict[str, str]:
        """The source tensors the transform reads, by the suffix it `needs` them as."""
        needs = MOE_SPECS[self.layer.variant].outputs[self.output].needs
        return {s: self.layer.source_name(self.expert, self.proj, s) for s in needs}


@dataclass(frozen=True)
class LinearTensor:
    """One of a Linear layer's outputs, named as vllm-ascend names the final parameter."""

    module: LinearModule
    output: str  # a key of LINEAR_SPECS[variant].outputs
    model_dtype: str
    description_type = CONVERTED_TYPE

    def sources(self) -> dict[str, str]:
        """The source tensors the transform reads, by the suffix it `needs` them as."""
        return {s: self.module.source_name(s) for s in LINEAR_SPECS[self.module.variant].outputs[self.output].needs}


@dataclass(frozen=True)
class TranslatedTensor:
    """A tensor of a non-W4A8 module written in the format its description type is served with."""

    module: str
    translation: str  # a key of TRANSLATIONS, also the tensor's type in the output description
    output: str       # a key of TRANSLATIONS[translation]

    @property
    def description_type(self) -> str:
        return self.translation

    def sources(self) -> dict[str, str]:
        """The one source tensor it re-expresses, by the suffix the translation `needs`."""
        needs = TRANSLATIONS[self.translation][self.output].needs
        return {needs: f"{self.module}.{needs}"}


# Every recipe names the source tensors it reads (`sources()`) and the type its output gets in the
# description (`description_type`, None to keep the source's); `produce.RECIPES` carries each one out.
Recipe = CopyBytes | ExpertTensor | LinearTensor | TranslatedTensor


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]
    recipe: Recipe

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


@dataclass(frozen=True)
class Plan:
    source: SourceCheckpoint
    moe_layers: tuple[MoeLayer, ...]
    linears: tuple[LinearModule, ...]
    tensors: tuple[OutputTensor, ...]  # output order
    consumed: frozenset[str]  # source tensors folded into converted outputs

    @property
    def passthrough(self) -> tuple[OutputTensor, ...]:
        return tuple(t for t in self.tensors if isinstance(t.recipe, CopyBytes))

    def output_description(self) -> dict:
        """The source description with converted modules retyped; the stamp is added by the caller."""
        out = {k: v for k, v in self.source.description.items() if k not in self.consumed}
        # vllm-ascend resolves an MoE layer's scheme from the "<prefix>.experts..." keys.
        for t in self.tensors:
            if t.recipe.description_type is not None:
                out[t.name] = t.recipe.description_type
        return dict(sorted(out.items(), key=lambda kv: natural_key(kv[0])))


class _Checker:
    """Header-level rules, each failure naming the file, the tensor and the rule."""

    def __init__(self, source: SourceCheckpoint):
        self.source = source

    def ref(self, name: str, module: str) -> TensorRef:
        ref = self.source.tensors.get(name)
        if ref is None:
            raise InvalidCheckpointError(f"missing; W4A8_DYNAMIC module {module} needs it",
                                         file=self.source.root, tensor=name)
        if self.source.type_of(name) != SOURCE_TYPE:
            raise InvalidCheckpointError(f"typed {self.source.type_of(name)!r} but its module {module} is "
                                         f"{SOURCE_TYPE}", file=self.source.description_file, tensor=name)
        return ref

    def expect(self, ref: TensorRef, dtypes: set[str], shape: tuple[int, ...], why: str = "") -> None:
        if ref.dtype not in dtypes:
            raise InvalidCheckpointError(f"dtype {ref.dtype}, expected {' or '.join(sorted(dtypes))}",
                                         file=ref.file, tensor=ref.name)
        if ref.shape != shape:
            raise InvalidCheckpointError(f"shape {list(ref.shape)}, expected {list(shape)}{why}",
                                         file=ref.file, tensor=ref.name)

    def group_columns(self, ref: TensorRef, out: int, inp: int, group: int, dtypes: set[str]) -> None:
        """weight_scale_second must be [out, in/G] for the group size vllm-ascend will use."""
        if inp % group:
            raise InvalidCheckpointError(f"input dimension {inp} is not a multiple of group_size {group}",
                                         file=ref.file, tensor=ref.name)
        if ref.shape != (out, inp // group) and len(ref.shape) == 2 and ref.shape[0] == out and ref.shape[1]:
            implied = inp // ref.shape[1] if inp % ref.shape[1] == 0 else None
            hint = f"; these columns mean group size {implied}" if implied else ""
            raise InvalidCheckpointError(f"shape {list(ref.shape)}, expected [{out}, {inp // group}] "
                                         f"for group_size {group}{hint}", file=ref.file, tensor=ref.name)
        self.expect(ref, dtypes, (out, inp // group))


_SCALE_AND_OFFSET_DTYPES = (("weight_scale", _FLOAT_DTYPES), ("weight_offset", _OFFSET_DTYPES))
_SECOND_DTYPES = (("weight_scale_second", _FLOAT_DTYPES), ("weight_offset_second", _OFFSET_DTYPES))


def _packed_rows(version: QuantVersion, out: int) -> int:
    return out // 2 if version is QuantVersion.V1 else out


def _check_projection(check: _Checker, layer: MoeLayer, expert: int, proj: str) -> None:
    out, inp = layer.dims(proj)
    module = f"{layer.prefix}.experts.{expert}.{proj}"
    name = lambda suffix: layer.source_name(expert, proj, suffix)  # noqa: E731
    spec = MOE_SPECS[layer.variant]
    check.expect(check.ref(name("weight"), module), {"I8"}, (_packed_rows(check.source.version, out), inp),
                 " (same as expert 0's)")
    for suffix, shape in spec.scales.shapes(out, inp, layer.group_size).items():
        ref = check.ref(name(suffix), module)
        dtypes = _OFFSET_DTYPES if "offset" in suffix else _FLOAT_DTYPES
        if suffix in ("weight_scale_second", "weight_offset_second"):
            check.group_columns(ref, out, inp, layer.group_size, dtypes)
        else:
            check.expect(ref, dtypes, shape)
    if spec.bias_in_checkpoint:
        columns = DOWN_BIAS_CHUNKS if proj == layer.projections[2] and not spec.down_bias_total else 1
        check.expect(check.ref(name("scale_bias"), module), _FLOAT_DTYPES, (out, columns))


def _moe_layer(check: _Checker, prefix: str, experts: dict[int, set[str]]) -> MoeLayer:
    source = check.source
    ids = sorted(experts)
    if ids != list(range(len(ids))):
        present = set(ids)  # ids come from tensor names: never materialise range(max id)
        missing = [i for i in range(min(ids[-1], len(ids) + 8) + 1) if i not in present]
        raise InvalidCheckpointError(f"expert ids are not 0..{ids[-1]} without gaps (missing {missing[:8]})",
                                     file=source.description_file, tensor=f"{prefix}.experts")
    projections = next((p for p in PROJECTION_NAMES if experts[0] <= set(p) and set(p) <= experts[0]), None)
    if projections is None:
        known = " or ".join("/".join(p) for p in PROJECTION_NAMES)
        raise InvalidCheckpointError(f"expert 0 has projections {sorted(experts[0])}, expected {known}",
                                     file=source.description_file, tensor=f"{prefix}.experts.0")
    for e in ids:
        if experts[e] != set(projections):
            raise InvalidCheckpointError(f"projections {sorted(experts[e])} differ from expert 0's",
                                         file=source.description_file, tensor=f"{prefix}.experts.{e}")
    gate, _up, down = projections
    gate_scale = check.ref(f"{prefix}.experts.0.{gate}.weight_scale", f"{prefix}.experts.0.{gate}")
    down_scale = check.ref(f"{prefix}.experts.0.{down}.weight_scale", f"{prefix}.experts.0.{down}")
    if not gate_scale.shape or not down_scale.shape:
        raise InvalidCheckpointError("weight_scale is a scalar, expected [out, 1]", file=gate_scale.file,
                                     tensor=(gate_scale if not gate_scale.shape else down_scale).name)
    intermediate, hidden = gate_scale.shape[0], down_scale.shape[0]
    for what, size, ref in (("intermediate", intermediate, gate_scale), ("hidden", hidden, down_scale)):
        if size == 0:
            raise InvalidCheckpointError(f"{what} size 0 (from {list(ref.shape)}): a W4A8 module needs "
                                         "non-zero dimensions", file=ref.file, tensor=ref.name)
    per_group = source.group_size != 0
    variant = _MOE_VARIANT[(source.producer, source.version, per_group)]
    down_bias = source.tensors.get(f"{prefix}.experts.0.{down}.scale_bias")
    if variant is Variant.MOE_CHANNEL_V1 and down_bias is not None and down_bias.shape == (hidden, 1):
        variant = Variant.MOE_CHANNEL_V1_BIAS_TOTAL  # vllm-ascend's DeepSeek-V4 script writes the total only
    layer = MoeLayer(prefix, variant, len(ids), projections, hidden, intermediate, source.group_size)
    for out in (intermediate, hidden):
        if out % INT4_PER_INT32:
            raise InvalidCheckpointError(f"output dimension {out} is not a multiple of {INT4_PER_INT32}, "
                                         "the int4 values packed per int32", file=gate_scale.file,
                                         tensor=f"{prefix}.experts")
    spec = MOE_SPECS[layer.variant]
    if (not spec.bias_in_checkpoint or spec.down_bias_total) and intermediate % DOWN_BIAS_CHUNKS:
        raise InvalidCheckpointError(f"intermediate size {intermediate} does not split into the "
                                     f"{DOWN_BIAS_CHUNKS} down_proj bias chunks", file=down_scale.file,
                                     tensor=f"{prefix}.experts")
    for e in ids:
        for proj in projections:
            _check_projection(check, layer, e, proj)
    return layer


def _linear(check: _Checker, prefix: str) -> LinearModule:
    source = check.source
    weight = check.ref(f"{prefix}.weight", prefix)
    if source.group_size == 0:
        raise InvalidCheckpointError("per-channel (group_size 0) W4A8_DYNAMIC Linear layer: no vllm-ascend "
                                     "release serves one (0.11 to 0.26 size its scales by group_size, later "
                                     "lines have no W4A8 Linear), so nothing was written",
                                     file=source.description_file, tensor=weight.name)
    if len(weight.shape) != 2:
        raise InvalidCheckpointError(f"shape {list(weight.shape)} is not 2-D [out, in]", file=weight.file,
                                     tensor=weight.name)
    rows, inp = weight.shape
    if rows == 0 or inp == 0:
        raise InvalidCheckpointError(f"shape {list(weight.shape)}: a W4A8 module needs non-zero dimensions",
                                     file=weight.file, tensor=weight.name)
    out = rows * 2 if source.version is QuantVersion.V1 else rows
    variant = _LINEAR_VARIANT[source.version]
    check.expect(weight, {"I8"}, (rows, inp))
    if out % INT4_PER_INT32:
        raise InvalidCheckpointError(f"output dimension {out} is not a multiple of {INT4_PER_INT32}",
                                     file=weight.file, tensor=weight.name)
    for suffix, dtypes in _SCALE_AND_OFFSET_DTYPES:
        check.expect(check.ref(f"{prefix}.{suffix}", prefix), dtypes, (out, 1))
    for suffix, dtypes in _SECOND_DTYPES:
        check.group_columns(check.ref(f"{prefix}.{suffix}", prefix), out, inp, source.group_size, dtypes)
    bias_columns = 1
    if "scale_bias" in LINEAR_SPECS[variant].outputs:
        bias = check.ref(f"{prefix}.scale_bias", prefix)
        bias_columns = bias.shape[1] if len(bias.shape) == 2 and bias.shape[1] == DOWN_BIAS_CHUNKS else 1
        check.expect(bias, _FLOAT_DTYPES, (out, bias_columns), " (or [out, 16] for a row-parallel layer)")
    return LinearModule(prefix, variant, out, inp, source.group_size, bias_columns)


def _moe_outputs(layer: MoeLayer) -> list[OutputTensor]:
    specs = moe_tensor_specs(layer.prefix, layer.projections, layer.num_experts, layer.hidden,
                             layer.intermediate, layer.group_size)
    return [OutputTensor(name, dtype, shape, ExpertTensor(layer, expert, proj, output))
            for (expert, proj, output), (name, (dtype, shape)) in specs.items()]


def _linear_outputs(module: LinearModule, model_dtype: str) -> list[OutputTensor]:
    specs = linear_tensor_specs(module.prefix, module.out_features, module.in_features, module.group_size,
                                LINEAR_SPECS[module.variant].bias_name, module.bias_columns)
    return [OutputTensor(name, dtype, shape, LinearTensor(module, output, model_dtype))
            for output, (name, (dtype, shape)) in specs.items()]


def _nothing_to_convert(source: SourceCheckpoint) -> InvalidCheckpointError:
    description = source.description
    if STAMP_KEY in description or CONVERTED_TYPE in description.values():
        return InvalidCheckpointError(f"already converted by w4a8conv (its description has {CONVERTED_TYPE} "
                                      "modules or a w4a8conv stamp); convert the msModelSlim source instead; "
                                      "nothing was written", file=source.description_file)
    types = sorted({source.type_of(n) for n in source.tensors})
    return InvalidCheckpointError(f"nothing to convert: no {SOURCE_TYPE} module, this is a W8A8/float export "
                                  f"(tensor types {', '.join(types)}; model_quant_type "
                                  f"{description.get('model_quant_type')!r}); nothing was written",
                                  file=source.description_file)


def _expert_id(text: str, name: str, source: SourceCheckpoint) -> int:
    """An expert number from a tensor name (ASCII digits: `open_source` refuses others), short enough
    to be a plausible count and to convert without Python's int-string limit."""
    if len(text) > _MAX_EXPERT_ID_DIGITS:
        shown = text if len(text) <= 24 else f"{text[:12]}...{text[-4:]} ({len(text)} characters)"
        raise InvalidCheckpointError(f"expert id {shown} has more than {_MAX_EXPERT_ID_DIGITS} digits",
                                     file=source.description_file,
                                     tensor=name if len(name) <= 200 else name[:200] + "...")
    return int(text)


def make_plan(source: SourceCheckpoint) -> Plan:
    """Classify every tensor, validate structure, and lay out the output tensors in order."""
    check = _Checker(source)
    moe: dict[str, dict[int, set[str]]] = defaultdict(lambda: defaultdict(set))
    linear_prefixes: list[str] = []
    for name in source.tensors:
        if source.type_of(name) != SOURCE_TYPE or not name.endswith(".weight"):
            continue
        match = _EXPERT_WEIGHT.match(name)
        if match:
            moe[match["layer"]][_expert_id(match["expert"], name, source)].add(match["proj"])
        else:
            linear_prefixes.append(name[: -len(".weight")])

    if not moe and not linear_prefixes:
        raise _nothing_to_convert(source)
    moe_layers = tuple(_moe_layer(check, prefix, moe[prefix]) for prefix in sorted(moe, key=natural_key))
    linears = tuple(_linear(check, prefix) for prefix in sorted(linear_prefixes, key=natural_key))
    if linears and source.model_dtype is None:
        raise InvalidCheckpointError("W4A8 Linear scales are rounded to the model dtype, and config.json "
                                     "gives none: pass --model-dtype", file=source.root / "config.json")
    dtype_name = str(source.model_dtype).removeprefix("torch.") if source.model_dtype else ""

    consumed: set[str] = set()
    outputs: list[OutputTensor] = []
    for layer in moe_layers:
        outputs += _moe_outputs(layer)
        consumed.update(layer.source_name(e, p, s) for e in range(layer.num_experts)
                        for p in layer.projections for s in layer.source_suffixes())
    for module in linears:
        outputs += _linear_outputs(module, dtype_name)
        consumed.update(module.source_name(s) for s in module.source_suffixes())
    for module, translation in sorted(source.translated.items()):
        for output, spec in TRANSLATIONS[translation].items():
            recipe = TranslatedTensor(module, translation, output)
            (name,) = recipe.sources().values()
            outputs.append(OutputTensor(f"{module}.{output}", spec.dtype, source.tensors[name].shape, recipe))
            consumed.add(name)

    for name, ref in source.tensors.items():
        if name in consumed:
            continue
        if source.type_of(name) == SOURCE_TYPE:
            raise InvalidCheckpointError("W4A8_DYNAMIC tensor belongs to no W4A8 module (no matching "
                                         "'.weight'), or has an unknown suffix", file=ref.file, tensor=name)
        outputs.append(OutputTensor(name, ref.dtype, ref.shape, CopyBytes(ref)))
    outputs.sort(key=lambda t: natural_key(t.name))
    names = [t.name for t in outputs]
    if len(set(names)) != len(names):
        clash = next(n for n in names if names.count(n) > 1)
        raise InvalidCheckpointError("a converted tensor's name is already used by a source tensor",
                                     file=source.root, tensor=clash)
    return Plan(source, moe_layers, linears, tuple(outputs), frozenset(consumed))

