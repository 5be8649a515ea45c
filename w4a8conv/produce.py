"""Executes a plan's recipes: loads the source tensors a recipe needs into reused buffers, applies
the pure transform, and puts the output tensor's bytes into the shard's staging buffers (`staging.py`):
the expert and Linear weights are transformed straight into them, copied tensors are read straight
into them, the small outputs are copied there. Nothing is allocated per tensor in the steady state.

Content rules that need tensor data run here (`check_parts`): on scales, offsets and biases in
`check_small_tensors` before anything is written, and on every value a recipe reads as it converts
it (the int4 range of version "0" weights, and the small tensors again).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from .constants import DOWN_BIAS_CHUNKS
from .errors import InvalidCheckpointError
from .plan import CopyBytes, ExpertTensor, LinearTensor, OutputTensor, Plan, Recipe, TranslatedTensor
from .source.checkpoint import MODEL_DTYPES
from .source.reader import TensorReader
from .source.safetensors_file import TORCH_DTYPES, TensorRef
from .staging import StagedFile
from .transforms import LINEAR_SPECS, MOE_SPECS, TRANSLATIONS
from .transforms.rules import (bias_total_violation, finite_violation, fp16_overflow_violation, int4_range_violation,
                               scale_violation, zero_violation)
from .transforms.scales import fuse_group_scales_fp16, round_to_dtype
from .transforms.workspace import Workspace

__all__ = ["produce", "memory_bytes", "RECIPES", "RecipeRun", "Producer", "check_small_tensors", "check_parts",
           "torch_threads"]


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """The transforms and rules are many small ops; torch's intra-op pool only adds hand-offs (and
    spinning on a busy machine: 100 times slower on a loaded 2-core host), so producing and checking
    run them single-threaded and restore the caller's setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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


@dataclass
class Producer:
    """What producing a shard reuses from one tensor to the next: the reader, a `Workspace` for the
    transforms' temporaries and the source buffers (one per suffix), and which source tensor each
    source buffer holds: a weight two outputs read in a row (version "0": the packed words, then the
    bias) is read and checked once."""

    reader: TensorReader
    workspace: Workspace = field(default_factory=Workspace)
    _held: dict[str, tuple] = field(default_factory=dict)  # suffix -> (file, offset, nbytes) in its buffer
    _parts: dict[str, torch.Tensor] = field(default_factory=dict)

    def announce(self, tensors: Iterable[OutputTensor], refs: Mapping[str, TensorRef]) -> None:
        """The output tensors about to be produced, in order: their sources are read ahead."""
        self.reader.announce(refs[name] for t in tensors for name in t.recipe.sources().values())

    def forget(self) -> None:
        """Drop what the source buffers hold (a new shard or a new run reads everything again)."""
        self._held.clear()
        self._parts.clear()

    def load_checked(self, tensors: Mapping[str, TensorRef], names: Mapping[str, str], *, packed_pairs: bool,
                     model_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """`_load_checked` into the reused source buffers; a part the buffer still holds is not read again."""
        parts, fresh = {}, set()
        for suffix, name in names.items():
            ref = tensors[name]
            key = (ref.file, ref.offset, ref.nbytes)
            if self._held.get(suffix) != key:
                self._held.pop(suffix, None)
                buffer = self.workspace.array(f"source:{suffix}", (max(ref.nbytes, 1),), np.uint8)
                self._parts[suffix] = self.reader.load(ref, buffer)
                self._held[suffix] = key
                fresh.add(suffix)
            parts[suffix] = self._parts[suffix]
        checked = {s: p for s, p in parts.items() if s in fresh or s != "weight"}  # a weight is checked once
        check_parts(checked, {suffix: tensors[name] for suffix, name in names.items()}, packed_pairs=packed_pairs,
                    model_dtype=model_dtype)
        return parts


def _checked_piece(piece: torch.Tensor, tensor: OutputTensor) -> torch.Tensor:
    if tuple(piece.shape) != tensor.shape or piece.dtype != TORCH_DTYPES[tensor.dtype]:
        raise AssertionError(f"{tensor.name}: transform gave {piece.dtype} {list(piece.shape)}, "
                             f"the plan says {tensor.dtype} {list(tensor.shape)}")
    return piece


def _stage(make: Callable[[torch.Tensor | None], torch.Tensor], tensor: OutputTensor, out: StagedFile) -> None:
    """Run a transform with the staging region as its `out` (a weight is written there directly);
    a result elsewhere (a small output, a tensor larger than a staging buffer) is copied in."""
    fits = 0 < tensor.nbytes <= out.capacity
    region = out.reserve(tensor.nbytes) if fits else None
    target = torch.frombuffer(region, dtype=torch.int8) if fits else None
    piece = _checked_piece(make(target), tensor)
    if not tensor.nbytes:
        return
    if target is not None and piece.data_ptr() == target.data_ptr() and piece.is_contiguous():
        return
    data = memoryview(piece.contiguous().numpy()).cast("B")
    if region is not None:
        region[:] = data
    else:
        out.write(data)


def _copy(tensor: OutputTensor, recipe: CopyBytes, producer: Producer, _tensors, out: StagedFile) -> None:
    """Read straight into the staging buffers, a buffer's free room at a time."""
    done = 0
    while done < recipe.ref.nbytes:
        region = out.reserve_some(recipe.ref.nbytes - done)
        producer.reader.read_into(recipe.ref, region, done)
        done += len(region)


def _expert(tensor: OutputTensor, recipe: ExpertTensor, producer: Producer, tensors: Mapping[str, TensorRef],
            out: StagedFile) -> None:
    layer = recipe.layer
    spec = MOE_SPECS[layer.variant]
    is_down = recipe.proj == layer.projections[2]
    names = recipe.sources()
    parts = producer.load_checked(tensors, names, packed_pairs=spec.packed_pairs)
    chunks = DOWN_BIAS_CHUNKS if is_down else 1

    def make(target: torch.Tensor | None) -> torch.Tensor:
        piece = spec.outputs[recipe.output].make(parts, chunks, producer.workspace, target)
        if recipe.output == "scale_bias" and is_down and spec.down_bias_total:
            problem = bias_total_violation(piece, parts["scale_bias"])
            if problem:
                ref = tensors[names["scale_bias"]]
                raise InvalidCheckpointError(problem, file=ref.file, tensor=ref.name)
        if recipe.output == "scale_bias" and not is_down:
            piece = piece.reshape(-1)  # gate/up bias is [out]; down keeps its 16 chunks
        return piece
    _stage(make, tensor, out)


def _linear(tensor: OutputTensor, recipe: LinearTensor, producer: Producer, tensors: Mapping[str, TensorRef],
            out: StagedFile) -> None:
    spec = LINEAR_SPECS[recipe.module.variant]
    dtype = MODEL_DTYPES[recipe.model_dtype]
    parts = producer.load_checked(tensors, recipe.sources(), packed_pairs=spec.packed_pairs, model_dtype=dtype)
    _stage(lambda target: spec.outputs[recipe.output].make(parts, dtype, producer.workspace, target), tensor, out)


def _translated(tensor: OutputTensor, recipe: TranslatedTensor, producer: Producer,
                tensors: Mapping[str, TensorRef], out: StagedFile) -> None:
    parts = producer.load_checked(tensors, recipe.sources(), packed_pairs=True)
    _stage(lambda _target: TRANSLATIONS[recipe.translation][recipe.output].make(parts), tensor, out)


# What producing one output tensor holds in memory at once, per worker (`resources` adds them up).
# Float temporaries per weight element while computing a bias (fp32 values, product, reshape copy).
_BIAS_BYTES_PER_ELEMENT = 12
# int8 transposes and the packed copy per weight element while packing.
_PACK_BYTES_PER_ELEMENT = 3


def _copy_memory(_tensor: OutputTensor, _tensors: Mapping[str, TensorRef]) -> int:
    """Read straight into the staging buffers, which `resources` counts once."""
    return 0


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

    produce: Callable[[OutputTensor, Recipe, Producer, Mapping[str, TensorRef], StagedFile], None]
    memory_bytes: Callable[[OutputTensor, Mapping[str, TensorRef]], int]


RECIPES: dict[type, RecipeRun] = {
    CopyBytes: RecipeRun(_copy, _copy_memory),
    ExpertTensor: RecipeRun(_expert, _expert_memory),
    LinearTensor: RecipeRun(_linear, _linear_memory),
    TranslatedTensor: RecipeRun(_translated, _translated_memory),
}


def produce(tensor: OutputTensor, producer: Producer, tensors: Mapping[str, TensorRef], out: StagedFile) -> None:
    """Put the output tensor's bytes, in order, into `out`; `tensors` holds at least the recipe's
    `sources()`."""
    RECIPES[type(tensor.recipe)].produce(tensor, tensor.recipe, producer, tensors, out)


def memory_bytes(tensor: OutputTensor, tensors: Mapping[str, TensorRef]) -> int:
    """Bytes producing this output tensor holds at once (one expert projection's parts, or one copy chunk)."""
    return RECIPES[type(tensor.recipe)].memory_bytes(tensor, tensors)


def check_small_tensors(plan: Plan, reader: TensorReader) -> None:
    """Every rule on scales, offsets and biases (`check_parts`), checked before the first output byte
    is written. Weights are checked as they are converted; the recipes check the small tensors again."""
    with torch_threads(1):
        _check_small_tensors(plan, reader)


def _check_small_tensors(plan: Plan, reader: TensorReader) -> None:
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
