"""vLLM plugin: serve w4a8conv's converted checkpoints from vllm-ascend without re-processing.

`register` is the `vllm.general_plugins` entry point; vLLM calls it in every process. It adds the
converted type (W4A8_DYNAMIC_NPU) to vllm-ascend for FusedMoE and Linear layers, the way the
installed release line keeps its quantization schemes (`RELEASES`): vllm-ascend 0.11 and 0.13 look
them up in `ASCEND_QUANTIZATION_METHOD_MAP`, 0.14 and later in the `register_scheme` registry. The
schemes are vllm-ascend's own W4A8_DYNAMIC ones with a mixin of ours in front (`_ConvertedMoE`,
`_ConvertedLinear`, combined with the release's classes at `register`), so serving (`apply`) is
vllm-ascend's code:

* parameters are created in the converted, final shapes for this rank (docs/format.md), in the
  shapes the release's own `process_weights_after_loading` leaves (0.20+ squeezes the per-channel
  `w13_weight_scale`);
* each gets a weight loader of ours: converted tensors are in kernel orientation, where vLLM's
  loaders would cut the wrong axis. Expert tensors arrive through vLLM's usual expert routing
  (`experts.<e>.<proj>.` -> `w13_`/`w2_`), one expert at a time, and are cut for the rank by
  `split.expert_rank_part`, the same code the checkpoint view uses;
* `process_weights_after_loading` checks that every part of every parameter was loaded, then does
  what the release still does on the device: its FRACTAL_NZ cast of the weights, which vllm-ascend
  applies to the int8 bytes before viewing them as int32 (so the plugin casts an int8 view of the
  stored int32 words and views the result as int32 again), and on releases whose W4A8 experts
  support dynamic EPLB, the per-expert lists EPLB moves experts with.

Anything it cannot serve exactly is refused with `ServingError` / `NotConvertedError` /
`UnsupportedSplitError`: a description without a valid stamp, a layout version it does not know, a
layer the stamp does not describe, a split the layout cannot cut, a vllm-ascend release line not in
`RELEASES`, a mode the release's W4A8 code does not support, or a parameter left (partly) unloaded.
Which lines can serve is decided here at load, from `RELEASES`, not from the stamp (whose
`serving_releases` records the lines of the w4a8conv that wrote it), so a newer plugin serves an
older output.

vllm-ascend wraps each scheme in `AscendFusedMoEMethod` / `AscendLinearMethod`, whose `create_weights`
registers the parameters with vLLM's weight loader; the schemes cannot see the layer before that.
`register` therefore wraps those two `create_weights` once, to hand the layer to a scheme of ours
right after; the wrapper does nothing for other schemes.

Nothing here imports vllm, vllm_ascend or torch_npu until `register` runs in a process that has them.
"""
from __future__ import annotations

import functools
import importlib
import importlib.metadata
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from ..constants import CONVERTED_TYPE, DESCRIPTION_NAME, DOWN_BIAS_CHUNKS, INT4_PER_INT32
from ..dtypes import TORCH_DTYPES
from ..errors import ServingError, UnsupportedSplitError
from ..layout import MOE_PARAMS, linear_tensor_specs, moe_param_specs
from ..stamp import LinearRecord, ModuleRecord, MoeRecord, Stamp
from .checkpoint import NpuReadyCheckpoint
from .split import check_tp, expert_rank_part, linear_output_axis, linear_rank_part

__all__ = ["register", "RELEASES", "SUPPORTED_VLLM_ASCEND", "serving_release_lines"]

_KINDS = ("moe", "linear")


@dataclass(frozen=True)
class Mechanism:
    """How a vllm-ascend release line keeps its quantization schemes: the module of its W4A8_DYNAMIC
    classes, the module of the wrappers that create their parameters, and how a type is added."""

    base_module: str
    wrappers_module: str
    installed: Callable[[], dict[str, type | None]]  # kind -> the class registered for the converted type
    install: Callable[[dict[str, type]], None]


def _map_installed() -> dict[str, type | None]:
    registered = importlib.import_module("vllm_ascend.quantization.utils").ASCEND_QUANTIZATION_METHOD_MAP
    return {kind: registered.get(CONVERTED_TYPE, {}).get(kind) for kind in _KINDS}


def _map_install(schemes: dict[str, type]) -> None:
    importlib.import_module("vllm_ascend.quantization.utils").ASCEND_QUANTIZATION_METHOD_MAP[CONVERTED_TYPE] = schemes


def _registry_installed() -> dict[str, type | None]:
    registry = importlib.import_module("vllm_ascend.quantization.methods.registry")
    return {kind: registry.get_scheme_class(CONVERTED_TYPE, kind) for kind in _KINDS}


def _registry_install(schemes: dict[str, type]) -> None:
    registry = importlib.import_module("vllm_ascend.quantization.methods.registry")
    for kind, scheme in schemes.items():
        registry.register_scheme(CONVERTED_TYPE, kind)(scheme)  # raises on a duplicate: checked before


METHOD_MAP = Mechanism(base_module="vllm_ascend.quantization.w4a8_dynamic",
                       wrappers_module="vllm_ascend.quantization.quant_config",
                       installed=_map_installed, install=_map_install)
SCHEME_REGISTRY = Mechanism(base_module="vllm_ascend.quantization.methods.w4a8",
                            wrappers_module="vllm_ascend.quantization.method_adapters",
                            installed=_registry_installed, install=_registry_install)


@dataclass(frozen=True)
class NativeNames:
    """How a release resolves a model's native checkpoint module names (DeepSeek-V4's `layers.L.ffn`,
    `mtp.0.ffn`) to the prefixes vLLM builds its layers under: as vllm-ascend 0.23's modelslim config
    does with the description's keys (`_apply_extra_quant_adaptations`, for a description holding
    `hc_head_fn`), each name also stands with `leading` in front and with every `old` part replaced by
    `new`, one rule after the other, the names before each rule kept."""

    leading: str
    renames: tuple[tuple[str, str], ...]

    def aliases(self, module: str) -> set[str]:
        names = {module, module if module.startswith(self.leading) else self.leading + module}
        for old, new in self.renames:
            names |= {name.replace(old, new) for name in names}
        return names


# vllm-ascend 0.23 (models/deepseek_v4.py, its loops rename weights the same way): `layers.1.ffn` is
# served as `model.layers.1.mlp`, the MTP layer `mtp.0.ffn` as `mtp.0.mlp` (its draft model's prefix)
DEEPSEEK_V4_NAMES = NativeNames(leading="model.", renames=(("ffn", "mlp"),))


@dataclass(frozen=True)
class Release:
    """What differs between vllm-ascend release lines for serving converted W4A8 weights."""

    mechanism: Mechanism
    # the FRACTAL_NZ cast: "format_cast" (torch_npu.npu_format_cast, always) or "maybe_trans_nz" (the
    # release's own switch: VLLM_ASCEND_ENABLE_NZ; from 0.20 the weight_nz_mode setting, falling back to it)
    nz_cast: str
    linear_nz: bool               # Linear weights are cast too
    squeezed_channel_scale: bool  # per-channel w13_weight_scale is [E, 2Ip], not [E, 1, 2Ip] (0.20+)
    dynamic_eplb: bool            # W4A8 experts support dynamic EPLB: per-expert lists after the NZ cast (0.20+)
    bias_chunks_over: str         # the group whose size sets the release's down_proj bias chunks per rank
    # models vllm-ascend implements itself in this line (vLLM's own models are in every line), by config.json
    # model_type, with how it resolves their native module names; an output of such a model is served
    # only by the lines that have it
    models: Mapping[str, NativeNames] = field(default_factory=dict)


# Release lines whose serving code this plugin was exercised against (tests/test_vllm_plugin.py), each
# with the vLLM release it pins. 0.12 and 0.14-0.17 exist as release candidates only; 0.19-0.22 were
# not exercised.
RELEASES = {
    (0, 11): Release(METHOD_MAP, nz_cast="format_cast", linear_nz=False, squeezed_channel_scale=False,
                     dynamic_eplb=False, bias_chunks_over="expert-parallel group"),
    (0, 13): Release(METHOD_MAP, nz_cast="maybe_trans_nz", linear_nz=True, squeezed_channel_scale=False,
                     dynamic_eplb=False, bias_chunks_over="expert-parallel group"),
    (0, 18): Release(SCHEME_REGISTRY, nz_cast="maybe_trans_nz", linear_nz=True, squeezed_channel_scale=False,
                     dynamic_eplb=False, bias_chunks_over="expert-parallel group"),
    # 0.23.0 and 0.23.0.post1 (an sdist, the same W4A8 code), served through vLLM 0.23.0's FusedMoE
    (0, 23): Release(SCHEME_REGISTRY, nz_cast="maybe_trans_nz", linear_nz=True, squeezed_channel_scale=True,
                     dynamic_eplb=True, bias_chunks_over="tensor-parallel world",
                     models={"deepseek_v4": DEEPSEEK_V4_NAMES}),
}
SUPPORTED_VLLM_ASCEND = tuple(RELEASES)
_MARK = "_w4a8conv_scheme"
_SHARD_IDS = {"q": 0, "k": 1, "v": 2}


def serving_release_lines(model_type: str | None = None) -> list[str]:
    """The vllm-ascend release lines this plugin serves converted checkpoints on ("0.11", ...); with the
    config.json `model_type` of an output, those that serve it: a model some line implements itself
    (`Release.models`) only on the lines that have it, any other model on every line."""
    own = any(model_type in release.models for release in RELEASES.values())
    return [f"{major}.{minor}" for (major, minor), release in RELEASES.items()
            if not own or model_type in release.models]


def _vllm_ascend_version() -> str | None:
    for name in ("vllm-ascend", "vllm_ascend"):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _release(version: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else (-1, -1)


def register() -> None:
    """Register the converted type with vllm-ascend; idempotent, and a no-op without vllm-ascend."""
    version = _vllm_ascend_version()
    if version is None:
        return  # not an Ascend serving environment: nothing to serve here
    release = RELEASES.get(_release(version))
    if release is None:
        supported = ", ".join(f"{line}.x" for line in serving_release_lines())
        raise ServingError(f"w4a8conv serves {CONVERTED_TYPE} checkpoints with vllm-ascend {supported}; "
                           f"vllm-ascend {version} is installed. Install a supported release, or remove "
                           "w4a8conv from this environment.")
    mechanism = release.mechanism
    installed = mechanism.installed()
    ours = [getattr(installed[kind], _MARK, False) for kind in _KINDS]
    if not all(ours):
        if any(ours) or any(installed[kind] is not None for kind in _KINDS):
            raise ServingError(f"vllm-ascend {version} already has schemes for {CONVERTED_TYPE} "
                               f"({installed}) that are not w4a8conv's; remove the other plugin")
        base = importlib.import_module(mechanism.base_module)
        mechanism.install({
            "moe": _combine(_ConvertedMoE, base.AscendW4A8DynamicFusedMoEMethod, release),
            "linear": _combine(_ConvertedLinear, base.AscendW4A8DynamicLinearMethod, release),
        })
    wrappers = importlib.import_module(mechanism.wrappers_module)
    for wrapper in (wrappers.AscendFusedMoEMethod, wrappers.AscendLinearMethod):
        _hand_layer_to_scheme(wrapper)


def _combine(mixin: type, base: type, release: Release) -> type:
    """Our scheme for this release: the mixin in front of vllm-ascend's class (whose `apply` serves)."""
    name = mixin.__name__.lstrip("_") + "Scheme"
    return type(name, (mixin, base), {"release": release, _MARK: True, "__module__": __name__,
                                      "__doc__": mixin.__doc__})


def _hand_layer_to_scheme(wrapper: type) -> None:
    original = wrapper.create_weights
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def create_weights(self, layer, *args, **kwargs):
        original(self, layer, *args, **kwargs)
        scheme = getattr(self, "quant_method", None)
        if getattr(scheme, _MARK, False):
            scheme.attach(layer)

    setattr(create_weights, _MARK, True)
    wrapper.create_weights = create_weights


# ------------------------------------------------------------------------------------------------
# What every scheme shares


def _description() -> dict:
    config = importlib.import_module("vllm.config").get_current_vllm_config()
    return config.quant_config.quant_description


def _stamp() -> Stamp:
    stamp = Stamp.of_description(_description(), file=DESCRIPTION_NAME + " (as vLLM loaded it)")
    config = importlib.import_module("vllm.config").get_current_vllm_config()
    model = getattr(getattr(config, "model_config", None), "model", None)
    if isinstance(model, str) and os.path.isdir(model):
        _check_shards_on_disk(model)
    return stamp


@functools.cache
def _check_shards_on_disk(model: str) -> None:
    """Once per process, before vLLM maps the shards: each one's size and header against the stamp and
    the index (a changed file is a `NotConvertedError` naming it, not a wrong model or a crash)."""
    NpuReadyCheckpoint.open(model).close()


def _model_type() -> str | None:
    config = importlib.import_module("vllm.config").get_current_vllm_config()
    return getattr(getattr(getattr(config, "model_config", None), "hf_config", None), "model_type", None)


def _record(stamp: Stamp, prefix: str, kind: type[MoeRecord] | type[LinearRecord],
            release: Release) -> tuple[str, ModuleRecord]:
    """The stamp's record of the module a layer serves: under vLLM's prefix (vllm-ascend drops a leading
    `language_model.`), or under the native name the release resolves to that prefix for its own model."""
    for candidate in (prefix, prefix.removeprefix("language_model."), "language_model." + prefix):
        record = stamp.modules.get(candidate)
        if isinstance(record, kind):
            return candidate, record
    names = release.models.get(_model_type())
    if names is not None:
        for module, record in stamp.records(kind).items():
            if prefix in names.aliases(module):
                return module, record
    raise ServingError(f"{prefix}: the checkpoint's stamp records no converted {kind.kind} layer of that name, so "
                       "its parameters cannot be checked against the stored tensors")


class _Loads:
    """Which parts of each parameter were written: a flag per (index, shard) and a name for errors."""

    def __init__(self, layer_name: str):
        self.layer_name = layer_name
        self.marks: dict[str, torch.Tensor] = {}

    def expect(self, param: str, rows: int, shards: int) -> None:
        self.marks[param] = torch.zeros(rows, shards, dtype=torch.bool)

    def mark(self, param: str, row: int | slice, shard: int | slice) -> None:
        self.marks[param][row, shard] = True

    def check(self) -> None:
        missing = {name: (~mark).nonzero().tolist() for name, mark in self.marks.items() if not bool(mark.all())}
        if missing:
            detail = "; ".join(f"{name} at (row, shard) {where[:4]}{' ...' if len(where) > 4 else ''}"
                               for name, where in missing.items())
            raise ServingError(f"{self.layer_name}: parameters left unloaded ({detail}): the checkpoint lacks "
                               "tensors this rank needs, or the model's loader routed them elsewhere")


def _copy(dest: torch.Tensor, part: torch.Tensor, what: str) -> None:
    if tuple(dest.shape) != tuple(part.shape) or dest.dtype != part.dtype:
        raise ServingError(f"{what}: stored {part.dtype} {list(part.shape)} does not fit the parameter's "
                           f"{dest.dtype} {list(dest.shape)}")
    dest.copy_(part)


# ------------------------------------------------------------------------------------------------
# MoE experts


_WEIGHTS = ("w13_weight", "w2_weight")  # what the release casts to FRACTAL_NZ
_SHARD_NAMES = {False: ("w1", "w3"), True: ("w2",)}  # vLLM's expert shard ids: w13's halves, or w2


def _nz_cast(release: Release, weight: torch.Tensor) -> torch.Tensor:
    """The release's own FRACTAL_NZ cast of int32 words, applied as vllm-ascend applies it: to the int8
    bytes (the int4 pairs its checkpoints hold), whose NZ tiling differs from an int32 cast's; the
    result is viewed as int32 again. A device layout step: the one thing left to do on the device."""
    return _nz_cast_int8(release, weight.view(torch.int8)).view(torch.int32)


def _nz_cast_int8(release: Release, weight: torch.Tensor) -> torch.Tensor:
    utils = importlib.import_module("vllm_ascend.utils")
    if release.nz_cast == "format_cast":
        return importlib.import_module("torch_npu").npu_format_cast(weight, utils.ACL_FORMAT_FRACTAL_NZ)
    return getattr(utils, release.nz_cast)(weight)


class _ConvertedMoE:
    """vllm-ascend's W4A8_DYNAMIC experts (its `apply`), fed the converted tensors as stored."""

    release: Release  # set by `_combine`

    def __init__(self):
        super().__init__()
        self.stamp = _stamp()
        self.group_size = self.stamp.source.group_size
        self.is_per_channel_weight = self.group_size == 0
        if self.dynamic_eplb and not self.release.dynamic_eplb:
            raise ServingError("dynamic EPLB: this vllm-ascend release does not move W4A8 experts (its EPLB "
                               "refuses W4A8); serve with dynamic EPLB off")

    def _params(self, num_experts, intermediate_size_per_partition, hidden_sizes, weights: bool):
        specs = moe_param_specs(int(num_experts), hidden_sizes, intermediate_size_per_partition, self.group_size)
        if not self.group_size and self.release.squeezed_channel_scale:
            dtype, (e, _one, columns) = specs["w13_weight_scale"]
            specs["w13_weight_scale"] = dtype, (e, columns)
        return {name: torch.empty(shape, dtype=TORCH_DTYPES[dtype]) for name, (dtype, shape) in specs.items()
                if (name in _WEIGHTS) == weights}

    def get_weight(self, num_experts, intermediate_size_per_partition, hidden_sizes, params_dtype):
        return self._params(num_experts, intermediate_size_per_partition, hidden_sizes, weights=True)

    def get_dynamic_quant_param(self, num_experts, intermediate_size_per_partition, hidden_sizes, params_dtype):
        return self._params(num_experts, intermediate_size_per_partition, hidden_sizes, weights=False)

    def attach(self, layer: torch.nn.Module) -> None:
        """Check the layer against the stamp and give its parameters our loaders."""
        name = layer.layer_name
        prefix, record = _record(self.stamp, name.removesuffix(".experts"), MoeRecord, self.release)
        tp_size, tp_rank = layer.tp_size, layer.tp_rank
        check_tp(prefix, record.intermediate, record.group_size, tp_size)
        if layer.intermediate_size_per_partition * tp_size != record.intermediate \
                or layer.hidden_size != record.hidden or record.group_size != self.group_size:
            raise ServingError(f"{name}: vLLM builds hidden {layer.hidden_size}, intermediate "
                               f"{layer.intermediate_size_per_partition} x TP {tp_size}, group {self.group_size}; "
                               f"the checkpoint holds hidden {record.hidden}, intermediate "
                               f"{record.intermediate}, group {record.group_size}")
        if self.tp_size != tp_size:
            raise UnsupportedSplitError(
                f"{name}: vLLM splits the experts over {tp_size} MoE tensor-parallel ranks, while this "
                f"vllm-ascend release shares the {DOWN_BIAS_CHUNKS} down_proj bias chunks over its "
                f"{self.release.bias_chunks_over} ({self.tp_size} ranks), so its own loading leaves part of that bias unwritten; serve with "
                "expert parallelism, or without data parallelism")
        local_of = _local_experts(layer, record.num_experts, name)
        loads = _Loads(name)
        for param, spec in MOE_PARAMS.items():
            shards = _SHARD_NAMES[spec.down]
            loads.expect(param, len(local_of), len(shards))
            getattr(layer, param).weight_loader = _expert_loader(
                layer_name=name, param=param, output=spec.output, shards=shards, local_of=local_of, loads=loads,
                cut=functools.partial(expert_rank_part, intermediate=record.intermediate,
                                      group_size=record.group_size, tp_size=tp_size, tp_rank=tp_rank))
        layer.w4a8conv_loads = loads

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        layer.w4a8conv_loads.check()
        del layer.w4a8conv_loads
        weights = {param: _nz_cast_int8(self.release, getattr(layer, param).data.view(torch.int8))
                   for param in _WEIGHTS}
        if not self.dynamic_eplb:
            for param, weight in weights.items():
                getattr(layer, param).data = weight.view(torch.int32)
            return
        # As the release does for dynamic EPLB: per-expert copies (the weights as NZ-cast int8, which its
        # `apply` views as int32) replace the parameters, for EPLB to move experts between ranks.
        for param in MOE_PARAMS:
            tensor = weights.get(param, getattr(layer, param).data)
            setattr(layer, f"{param}_list", [expert.clone() for expert in tensor.unbind(dim=0)])
            delattr(layer, param)


def _local_experts(layer: torch.nn.Module, num_experts: int, name: str) -> dict[int, int]:
    """Global expert id -> this rank's slot, from vLLM's expert map (None: every expert is local)."""
    expert_map = getattr(layer, "expert_map", None)
    if getattr(layer, "global_num_experts", num_experts) != num_experts:
        raise UnsupportedSplitError(f"{name}: vLLM serves {layer.global_num_experts} physical experts, the "
                                    f"checkpoint holds {num_experts}; redundant experts are not supported")
    if expert_map is None:
        return {e: e for e in range(num_experts)}
    slots = {e: int(slot) for e, slot in enumerate(expert_map.tolist()) if slot >= 0}
    if sorted(slots.values()) != list(range(int(layer.local_num_experts))):
        raise UnsupportedSplitError(f"{name}: the expert map does not give each of the rank's "
                                    f"{int(layer.local_num_experts)} slots exactly one expert")
    return slots


def _expert_loader(*, layer_name: str, param: str, output: str, shards: tuple[str, ...], local_of: dict[int, int],
                   loads: _Loads, cut: Callable[..., torch.Tensor]):
    def load(parameter, loaded_weight, weight_name=None, shard_id=None, expert_id=None, return_success=False):
        if shard_id not in shards or expert_id is None:
            raise ServingError(f"{layer_name}.{param}: got {weight_name or 'a tensor'} with shard {shard_id!r}, "
                               f"expert {expert_id!r}; converted experts load one expert projection at a time")
        slot = local_of.get(int(expert_id))
        if slot is None:
            return False if return_success else None  # another rank's expert
        part = cut(output, shard_id == "w2", loaded_weight)
        dest = parameter.data[slot]
        if len(shards) == 2:  # w13: gate's columns, then up's
            half = dest.shape[-1] // 2
            dest = dest[..., :half] if shard_id == "w1" else dest[..., half:]
        if part.dim() == dest.dim() + 1 and part.shape[0] == 1:  # the release's squeezed per-channel scale
            part = part.squeeze(0)
        _copy(dest, part.to(dest.device), f"{weight_name or layer_name} -> {param}[{slot}]")
        loads.mark(param, slot, shards.index(shard_id))
        return True if return_success else None

    return load


# ------------------------------------------------------------------------------------------------
# Linear layers


class _ConvertedLinear:
    """vllm-ascend's W4A8_DYNAMIC Linear (its `apply`), fed the converted tensors as stored."""

    release: Release  # set by `_combine`


    def __init__(self):
        super().__init__()
        self.stamp = _stamp()
        self.group_size = self.stamp.source.group_size
        self.bias_name = self.stamp.linear_bias_name  # None: no Linear layer converted (refused if vLLM builds one)

    def get_weight(self, input_size, output_size, params_dtype):
        return {"weight": torch.empty(input_size, output_size // INT4_PER_INT32, dtype=torch.int32)}

    @staticmethod
    def get_pertensor_param(params_dtype, **_):
        return {}

    @staticmethod
    def get_perchannel_param(output_size, params_dtype, **_):
        return {}

    def get_pergroup_param(self, input_size, output_size, params_dtype, layer_type=None):
        if self.bias_name is None:
            raise ServingError(f"the checkpoint's stamp records no converted linear layer, while vLLM builds a "
                               f"{CONVERTED_TYPE} Linear layer")
        # vllm-ascend keeps a row-parallel "1.0.0" layer's bias chunks (the partial sums over its input)
        columns = DOWN_BIAS_CHUNKS if layer_type == "row" and self.bias_name == "scale_bias" else 1
        specs = linear_tensor_specs("", output_size, input_size, self.group_size, self.bias_name, columns)
        return {param: torch.empty(shape, dtype=torch.float32)
                for param, (_name, (_dtype, shape)) in specs.items() if param != "weight"}

    def attach(self, layer: torch.nn.Module) -> None:
        name = layer.prefix
        records = [_record(self.stamp, shard, LinearRecord, self.release)[1] for shard in _shards(layer, name)]
        sizes = [r.out_features for r in records]
        inputs = {r.in_features for r in records}
        if list(getattr(layer, "output_sizes", sizes)) != sizes or inputs != {layer.input_size}:
            raise ServingError(f"{name}: vLLM builds outputs {list(layer.output_sizes)} x input "
                               f"{layer.input_size}; the checkpoint holds {sizes} x {sorted(inputs)}")
        tp_size, tp_rank = getattr(layer, "tp_size", 1), getattr(layer, "tp_rank", 0)
        row_parallel = isinstance(layer, importlib.import_module("vllm.model_executor.layers.linear")
                                  .RowParallelLinear)
        _check_linear_split(name, sizes, layer.input_size, self.group_size, tp_size, row_parallel,
                            partial_bias=self.bias_name == "weight_scale_bias",
                            kv_heads=hasattr(layer, "num_kv_heads"))
        local = sizes if row_parallel else [size // tp_size for size in sizes]
        cut = functools.partial(linear_rank_part, row_parallel=row_parallel, tp_size=tp_size, tp_rank=tp_rank)
        loads = _Loads(name)
        for param in ("weight", "weight_scale_second", self.bias_name):
            loads.expect(param, 1, len(sizes))
            getattr(layer, param).weight_loader = _linear_loader(name, param, local, loads, cut)
        layer.w4a8conv_loads = loads

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        layer.w4a8conv_loads.check()
        del layer.w4a8conv_loads
        if self.release.linear_nz:
            layer.weight.data = _nz_cast(self.release, layer.weight.data)


def _shards(layer: torch.nn.Module, prefix: str) -> list[str]:
    """The checkpoint modules a vLLM layer merges (gate_proj + up_proj -> gate_up_proj), in shard order,
    by the mapping vllm-ascend itself resolves merged layers with."""
    mapping = getattr(getattr(layer, "quant_config", None), "packed_modules_mapping", None) or {}
    proj = prefix.rsplit(".", 1)[-1]
    return [prefix.replace(proj, shard) for shard in mapping[proj]] if proj in mapping else [prefix]


def _check_linear_split(name: str, sizes: list[int], input_size: int, group_size: int, tp_size: int,
                        row_parallel: bool, *, partial_bias: bool, kv_heads: bool) -> None:
    """Refuse a tensor-parallel Linear split the stored tensors cannot be cut into exactly."""
    if tp_size == 1:
        return
    def refuse(rule: str) -> UnsupportedSplitError:
        return UnsupportedSplitError(f"{name}: tensor-parallel size {tp_size}: {rule}")

    if row_parallel:
        if partial_bias:
            raise refuse("a row-parallel version \"0\" layer's bias is a sum over each rank's input slice, and "
                         "the checkpoint stores it over the whole input")
        part = input_size // tp_size
        if input_size % tp_size or part % group_size:
            raise refuse(f"input {input_size} does not split into whole groups of {group_size}")
    elif kv_heads:
        raise refuse("q/k/v layers may replicate KV heads over ranks, which is not supported")
    elif any(size % (tp_size * INT4_PER_INT32) for size in sizes):
        raise refuse(f"outputs {sizes} do not split into whole int32 words of {INT4_PER_INT32} int4 values")


def _linear_loader(layer_name: str, param: str, local: list[int], loads: _Loads, cut: Callable[..., torch.Tensor]):
    """Loads the rank's part of a whole layer, or of one shard of a merged one (gate/up) into its columns."""
    def load(parameter, loaded_weight, loaded_shard_id=None):
        part = cut(param, loaded_weight)
        if loaded_shard_id is None:
            _copy(parameter.data, part, f"{layer_name}.{param}")
            loads.mark(param, 0, slice(None))
            return
        index = _SHARD_IDS.get(loaded_shard_id, loaded_shard_id)
        start, width = sum(local[:index]), local[index]
        unit = INT4_PER_INT32 if param == "weight" else 1
        if start % unit or width % unit:
            raise UnsupportedSplitError(f"{layer_name}: shard {loaded_shard_id} starts at column {start} with "
                                        f"{width} columns, not whole int32 words of {INT4_PER_INT32} int4 values")
        dest = parameter.data.narrow(linear_output_axis(param), start // unit, width // unit)
        _copy(dest, part, f"{layer_name}.{param} shard {loaded_shard_id}")
        loads.mark(param, 0, index)

    return load
