"""Executes a plan's recipes: loads the source tensors a recipe needs, applies the pure transform,
and yields the output tensor's bytes (copied tensors in chunks).

Content rules that need tensor data run here: `check_small_tensors` before anything is written,
and the int4 range of version "0" weights as each weight is read.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

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

__all__ = ["produce", "source_names", "check_small_tensors", "COPY_CHUNK_BYTES"]

COPY_CHUNK_BYTES = 64 * 2**20


_SMALL_TENSOR_RULES = {
    "weight_scale": scale_violation, "weight_scale_second": scale_violation,
    "weight_offset": zero_violation, "weight_offset_second": zero_violation, "scale_bias": finite_violation,
}


def _load_parts(reader: TensorReader, tensors: Mapping[str, TensorRef], names: Mapping[str, str],
                rules: Mapping[str, Callable[[torch.Tensor], str | None]]) -> dict[str, torch.Tensor]:
    """Load a projection's source tensors, applying the rule of each suffix that has one."""
    parts = {}
    for suffix, name in names.items():
        ref = tensors[name]
        parts[suffix] = tensor = reader.load(ref)
        rule = rules.get(suffix)
        problem = rule(tensor) if rule else None
        if problem:
            raise InvalidCheckpointError(problem, file=ref.file, tensor=ref.name)
    return parts


def _weight_rules(packed_pairs: bool) -> dict[str, Callable[[torch.Tensor], str | None]]:
    """While converting, only version "0" weights still need a check (the rest passed `check_small_tensors`)."""
    return {} if packed_pairs else {"weight": int4_range_violation}


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
    parts = _load_parts(reader, tensors, names, _weight_rules(spec.packed_pairs))
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
    piece = output.make(_load_parts(reader, tensors, names, _weight_rules(spec.packed_pairs)),
                        MODEL_DTYPES[recipe.model_dtype])
    yield _as_bytes(piece, tensor, tensor.shape)


def _translated(tensor: OutputTensor, recipe: TranslatedTensor, reader: TensorReader,
                tensors: Mapping[str, TensorRef]) -> Iterator[memoryview]:
    spec = TRANSLATIONS[recipe.translation][recipe.output]
    parts = _load_parts(reader, tensors, {spec.needs: recipe.source_name()}, _SMALL_TENSOR_RULES)
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
    """Every rule on scales, offsets and biases, checked before the first output byte is written.

    Also refuses fused per-group scales that overflow fp16 (vllm-ascend would serve inf) and Linear
    scales that overflow the model dtype. Weights are checked as they are converted.
    """
    tensors = plan.source.tensors
    for layer in plan.moe_layers:
        suffixes = [s for s in layer.source_suffixes() if s != "weight"]
        for expert in range(layer.num_experts):
            for proj in layer.projections:
                names = {s: layer.source_name(expert, proj, s) for s in suffixes}
                parts = _load_parts(reader, tensors, names, _SMALL_TENSOR_RULES)
                if "weight_scale_second" in parts:
                    fused = fuse_group_scales_fp16(parts["weight_scale"], parts["weight_scale_second"])
                    problem = fp16_overflow_violation(fused)
                    if problem:
                        ref = tensors[names["weight_scale_second"]]
                        raise InvalidCheckpointError(problem, file=ref.file, tensor=ref.name)
    for tensor in plan.tensors:
        if isinstance(tensor.recipe, TranslatedTensor):
            name = tensor.recipe.source_name()
            _load_parts(reader, tensors, {name.rpartition(".")[2]: name}, _SMALL_TENSOR_RULES)
    for module in plan.linears:
        names = {s: module.source_name(s) for s in module.source_suffixes() if s != "weight"}
        parts = _load_parts(reader, tensors, names, _SMALL_TENSOR_RULES)
        dtype = plan.source.model_dtype
        for suffix in ("weight_scale", "weight_scale_second"):
            if finite_violation(round_to_dtype(parts[suffix], dtype)):
                ref = tensors[names[suffix]]
                raise InvalidCheckpointError(f"scale overflows the model dtype {dtype}", file=ref.file,
                                             tensor=ref.name)
