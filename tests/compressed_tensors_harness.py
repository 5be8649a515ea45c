"""Test harness: vllm-ascend 0.23.0's own processing of a compressed-tensors (llm-compressor) checkpoint, on CPU.

What a rank of vllm-ascend 0.23.0 holds after loading a compressed-tensors W4A8 MoE checkpoint is decided by
its release files, which this harness executes, read at test time from the published wheel (downloaded once
into the cache `tests/vllm_ascend_harness.py` uses; nothing of vllm-ascend is kept in this repository):

* `quantization/compressed_tensors_config.py`: reads config.json's `quantization_config`, matches the layer
  to a config group and detects the scheme (`_is_dynamic_token_w4a8` writes group_size, version,
  ascend_quant_method and weight_strategy into its quant_description);
* `quantization/method_adapters.py`: the wrappers whose `create_weights` register the parameters and tag
  each MoE scale CHANNEL or GROUP for vLLM's loader;
* `quantization/methods/{base,registry,w4a8,w8a8_dynamic}.py` and `quantization/quant_type.py`: the schemes
  and their `process_weights_after_loading`.

What they import from torch_npu / vllm / vllm_ascend / compressed_tensors is a stand-in: the torch_npu ops
of `tests/vllm_ascend_harness.py` (written from the op docs), `maybe_trans_nz` / `npu_format_cast` /
`Tensor.npu()` as the identity (the FRACTAL_NZ cast is a device layout step), compressed-tensors'
QuantizationArgs holding enum fields as their string values (as its `use_enum_values=True` model does),
vLLM's target matching (`find_matched_target`: the layer name exactly or by `re:` pattern, then the class
name), and process-group accessors answering for one rank. Loading the checkpoint into the parameters
follows vLLM 0.23's FusedMoE weight loader: gate rows into the first half of w13, up rows into the second
half, each cut to the rank's slice of the output dimension (for GROUP-tagged scales too); down_proj cut on
its input dimension, except a CHANNEL-tagged scale, which is copied whole; contiguous experts per EP rank.

Environment: W4A8CONV_VLLM_ASCEND_0_23_WHEEL (a vllm-ascend 0.23.0 wheel on disk), W4A8CONV_VLLM_ASCEND_CACHE.
"""
from __future__ import annotations

import copy
import importlib
import importlib.abc
import importlib.util
import json
import os
import sys
import zipfile
from enum import Enum
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import safe_open

import vllm_ascend_harness as base

__all__ = ["VERSION", "find_wheel", "moe_rank_tensors", "w8a8_linear_tensors", "quant_method_for_config",
           "linear_parameters"]

VERSION = "0.23.0"
WHEEL_ENV = "W4A8CONV_VLLM_ASCEND_0_23_WHEEL"
W4A8_MODULE = "vllm_ascend/quantization/methods/w4a8.py"
# The release's own modules this harness runs; every other import of the owned packages is a stand-in.
RELEASE_MODULES = (
    "vllm_ascend.quantization.compressed_tensors_config", "vllm_ascend.quantization.method_adapters",
    "vllm_ascend.quantization.quant_type", "vllm_ascend.quantization.methods.base",
    "vllm_ascend.quantization.methods.registry", "vllm_ascend.quantization.methods.w4a8",
    "vllm_ascend.quantization.methods.w8a8_dynamic",
)
OWNED = ("torch_npu", "vllm", "vllm_ascend", "compressed_tensors")
CHANNEL, GROUP = "channel", "group"  # vLLM's FusedMoeWeightScaleSupported values


def _cached_wheels(folder: Path) -> list[Path]:
    def holds_module(wheel: Path) -> bool:
        try:
            with zipfile.ZipFile(wheel) as archive:
                return W4A8_MODULE in archive.namelist()
        except (OSError, zipfile.BadZipFile):
            return False
    return sorted(p for p in folder.glob(f"vllm_ascend-{VERSION}-*.whl") if holds_module(p))


@cache
def find_wheel() -> Path:
    """$W4A8CONV_VLLM_ASCEND_0_23_WHEEL, else the cache, else `pip download` (about 27 MB)."""
    given = os.environ.get(WHEEL_ENV)
    if given:
        return Path(given).expanduser()
    folder = Path(os.environ.get(base.CACHE_ENV) or base.DEFAULT_CACHE).expanduser()
    return base.download_wheel(f"vllm-ascend=={VERSION}", folder, lambda: _cached_wheels(folder),
                               f"vllm_ascend-{VERSION}-*.whl",
                               ["--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
                                "--platform", "manylinux_2_34_x86_64"], WHEEL_ENV, timeout=300)


@cache
def _release_source(wheel: Path, module: str) -> str:
    with zipfile.ZipFile(wheel) as archive:
        return archive.read(module.replace(".", "/") + ".py").decode("utf-8")


# --------------------------------------------------------------------------------------------
# Stand-ins


class QuantizationStrategy(str, Enum):
    TENSOR, CHANNEL, GROUP, BLOCK, TOKEN = "tensor", "channel", "group", "block", "token"


class QuantizationType(str, Enum):
    INT, FLOAT = "int", "float"


class QuantizationArgs(SimpleNamespace):
    """compressed-tensors QuantizationArgs as parsed from config.json, enum fields as their string values."""

    @classmethod
    def model_validate(cls, args: dict | None) -> QuantizationArgs:
        args = dict(args or {})
        group_size = args.get("group_size")
        return cls(num_bits=args.get("num_bits", 8), type=args.get("type", "int"),
                   symmetric=args.get("symmetric", True), group_size=group_size,
                   strategy=args.get("strategy") or ("group" if group_size else "tensor"),
                   dynamic=args.get("dynamic", False), actorder=args.get("actorder"))


def _equal_or_match(value: str, target: str, contains: bool = False) -> bool:
    import re
    if target.startswith("re:"):
        return re.match(target[3:], value) is not None
    return target.lower() in value.lower() if contains else target == value


def find_matched_target(layer_name, module, targets, fused_mapping=None):
    """vLLM: the first target equal to / matching the layer name, else one the class name contains."""
    for value, contains in ((layer_name or "", False), (type(module).__name__, True)):
        for target in targets:
            if _equal_or_match(value, target, contains):
                return target
    raise ValueError(f"Unable to find matching target for {layer_name} in the compressed-tensors config.")


def should_ignore_layer(layer_name, ignore, fused_mapping=None):
    return layer_name is not None and any(_equal_or_match(layer_name, target) for target in ignore or ())


def is_activation_quantization_format(fmt) -> bool:
    return fmt in ("naive-quantized", "int-quantized", "float-quantized", "nvfp4-pack-quantized")


def set_weight_attrs(weight, attrs):
    for key, value in (attrs or {}).items():
        if hasattr(weight, key):
            raise AssertionError(f"overwriting tensor attribute {key}")
        setattr(weight, key, value)


class _Logger:
    """vLLM's logger, silent (it adds info_once / warning_once to logging's methods)."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


class _MethodBase:
    def __init__(self, moe=None):
        self.moe = moe


def _named(name: str, bases: tuple = (torch.nn.Module,)) -> type:
    return type(name, bases, {})


FusedMoE = _named("FusedMoE")
LinearBase = _named("LinearBase")
RowParallelLinear = _named("RowParallelLinear", (LinearBase,))
ColumnParallelLinear = _named("ColumnParallelLinear", (LinearBase,))


def _unavailable(name: str):
    def call(*args, **kwargs):
        raise NotImplementedError(f"{name} is not part of weight post-processing (harness stand-in)")
    return call


class _Sandbox(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """While active, imports of the owned packages resolve to the release's files or to stand-ins;
    sys.modules and Tensor.npu are restored afterwards."""

    def __init__(self, wheel: Path, tp_size: int, enable_ep: bool):
        self.wheel = wheel
        self.vllm_config = SimpleNamespace(quant_config=None,
                                           parallel_config=SimpleNamespace(enable_expert_parallel=enable_ep))
        self.tp_size = tp_size
        self.registry: dict = {}

    def _stand_ins(self) -> dict[str, dict]:
        placeholder = SimpleNamespace()
        return {
            "torch_npu": dict(npu_convert_weight_to_int4pack=base.npu_convert_weight_to_int4pack,
                              npu_quantize=base.npu_quantize, npu_format_cast=base.npu_format_cast),
            "vllm": {}, "vllm.config": dict(get_current_vllm_config=lambda: self.vllm_config,
                                            CompilationMode=placeholder),
            "vllm.distributed": dict(get_tensor_model_parallel_world_size=lambda: self.tp_size,
                                     get_tensor_model_parallel_rank=lambda: 0),
            "vllm.logger": dict(logger=_Logger()),
            "vllm.model_executor": {}, "vllm.model_executor.layers": {},
            "vllm.model_executor.layers.fused_moe": dict(
                FusedMoE=FusedMoE, FusedMoEMethodBase=_named("FusedMoEMethodBase", (_MethodBase,)),
                FusedMoeWeightScaleSupported=Enum("FusedMoeWeightScaleSupported",
                                                  {"TENSOR": "tensor", "CHANNEL": CHANNEL, "GROUP": GROUP})),
            "vllm.model_executor.layers.fused_moe.config": dict(FusedMoEConfig=object),
            "vllm.model_executor.layers.linear": dict(
                LinearBase=LinearBase, RowParallelLinear=RowParallelLinear,
                LinearMethodBase=_named("LinearMethodBase", (_MethodBase,)),
                UnquantizedLinearMethod=_named("UnquantizedLinearMethod", (_MethodBase,))),
            "vllm.model_executor.layers.quantization": dict(register_quantization_config=lambda name: (lambda c: c),
                                                            QUANTIZATION_METHODS=[]),
            "vllm.model_executor.layers.quantization.base_config": dict(
                QuantizationConfig=type("QuantizationConfig", (), {
                    "__init__": lambda self: setattr(self, "packed_modules_mapping", {})}),
                QuantizeMethodBase=_named("QuantizeMethodBase", (_MethodBase,))),
            "vllm.model_executor.layers.quantization.kv_cache": dict(
                BaseKVCacheMethod=_named("BaseKVCacheMethod", (_MethodBase,))),
            "vllm.model_executor.layers.quantization.compressed_tensors": {},
            "vllm.model_executor.layers.quantization.compressed_tensors.utils": dict(
                find_matched_target=find_matched_target, should_ignore_layer=should_ignore_layer,
                is_activation_quantization_format=is_activation_quantization_format),
            "vllm.model_executor.models": {}, "vllm.model_executor.models.utils": dict(WeightsMapper=object),
            "vllm.model_executor.parameter": dict(PerTensorScaleParameter=_unavailable("PerTensorScaleParameter")),
            "vllm.model_executor.utils": dict(set_weight_attrs=set_weight_attrs),
            "compressed_tensors": {},
            "compressed_tensors.quantization": dict(QuantizationArgs=QuantizationArgs,
                                                    QuantizationStrategy=QuantizationStrategy,
                                                    QuantizationType=QuantizationType),
            "vllm_ascend": {}, "vllm_ascend.quantization": {},
            "vllm_ascend.ascend_config": dict(get_ascend_config=lambda: SimpleNamespace(
                eplb_config=SimpleNamespace(dynamic_eplb=False), flashcomm2_oproj_tensor_parallel_size=1)),
            "vllm_ascend.ascend_forward_context": dict(_EXTRA_CTX=placeholder, MoECommType=placeholder),
            "vllm_ascend.distributed": {},
            # A group without `device_group`: the scheme catches the AttributeError (no HCCL name on CPU).
            "vllm_ascend.distributed.parallel_state": dict(
                get_mc2_group=lambda: SimpleNamespace(), get_flashcomm2_otp_group=_unavailable("otp group"),
                get_mlp_tp_group=_unavailable("mlp tp group"), get_otp_group=_unavailable("otp group")),
            "vllm_ascend.flash_common3_context": dict(get_flash_common3_context=_unavailable("flash common3")),
            "vllm_ascend.ops": {}, "vllm_ascend.ops.fused_moe": {},
            "vllm_ascend.ops.fused_moe.fused_moe": dict(
                AscendUnquantizedFusedMoEMethod=_named("AscendUnquantizedFusedMoEMethod", (_MethodBase,))),
            "vllm_ascend.ops.fused_moe.experts_selector": dict(select_experts=_unavailable("select_experts"),
                                                               zero_experts_compute=_unavailable("zero experts")),
            "vllm_ascend.ops.fused_moe.moe_runtime_args": dict(
                build_fused_experts_input=_unavailable("build_fused_experts_input")),
            "vllm_ascend.utils": dict(ACL_FORMAT_FRACTAL_NZ=base.ACL_FORMAT_FRACTAL_NZ,
                                      COMPRESSED_TENSORS_METHOD="compressed-tensors",
                                      maybe_trans_nz=base.maybe_trans_nz, vllm_version_is=lambda v: v == VERSION,
                                      enable_dsa_cp=lambda: False, enable_dsa_cp_with_layer_shard=lambda: False,
                                      flashcomm2_enable=lambda: False, mlp_tp_enable=lambda: False,
                                      oproj_tp_enable=lambda: False),
        }

    # the finder/loader protocol
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] not in OWNED:
            return None
        if name not in RELEASE_MODULES and name not in self.stand_ins and name != "vllm_ascend.quantization.methods":
            raise ImportError(f"the harness has no stand-in for {name!r}")
        is_package = name in self.stand_ins or name == "vllm_ascend.quantization.methods"
        return importlib.util.spec_from_loader(name, self, is_package=is_package)

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        name = module.__name__
        if name in RELEASE_MODULES:
            code = compile(_release_source(self.wheel, name), f"{self.wheel.name}/{name}", "exec")
            exec(code, module.__dict__)
        elif name == "vllm_ascend.quantization.methods":
            self._methods_package(module)
        else:
            module.__dict__.update(self.stand_ins[name])

    def _methods_package(self, module):
        """The real package imports every scheme; the two this harness needs are enough."""
        prefix = "vllm_ascend.quantization.methods"
        module.__path__ = []
        base_module = importlib.import_module(f"{prefix}.base")
        registry = importlib.import_module(f"{prefix}.registry")
        for scheme in ("w4a8", "w8a8_dynamic"):
            importlib.import_module(f"{prefix}.{scheme}")
        module.__dict__.update({name: getattr(base_module, name) for name in (
            "AscendAttentionScheme", "AscendLinearScheme", "AscendMoEScheme", "QuantType")})
        module.get_scheme_class = registry.get_scheme_class
        module.register_scheme = registry.register_scheme
        module.is_mx_quant_type = lambda instance: False  # neither W4A8_DYNAMIC nor W8A8_DYNAMIC is MX

    def __enter__(self):
        self.stand_ins = self._stand_ins()
        self.saved = {k: v for k, v in sys.modules.items() if k.partition(".")[0] in OWNED}
        for key in self.saved:
            del sys.modules[key]
        sys.meta_path.insert(0, self)
        self.npu = base._tensor_npu_identity()
        self.npu.__enter__()
        return self

    def __exit__(self, *exc):
        self.npu.__exit__(*exc)
        sys.meta_path.remove(self)
        for key in [k for k in sys.modules if k.partition(".")[0] in OWNED]:
            del sys.modules[key]
        sys.modules.update(self.saved)
        return False

    def config(self, quantization_config: dict):
        ct = importlib.import_module("vllm_ascend.quantization.compressed_tensors_config")
        config = ct.AscendCompressedTensorsConfig.from_config(copy.deepcopy(quantization_config))
        self.vllm_config.quant_config = config  # the schemes read quant_description from here
        return config


# --------------------------------------------------------------------------------------------
# The checkpoint and loading


class _Checkpoint:
    def __init__(self, root: Path):
        self.root = root
        self.config = json.loads((root / "config.json").read_text())
        self.files = {}
        for path in sorted(root.glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as handle:
                self.files.update(dict.fromkeys(handle.keys(), path))  # noqa: SIM118

    def tensor(self, name: str) -> torch.Tensor:
        with safe_open(str(self.files[name]), framework="pt") as handle:
            return handle.get_tensor(name)


def quant_method_for_config(root: Path | str, layer_kind: str, prefix: str):
    """What vllm-ascend 0.23.0's compressed-tensors config returns for a layer of the checkpoint at `root`
    (`layer_kind` "moe" or "linear"): the release's method object, or None when config.json has no
    compressed-tensors quantization_config (vLLM then never builds this config)."""
    config = json.loads((Path(root) / "config.json").read_text())
    quant = config.get("quantization_config")
    if not isinstance(quant, dict) or quant.get("quant_method") != "compressed-tensors":
        return None
    with _Sandbox(find_wheel(), 1, False) as sandbox:
        layer = FusedMoE() if layer_kind == "moe" else ColumnParallelLinear()
        layer.moe_config = None
        return sandbox.config(quant).get_quant_method(layer, prefix)


def linear_parameters(root: Path | str, prefix: str, out_features: int, in_features: int) -> tuple[str, dict]:
    """(scheme class name, {parameter: (dtype, shape)}) that vllm-ascend 0.23.0 creates for the Linear layer
    `prefix` of the compressed-tensors checkpoint at `root` (TP 1, bf16)."""
    quant = _Checkpoint(Path(root)).config["quantization_config"]
    with _Sandbox(find_wheel(), 1, False) as sandbox:
        layer = ColumnParallelLinear()
        method = sandbox.config(quant).get_quant_method(layer, prefix)
        method.create_weights(layer, in_features, [out_features], in_features, out_features, torch.bfloat16,
                              weight_loader=None)
        return (type(method.quant_method).__name__,
                {name: (p.dtype, tuple(p.shape)) for name, p in layer.named_parameters()})


def moe_rank_tensors(root: Path | str, prefix: str, tp_size: int = 1, tp_rank: int = 0, ep_size: int = 1,
                     ep_rank: int = 0) -> dict[str, torch.Tensor]:
    """The six MoE tensors a rank of vllm-ascend 0.23.0 holds after loading the compressed-tensors MoE block
    `prefix` (e.g. model.layers.0.mlp) and running its own post-processing."""
    if ep_size > 1 and tp_size != 1:
        raise ValueError("with expert parallelism the MoE tensor-parallel size is 1")
    ckpt = _Checkpoint(Path(root))
    gate, up, down = "gate_proj", "up_proj", "down_proj"
    experts = sorted({int(n[len(prefix) + 9:].split(".")[0]) for n in ckpt.files
                      if n.startswith(f"{prefix}.experts.") and n.endswith(f".{gate}.weight")})
    intermediate, hidden = ckpt.tensor(f"{prefix}.experts.0.{gate}.weight").shape
    local, part = len(experts) // ep_size, intermediate // tp_size
    with _Sandbox(find_wheel(), tp_size, ep_size > 1) as sandbox:
        config = sandbox.config(ckpt.config["quantization_config"])
        layer = FusedMoE()
        layer.moe_config = None
        method = config.get_quant_method(layer, f"{prefix}.experts")
        if type(method.quant_method).__name__ != "AscendW4A8DynamicFusedMoEMethod":
            raise AssertionError(f"vllm-ascend 0.23.0 takes {prefix} as {type(method.quant_method).__name__}")
        method.create_weights(layer, local, hidden, part, torch.bfloat16, weight_loader=None)
        written = {name: torch.zeros(p.shape, dtype=torch.bool) for name, p in layer.named_parameters()}
        for index in range(local):
            expert = ep_rank * local + index
            for proj, shard in ((gate, "w1"), (up, "w3"), (down, "w2")):
                for suffix in ("weight", "weight_scale"):
                    name = f"{'w2' if shard == 'w2' else 'w13'}_{suffix}"
                    param, mask = getattr(layer, name).data[index], written[name][index]
                    loaded = ckpt.tensor(f"{prefix}.experts.{expert}.{proj}.{suffix}")
                    what = f"{prefix}.experts.{expert}.{proj}.{suffix} -> {name}[{index}]"
                    tag = getattr(getattr(layer, name), "quant_method", None)
                    if shard == "w2":
                        if tag == CHANNEL:  # a per-channel scale is copied whole
                            base._copy(param, mask, loaded, what)
                        else:
                            width = loaded.shape[1] // tp_size
                            base._copy(param, mask, loaded.narrow(1, tp_rank * width, width), what)
                    else:
                        height = loaded.shape[0] // tp_size
                        start = 0 if shard == "w1" else height
                        base._copy(param.narrow(0, start, height), mask.narrow(0, start, height),
                                   loaded.narrow(0, tp_rank * height, height), what)
        base._check_written(prefix, written)
        method.process_weights_after_loading(layer)
        return {key: getattr(layer, key).data for key in base.MOE_KEYS}


def w8a8_linear_tensors(tensors: dict[str, torch.Tensor], root: Path | str | None = None,
                        prefix: str = "") -> dict[str, torch.Tensor]:
    """Every parameter vllm-ascend 0.23.0's W8A8_DYNAMIC Linear scheme holds after post-processing (TP 1,
    bf16 parameters), loaded with `tensors` (suffix -> tensor). With `root`, the scheme is the one the
    checkpoint's compressed-tensors config picks for `prefix`; otherwise the registry's W8A8_DYNAMIC
    Linear scheme, as the msModelSlim path creates it. Parameters no tensor was given for are returned
    as None (the compressed-tensors path never loads weight_offset)."""
    out_features, in_features = tensors["weight"].shape
    with _Sandbox(find_wheel(), 1, False) as sandbox:
        adapters = importlib.import_module("vllm_ascend.quantization.method_adapters")
        layer = ColumnParallelLinear()
        if root is None:
            methods = importlib.import_module("vllm_ascend.quantization.methods")
            method = adapters.AscendLinearMethod(methods.get_scheme_class("W8A8_DYNAMIC", "linear")())
        else:
            quant = _Checkpoint(Path(root)).config["quantization_config"]
            method = sandbox.config(quant).get_quant_method(layer, prefix)
        if type(method.quant_method).__name__ != "AscendW8A8DynamicLinearMethod":
            raise AssertionError(f"vllm-ascend 0.23.0 takes {prefix} as {type(method.quant_method).__name__}")
        method.create_weights(layer, in_features, [out_features], in_features, out_features, torch.bfloat16,
                              weight_loader=None)
        loaded = set()
        for suffix, tensor in tensors.items():
            getattr(layer, suffix).data.copy_(tensor)
            loaded.add(suffix)
        method.process_weights_after_loading(layer)
        params = {name: p.data if name in loaded else None for name, p in layer.named_parameters()}
        params["weight_scale_fp32"] = layer.weight_scale_fp32
        return params

