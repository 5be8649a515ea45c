"""Read-only view of a compressed-tensors checkpoint written by llm-compressor (headers and JSON only).

The scheme of every quantized module comes from config.json's `quantization_config`: its config groups'
targets (exact names or `re:` patterns, matched as vLLM matches them: the module's name first, then its
class, every quantized module here being a Linear), and its `ignore` list. What w4a8conv converts is what
vllm-ascend 0.23 serves from such a checkpoint through its own compressed-tensors path:

- W4A8 dynamic MoE experts: int4 symmetric weights per channel or per group, stored "int-quantized"
  (`weight` int8 [out, in] holding one int4 value, `weight_scale` bf16 [out, 1] or [out, in/G], no zero
  point), input activations int8 dynamic per token. They are converted into the NPU-ready layout.
- W8A8 dynamic Linear layers (int8 per-channel weights, int8 dynamic per-token activations, as the
  example recipe makes the attention projections): re-expressed for vllm-ascend's msModelSlim path
  (`W8A8_DYNAMIC`: the weight as is, an fp32 `weight_scale`, a zero `weight_offset`).

Everything else a config group could describe is refused, naming the group and the rule. The description
the plan reads is built here: W4A8_DYNAMIC / W8A8_DYNAMIC for those modules' tensors, FLOAT for the rest.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..constants import SOURCE_TYPE, QuantVersion
from ..errors import InvalidCheckpointError
from .checkpoint import GroupSizeFrom, SourceCheckpoint, model_dtype_of, model_type_of, read_json, read_weight_files

__all__ = ["COMPRESSED_TENSORS", "W8A8_TYPE", "FLOAT_TYPE", "is_compressed_tensors", "open_compressed_tensors",
           "LOADER_EXPERT_NAMES"]

COMPRESSED_TENSORS = "compressed-tensors"
INT_QUANTIZED = "int-quantized"
W8A8_TYPE = "W8A8_DYNAMIC"
FLOAT_TYPE = "FLOAT"
_FLOAT_DTYPES = {"F32", "F16", "BF16"}

# The expert projection names (gate, up, down) each model family's vLLM loader maps into its fused experts.
# A family missing here is assumed to use the names most loaders use (gate_proj, up_proj, down_proj).
DEFAULT_EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")
LOADER_EXPERT_NAMES: dict[str, tuple[str, str, str]] = {"mixtral": ("w1", "w3", "w2")}

_EXPERT = re.compile(r"^(?P<layer>.+)\.experts\.(?P<expert>\d+)\.(?P<proj>[^.]+)$")
# Tensors llm-compressor writes beside `weight` for schemes w4a8conv does not convert.
_FOREIGN_SUFFIXES = {
    "weight_zero_point": "a zero point: asymmetric weights are not served by the A8W4 kernel",
    "weight_g_idx": "an activation-order group index (actorder): not served by vllm-ascend",
    "input_scale": "a static activation scale: the A8W4 kernel quantizes activations dynamically per token",
    "input_zero_point": "an activation zero point: the kernels quantize activations symmetrically",
    "weight_packed": "pack-quantized int4 words: vllm-ascend serves int-quantized W4A8 only",
    "weight_shape": "pack-quantized int4 words: vllm-ascend serves int-quantized W4A8 only",
}


@dataclass(frozen=True)
class Scheme:
    """One config group, validated: W4A8_DYNAMIC (experts) or W8A8_DYNAMIC (translated Linear layers)."""

    group: str
    type: str
    group_size: int  # 0 = per channel
    targets: tuple[str, ...]


def is_compressed_tensors(root: Path | str) -> bool:
    """A directory without an msModelSlim description whose config.json names compressed-tensors."""
    root = Path(root)
    # os.path.isdir: a path the OS refuses (a name over the limit) is left to the fallback reader's error
    if not os.path.isdir(root) or any(root.glob("quant_model_description*.json")):
        return False
    try:
        parsed = json.loads((root / "config.json").read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    quant = parsed.get("quantization_config") if isinstance(parsed, dict) else None
    return isinstance(quant, dict) and quant.get("quant_method") == COMPRESSED_TENSORS


class _Config:
    """quantization_config's rules, each failure naming config.json, the key and the rule."""

    def __init__(self, file: Path, quant: dict):
        self.file, self.quant = file, quant

    def fail(self, key: str, rule: str) -> InvalidCheckpointError:
        return InvalidCheckpointError(rule, file=self.file, tensor=f"quantization_config.{key}")

    def schemes(self) -> list[Scheme]:
        for key in ("kv_cache_scheme", "sparsity_config", "transform_config", "moe_sparsity_config"):
            if self.quant.get(key):
                raise self.fail(key, f"{key} is set: w4a8conv converts quantized weights only, without "
                                     "sparsity, transforms or a quantized KV cache")
        status = self.quant.get("quantization_status", "compressed")
        if status != "compressed":
            raise self.fail("quantization_status", f"status {status!r}: only a compressed checkpoint (as "
                                                   "llm-compressor saves with save_compressed=True) stores int weights")
        groups = self.quant.get("config_groups")
        if not isinstance(groups, dict) or not groups:
            raise self.fail("config_groups", "no config groups")
        schemes = [self._scheme(name, group) for name, group in groups.items()]
        w4a8 = {s.group_size for s in schemes if s.type == SOURCE_TYPE}
        if len(w4a8) > 1:
            raise self.fail("config_groups", "W4A8 groups with different group sizes "
                                             f"({sorted(w4a8)}): vllm-ascend keeps one group_size per model")
        return schemes

    def _scheme(self, name: str, group: object) -> Scheme:
        key = f"config_groups.{name}"
        if not isinstance(group, dict):
            raise self.fail(key, "not an object")
        fmt = group.get("format") or self.quant.get("format")
        if fmt != INT_QUANTIZED:
            raise self.fail(key, f"format {fmt!r}: vllm-ascend's W4A8/W8A8 paths read {INT_QUANTIZED!r} only")
        targets = group.get("targets")
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
            raise self.fail(f"{key}.targets", "not a non-empty list of names or re: patterns")
        if group.get("output_activations"):
            raise self.fail(f"{key}.output_activations", "output activation quantization is not served")
        weights = self._args(group.get("weights"), f"{key}.weights")
        activations = group.get("input_activations")
        if not activations:
            raise self.fail(f"{key}.input_activations", "weight-only quantization (no input activations): "
                                                        "w4a8conv converts W4A8 / W8A8 with int8 activations only")
        acts = self._args(activations, f"{key}.input_activations")
        if acts["num_bits"] != 8:
            raise self.fail(f"{key}.input_activations.num_bits", f"{acts['num_bits']}-bit activations, expected 8")
        if not acts.get("dynamic"):
            raise self.fail(f"{key}.input_activations.dynamic",
                            "static activation quantization: the kernels quantize activations dynamically per token")
        if acts.get("strategy") != "token":
            raise self.fail(f"{key}.input_activations.strategy",
                            f"strategy {acts.get('strategy')!r}, expected 'token' (dynamic per-token int8)")
        if weights.get("dynamic"):
            raise self.fail(f"{key}.weights.dynamic", "dynamic weight quantization: weights must be stored quantized")
        if weights.get("actorder"):
            raise self.fail(f"{key}.weights.actorder", "activation ordering (g_idx) is not served by vllm-ascend")
        strategy, bits = weights.get("strategy"), weights["num_bits"]
        if bits == 4 and strategy in ("channel", "group"):
            group_size = weights.get("group_size") if strategy == "group" else 0
            if strategy == "group" and (type(group_size) is not int or group_size <= 0):
                raise self.fail(f"{key}.weights.group_size", f"group strategy with group_size {group_size!r}")
            return Scheme(name, SOURCE_TYPE, group_size, tuple(targets))
        if bits == 8 and strategy == "channel":
            return Scheme(name, W8A8_TYPE, 0, tuple(targets))
        raise self.fail(f"{key}.weights", f"int{bits} weights with strategy {strategy!r}: w4a8conv converts int4 "
                                          "per channel or per group (W4A8) and int8 per channel (W8A8) only")

    def _args(self, args: object, key: str) -> dict:
        if not isinstance(args, dict):
            raise self.fail(key, "not an object")
        if args.get("type", "int") != "int":
            raise self.fail(f"{key}.type", f"type {args.get('type')!r}: only integer quantization is converted")
        if not args.get("symmetric", True):
            raise self.fail(f"{key}.symmetric", "asymmetric quantization: the NPU kernels are symmetric")
        if type(args.get("num_bits")) is not int:
            raise self.fail(f"{key}.num_bits", f"num_bits {args.get('num_bits')!r} is not an integer")
        return args

    def ignore(self) -> list[str]:
        ignore = self.quant.get("ignore") or []
        if not isinstance(ignore, list) or not all(isinstance(i, str) for i in ignore):
            raise self.fail("ignore", "not a list of names or re: patterns")
        return ignore


def _matches(name: str, target: str) -> bool:
    """vLLM's rule: `re:` patterns match from the start of the name, anything else is the whole name."""
    return bool(re.match(target[3:], name)) if target.startswith("re:") else name == target


def _scheme_of(module: str, schemes: list[Scheme]) -> Scheme | None:
    """The first group targeting the module by name, else by its class (every quantized module is a Linear)."""
    for scheme in schemes:
        if any(_matches(module, t) for t in scheme.targets):
            return scheme
    for scheme in schemes:  # vLLM matches a class by pattern, or by a target the class name contains
        if any(_matches("Linear", t) if t.startswith("re:") else t.lower() in "linear" for t in scheme.targets):
            return scheme
    return None


def _check_module(tensors: dict, module: str, scheme: Scheme, file: Path) -> None:
    weight, scale = tensors.get(f"{module}.weight"), tensors[f"{module}.weight_scale"]
    if weight is None:
        raise InvalidCheckpointError(f"missing; the quantized module {module} needs it", file=file,
                                     tensor=f"{module}.weight")
    if weight.dtype != "I8" or len(weight.shape) != 2:
        raise InvalidCheckpointError(f"dtype {weight.dtype} shape {list(weight.shape)}, expected I8 [out, in] "
                                     f"({INT_QUANTIZED}: one value per byte)", file=weight.file, tensor=weight.name)
    out, inp = weight.shape
    if scheme.group_size and inp % scheme.group_size:
        raise InvalidCheckpointError(f"input dimension {inp} is not a multiple of group_size {scheme.group_size} "
                                     f"(config group {scheme.group})", file=weight.file, tensor=weight.name)
    shape = (out, inp // scheme.group_size if scheme.group_size else 1)
    # vllm-ascend 0.23 creates compressed-tensors expert scales in bf16: other dtypes would be rounded on load.
    dtypes = {"BF16"} if scheme.type == SOURCE_TYPE else _FLOAT_DTYPES
    if scale.dtype not in dtypes or scale.shape != shape:
        raise InvalidCheckpointError(f"dtype {scale.dtype} shape {list(scale.shape)}, expected "
                                     f"{' or '.join(sorted(dtypes))} {list(shape)} for config group {scheme.group}",
                                     file=scale.file, tensor=scale.name)


def _loader_check(module: str, model_type: str, config_file: Path) -> None:
    """Refuse experts the model's vLLM loader would not map (llm-compressor keeps Hugging Face's names)."""
    proj = _EXPERT.match(module)["proj"]
    expected = LOADER_EXPERT_NAMES.get(model_type, DEFAULT_EXPERT_NAMES)
    if proj not in expected:
        raise InvalidCheckpointError(
            f"expert projection {proj!r}: vLLM's {model_type or 'model'} loader maps experts named "
            f"{'/'.join(expected)}, so it would find none of the converted experts", file=config_file,
            tensor=module)


def open_compressed_tensors(root: Path | str, *, model_dtype: str | None = None) -> SourceCheckpoint:
    """Validate a compressed-tensors checkpoint's config, index and headers; read no tensor data."""
    root = Path(root)
    config_file = root / "config.json"
    config_bytes, config = read_json(config_file)
    rules = _Config(config_file, config["quantization_config"])
    schemes, ignore = rules.schemes(), rules.ignore()
    model_type = config.get("model_type", "") if isinstance(config.get("model_type"), str) else ""
    index_file, headers, tensors = read_weight_files(root)

    modules = sorted(n[: -len(".weight_scale")] for n in tensors if n.endswith(".weight_scale"))
    for name, ref in tensors.items():
        if name.endswith(".weight") and ref.dtype == "I8" and f"{name}_scale" not in tensors:
            raise InvalidCheckpointError("int8 weight without a weight_scale: a quantized module needs its scale",
                                         file=ref.file, tensor=f"{name}_scale")
    module_type: dict[str, str] = {}
    for module in modules:
        if any(_matches(module, i) for i in ignore):
            raise InvalidCheckpointError("stored quantized but listed in quantization_config.ignore",
                                         file=config_file, tensor=module)
        scheme = _scheme_of(module, schemes)
        if scheme is None:
            raise InvalidCheckpointError("stored quantized but no config group targets it", file=config_file,
                                         tensor=module)
        _check_module(tensors, module, scheme, config_file)
        if scheme.type == SOURCE_TYPE:
            if not _EXPERT.match(module):
                raise InvalidCheckpointError(
                    f"W4A8 Linear layer (config group {scheme.group}): no vllm-ascend release serves a "
                    "compressed-tensors W4A8 Linear layer (0.23's W4A8_DYNAMIC Linear scheme loads msModelSlim "
                    "tensors only); leave it out of the W4A8 targets (e.g. ignore it) and quantize again",
                    file=config_file, tensor=module)
            _loader_check(module, model_type, config_file)
        module_type[module] = scheme.type

    description: dict[str, str | int] = {}
    for name in tensors:
        module, _, suffix = name.rpartition(".")
        if module in module_type and suffix in _FOREIGN_SUFFIXES:
            raise InvalidCheckpointError(f"the checkpoint stores {_FOREIGN_SUFFIXES[suffix]}",
                                         file=tensors[name].file, tensor=name)
        description[name] = module_type.get(module, FLOAT_TYPE)
    group_size = next((s.group_size for s in schemes if s.type == SOURCE_TYPE), 0)  # one for all (checked)
    if any(t == SOURCE_TYPE for t in module_type.values()):
        description.update(model_quant_type=SOURCE_TYPE, version=QuantVersion.V0.value, group_size=group_size)
    rewritten = {k: v for k, v in config.items() if k not in ("quantization_config", "compression_config")}
    checkpoint = SourceCheckpoint(
        root=root, description_file=config_file, description_bytes=config_bytes, description=description,
        version=QuantVersion.V0, group_size=group_size, group_size_from=GroupSizeFrom.DESCRIPTION,
        model_dtype=model_dtype_of(root, model_dtype), model_type=model_type_of(root), index_file=index_file,
        headers=headers, tensors=tensors,
        producer=COMPRESSED_TENSORS,
        translated={m: t for m, t in module_type.items() if t == W8A8_TYPE},
        rewritten_json={config_file.name: rewritten})
    checkpoint.non_weight_files()  # refuses links that leave the directory before anything is copied
    return checkpoint
