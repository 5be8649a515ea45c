"""Executes a plan's recipes: loads the source tensors a recipe needs, applies the pure transform,
and yields the output tensor's bytes (copied tensors in chunks).

Content rules that need tensor data run here (`check_parts`): on scales, offsets and biases in
`check_small_tensors` before anything is written, and on every value a recipe reads as it converts
it (the int4 range of version "0" weights, and the small tensors again).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

from .constants import DOWN_BIAS_CHUNKS
from .errors import InvalidCheckpointError
from .plan import CopyBytes, ExpertTensor, LinearTensor, OutputTensor, Plan, Recipe, TranslatedTensor
from .source.checkpoint import MODEL_DTYPES
from .source.reader import TensorReader
from .source.safetensors_file import TORCH_DTYPES, TensorRef
from .transforms import LINEAR_SPECS, MOE_SPECS, TRANSLATIONS
from .transforms.rules import (bias_total_violation, finite_violation, fp16_overflow_violation, int4_range_violation,
                               scale_violation, zero_violation)
from .transforms.scales import fuse_group_scales_fp16, round_to_dtype

__all__ = ["produce", "memory_bytes", "RECIPES", "RecipeRun", "check_small_tensors", "check_parts",
           "COPY_CHUNK_BYTES"]

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
    is_down = recipe.proj == layer.projections[2]
    names = recipe.sources()
    parts = _load_checked(reader, tensors, names, packed_pairs=spec.packed_pairs)
    piece = spec.outputs[recipe.output].make(parts, DOWN_BIAS_CHUNKS if is_down else 1)
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
    dtype = MODEL_DTYPES[recipe.model_dtype]
    parts = _load_checked(reader, tensors, recipe.sources(), packed_pairs=spec.packed_pairs, model_dtype=dtype)
    yield _as_bytes(spec.outputs[recipe.output].make(parts, dtype), tensor, tensor.shape)


def _translated(tensor: OutputTensor, recipe: TranslatedTensor, reader: TensorReader,
                tensors: Mapping[str, TensorRef]) -> Iterator[memoryview]:
    parts = _load_checked(reader, tensors, recipe.sources(), packed_pairs=True)
    yield _as_bytes(TRANSLATIONS[recipe.translation][recipe.output].make(parts), tensor, tensor.shape)


# What producing one output tensor holds in memory at once, per worker (`resources` adds them up).
# Float temporaries per weight element while computing a bias (fp32 values, product, reshape copy).
_BIAS_BYTES_PER_ELEMENT = 12
# int8 transposes and the packed copy per weight element while packing.
_PACK_BYTES_PER_ELEMENT = 3


def _copy_memory(tensor: OutputTensor, _tensors: Mapping[str, TensorRef]) -> int:
    return min(COPY_CHUNK_BYTES, tensor.nbytes)


def _translated_memory(tensor: OutputTensor, tensors: Mapping[str, TensorRef]) -> int:
    """A scale-sized tensor and its source."""
    return tensor.nbytes + sum(tensors[n].nbytes for n in tensor.recipe.sources().values())


def _converted_memory(tensor: OutputTensor, tensors: Mapping[str, TensorRef], out: int, inp: int) -> int:
    """The source parts, the output piece, and the transform's temporaries over the [out, in] weight."""
    names = tensor.recipe.sources()
    loaded = sum(tensors[n].nbytes for n in names.values())
    per_element = _BIAS_BYTES_PER_ELEMENT if tensor.recipe.output.endswith("bias") else _PACK_BYTES_PER_ELEMENT
    return loaded + tensor.nbytes + (per_element * out * inp if "weight" in names else 2 * loaded)


def _expert_memory(tensor: OutputTensor, tensors: Mapping[str, TensorRef]) -> int:
    return _converted_memory(tensor, tensors, *tensor.recipe.layer.dims(tensor.recipe.proj))


def _linear_memory(tensor: OutputTensor, tensors: Mapping[str, TensorRef]) -> int:
    module = tensor.recipe.module
    return _converted_memory(tensor, tensors, module.out_features, module.in_features)


@dataclass(frozen=True)
class RecipeRun:
    """How one recipe type is carried out: its output's bytes in order, and the bytes that takes in memory."""

    produce: Callable[[OutputTensor, Recipe, TensorReader, Mapping[str, TensorRef]], Iterator[memoryview]]
    memory_bytes: Callable[[OutputTensor, Mapping[str, TensorRef]], int]


RECIPES: dict[type, RecipeRun] = {
    CopyBytes: RecipeRun(_copy, _copy_memory),
    ExpertTensor: RecipeRun(_expert, _expert_memory),
    LinearTensor: RecipeRun(_linear, _linear_memory),
    TranslatedTensor: RecipeRun(_translated, _translated_memory),
}


def produce(tensor: OutputTensor, reader: TensorReader, tensors: Mapping[str, TensorRef]) -> Iterator[memoryview]:
    """The output tensor's bytes, in order, in pieces of at most 64 MiB for copies; `tensors` holds at
    least the recipe's `sources()`."""
    return RECIPES[type(tensor.recipe)].produce(tensor, tensor.recipe, reader, tensors)


def memory_bytes(tensor: OutputTensor, tensors: Mapping[str, TensorRef]) -> int:
    """Bytes producing this output tensor holds at once (one expert projection's parts, or one copy chunk)."""
    return RECIPES[type(tensor.recipe)].memory_bytes(tensor, tensors)


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
        if type(tensor.recipe) is TranslatedTensor:
            _load_checked(reader, tensors, tensor.recipe.sources(), packed_pairs=True)
    for module in plan.linears:
        _load_checked(reader, tensors, {s: module.source_name(s) for s in module.source_suffixes() if s != "weight"},
                      packed_pairs=LINEAR_SPECS[module.variant].packed_pairs, model_dtype=plan.source.model_dtype)
