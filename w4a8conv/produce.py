"""Executes a plan's recipes: loads the source tensors a recipe needs, applies the pure transform,
and yields the output tensor's bytes (copied tensors in chunks).

Content rules that need tensor data run here (`check_parts`): on scales, offsets and biases in
`check_small_tensors` before anything is written, and on every value a recipe reads as it converts
it (the int4 range of version "0" weights, and the small tensors again).
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from .constants import DOWN_BIAS_CHUNKS
from .errors import InvalidCheckpointError
from .plan import CopyBytes, ExpertTensor, LinearTensor, OutputTensor, Plan, TranslatedTensor
from .source.checkpoint import MODEL_DTYPES
from .source.reader import TensorReader
from .source.safetensors_file import TORCH_DTYPES, TensorRef
from .transforms import LINEAR_SPECS, MOE_SPECS, TRANSLATIONS
from .transforms.rules import (bias_total_violation, finite_violation, fp16_overflow_violation, int4_range_violation,
                               scale_violation, zero_violation)
from .transforms.scales import fuse_group_scales_fp16, round_to_dtype

__all__ = ["produce", "source_names", "check_small_tensors", "check_parts", "COPY_CHUNK_BYTES"]

COPY_CHUNK_BYTES = 64 * 2**20


_SMALL_TENSOR_RULES = {
    "weight_scale": scale_violation, "weight_scale_second": scale_violation,
    "weight_offset": zero_violation, "weight_offset_second": zero_violation, "scale_bias": finite_violation,
}


def check_parts(parts: Mapping[str, torch.Tensor], refs: Mapping[str, TensorRef], *, packed_pairs: bool,
                model_dtype: torch.dtype | None = None) -> None:
    """Every content rule on source values of one expert projection (`model_dtype` None) or one Linear
    layer: each suffix's rule, the int4 range of version "0" weights, fused per-group scales within
    fp16 (MoE) and scales within the model dtype (Linear). `InvalidCheckpointError` names the tensor.

    The pre-pass, each recipe as it reads the values it converts, and `verify --source` all run this."""
    rules = _SMALL_TENSOR_RULES if packed_pairs else {**_SMALL_TENSOR_RULES, "weight": int4_range_violation}
    for suffix, tensor in parts.items():
        rule = rules.get(suffix)
        problem = rule(tensor) if rule else None
        if problem:
            raise InvalidCheckpointError(problem, file=refs[suffix].file, tensor=refs[suffix].name)
    if model_dtype is None and "weight_scale" in parts and "weight_scale_second" in parts:
        problem = fp16_overflow_violation(fuse_group_scales_fp16(parts["weight_scale"], parts["weight_scale_second"]))
        if problem:
            ref = refs["weight_scale_second"]
            raise InvalidCheckpointError(problem, file=ref.file, tensor=ref.name)
    for suffix in ("weight_scale", "weight_scale_second") if model_dtype is not None else ():
        if suffix in parts and finite_violation(round_to_dtype(parts[suffix], model_dtype)):
            ref = refs[suffix]
            raise InvalidCheckpointError(f"scale overflows the model dtype {model_dtype}", file=ref.file,
                                         tensor=ref.name)


def _load_checked(reader: TensorReader, tensors: Mapping[str, TensorRef], names: Mapping[str, str], *,
                  packed_pairs: bool, model_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Load source tensors by suffix and check them: what a rule accepted is exactly what is converted,
    even if the file changed since the pre-pass (scales are small: reading them twice is cheap)."""
    parts = {suffix: reader.load(tensors[name]) for suffix, name in names.items()}
    check_parts(parts, {suffix: tensors[name] for suffix, name in names.items()}, packed_pairs=packed_pairs,
                model_dtype=model_dtype)
    return parts


def _as_bytes(piece: torch.Tensor, tensor: OutputTensor, shape: tuple[int, ...]) -> memoryview:
    if tuple(piece.shape) != shape or piece.dtype != TORCH_DTYPES[tensor.dtype]:
        raise AssertionError(f"{tensor.name}: transform gave {piece.dtype} {list(piece.shape)}, "
                             f"the plan says {tensor.dtype} {list(shape)}")
    return memoryview(piece.contiguous().numpy()).cast("B")


def _copy(tensor: OutputTensor, recipe: CopyBytes, reader: TensorReader, _tensors) -> Iterator[memoryview]:
    for start in range(0, recipe.ref.nbytes, COPY_CHUNK_BYTES):
        buf = memoryview(bytearray(min(COPY_CHUNK_BYTES, recipe.ref.nbytes - start)))
        reader.read_into(recipe.ref, buf, start)
        yield buf


def _expert(tensor: OutputTensor, recipe: ExpertTensor, reader: TensorReader,
            tensors: Mapping[str, TensorRef]) -> Iterator[memoryview]:
    layer = recipe.layer
    spec = MOE_SPECS[layer.variant]
    output = spec.outputs[recipe.output]
    is_down = recipe.proj == layer.projections[2]
    names = {s: layer.source_name(recipe.expert, recipe.proj, s) for s in output.needs}
    parts = _load_checked(reader, tensors, names, packed_pairs=spec.packed_pairs)
    piece = output.make(parts, DOWN_BIAS_CHUNKS if is_down else 1)
    if recipe.output == "scale_bias" and is_down and spec.down_bias_total:
        problem = bias_total_violation(piece, parts["scale_bias"])
        if problem:
            ref = tensors[names["scale_bias"]]
            raise InvalidCheckpointError(problem, file=ref.file, tensor=ref.name)
    if recipe.output == "scale_bias" and not is_down:
        piece = piece.reshape(-1)  # gate/up bias is [out]; down keeps its 16 chunks
    yield _as_bytes(piece, tensor, tensor.shape)


def _linear(tensor: OutputTensor, recipe: LinearTensor, reader: TensorReader,
            tensors: Mapping[str, TensorRef]) -> Iterator[memoryview]:
    spec = LINEAR_SPECS[recipe.module.variant]
    output = spec.outputs[recipe.output]
    names = {s: recipe.module.source_name(s) for s in output.needs}
    dtype = MODEL_DTYPES[recipe.model_dtype]
    piece = output.make(_load_checked(reader, tensors, names, packed_pairs=spec.packed_pairs, model_dtype=dtype),
                        dtype)
    yield _as_bytes(piece, tensor, tensor.shape)


def _translated(tensor: OutputTensor, recipe: TranslatedTensor, reader: TensorReader,
                tensors: Mapping[str, TensorRef]) -> Iterator[memoryview]:
    spec = TRANSLATIONS[recipe.translation][recipe.output]
    parts = _load_checked(reader, tensors, {spec.needs: recipe.source_name()}, packed_pairs=True)
    yield _as_bytes(spec.make(parts), tensor, tensor.shape)


_PRODUCERS = {CopyBytes: _copy, ExpertTensor: _expert, LinearTensor: _linear, TranslatedTensor: _translated}


def source_names(tensor: OutputTensor) -> list[str]:
    """The source tensors `produce` reads for this output tensor."""
    recipe = tensor.recipe
    if isinstance(recipe, CopyBytes):
        return [recipe.ref.name]
    if isinstance(recipe, TranslatedTensor):
        return [recipe.source_name()]
    if isinstance(recipe, ExpertTensor):
        needs = MOE_SPECS[recipe.layer.variant].outputs[recipe.output].needs
        return [recipe.layer.source_name(recipe.expert, recipe.proj, s) for s in needs]
    return [recipe.module.source_name(s) for s in LINEAR_SPECS[recipe.module.variant].outputs[recipe.output].needs]


def produce(tensor: OutputTensor, reader: TensorReader, tensors: Mapping[str, TensorRef]) -> Iterator[memoryview]:
    """The output tensor's bytes, in order, in pieces of at most 64 MiB for copies."""
    return _PRODUCERS[type(tensor.recipe)](tensor, tensor.recipe, reader, tensors)


def check_small_tensors(plan: Plan, reader: TensorReader) -> None:
    """Every rule on scales, offsets and biases (`check_parts`), checked before the first output byte
    is written. Weights are checked as they are converted; the recipes check the small tensors again."""
    tensors = plan.source.tensors
    for layer in plan.moe_layers:
        suffixes = [s for s in layer.source_suffixes() if s != "weight"]
        packed_pairs = MOE_SPECS[layer.variant].packed_pairs
        for expert in range(layer.num_experts):
            for proj in layer.projections:
                _load_checked(reader, tensors, {s: layer.source_name(expert, proj, s) for s in suffixes},
                              packed_pairs=packed_pairs)
    for tensor in plan.tensors:
        if isinstance(tensor.recipe, TranslatedTensor):
            name = tensor.recipe.source_name()
            _load_checked(reader, tensors, {name.rpartition(".")[2]: name}, packed_pairs=True)
    for module in plan.linears:
        _load_checked(reader, tensors, {s: module.source_name(s) for s in module.source_suffixes() if s != "weight"},
                      packed_pairs=LINEAR_SPECS[module.variant].packed_pairs, model_dtype=plan.source.model_dtype)
