"""Test harness: run vllm-ascend 0.11.0's own W4A8_DYNAMIC weight post-processing on the CPU.

What a rank of vllm-ascend holds after loading a W4A8_DYNAMIC checkpoint is decided by the module
`vllm_ascend/quantization/w4a8_dynamic.py`: its parameter factories (`get_weight`,
`get_dynamic_quant_param`, `get_pergroup_param`) and its `process_weights_after_loading`. This
harness executes that module, read at test time from the published wheel (downloaded once into a
cache outside the repository; nothing from vllm-ascend is kept in this repository), with small
stand-ins for what it imports:

* the torch_npu ops, written from their documented semantics:
  - `npu_convert_weight_to_int4pack(int32 w)` packs the last axis, 8 int4 values per int32,
    value 8j+t in bits 4t..4t+3 (two's complement nibbles);
  - `npu_quantize(x, scales, None, torch.quint4x2, -1, False)`: fp32(x) * fp32(scales), rounded
    half to even, clamped to [-8, 7], packed as above;
  - `npu_format_cast` and `Tensor.npu()` are the identity: the FRACTAL_NZ cast is a device layout
    step, not something a checkpoint stores;
* vLLM / vllm-ascend configuration and process-group accessors, answering for one rank.

Loading the checkpoint tensors into the parameters follows vLLM's FusedMoE weight loader for
tensor parallelism (gate rows into the first half of w13, up rows into the second half, each cut
to the rank's slice of the output dimension; down_proj cut on its input dimension, except the
per-channel `weight_scale` / `weight_offset`, which are copied whole) and contiguous experts per
expert-parallel rank.

By default all of this is vllm-ascend 0.11.0; `moe_rank_tensors(..., version="0.13.0")` and
`linear_tensors(..., version="0.13.0")` run vllm-ascend 0.13.0's module instead (its imports moved
the expert selector to `vllm_ascend.ops.fused_moe` and take `maybe_trans_nz` from `vllm_ascend.utils`,
which here is the identity like `npu_format_cast`). The loading into the parameters is the same
for both versions.

Environment:
  W4A8CONV_VLLM_ASCEND_WHEEL       path of a vllm-ascend 0.11.0 wheel already on disk (no download)
  W4A8CONV_VLLM_ASCEND_0_13_WHEEL  the same for vllm-ascend 0.13.0
  W4A8CONV_VLLM_ASCEND_CACHE       download cache, shared by the versions (default ~/.cache/w4a8conv/vllm-ascend)
"""
from __future__ import annotations

import builtins
import contextlib
import json
import os
import re
import subprocess
import sys
import types
import zipfile
from functools import cache, lru_cache
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import safe_open

__all__ = [
    "VLLM_ASCEND_VERSION", "VLLM_ASCEND_VERSIONS", "HarnessUnavailable", "find_wheel", "download_wheel",
    "module_source",
    "pack_int4_last_axis", "npu_convert_weight_to_int4pack", "npu_quantize",
    "SourceCheckpoint", "moe_rank_tensors", "linear_tensors", "with_description_keys", "MOE_KEYS",
]

VLLM_ASCEND_VERSION = "0.11.0"
MODULE_PATH = "vllm_ascend/quantization/w4a8_dynamic.py"
WHEEL_ENV = "W4A8CONV_VLLM_ASCEND_WHEEL"
# Every version the harness can run, with the variable naming a wheel of it on disk.
WHEEL_ENVS = {VLLM_ASCEND_VERSION: WHEEL_ENV, "0.13.0": "W4A8CONV_VLLM_ASCEND_0_13_WHEEL"}
VLLM_ASCEND_VERSIONS = tuple(WHEEL_ENVS)
CACHE_ENV = "W4A8CONV_VLLM_ASCEND_CACHE"
DEFAULT_CACHE = Path.home() / ".cache" / "w4a8conv" / "vllm-ascend"
# The tags of the published 0.11.0 (and 0.13.0) wheel; used only when pip finds nothing for this interpreter.
FALLBACK_TAGS = ["--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
                 "--platform", "manylinux_2_24_x86_64"]

MOE_KEYS = ("w13_weight", "w2_weight", "w13_weight_scale", "w2_weight_scale", "w13_scale_bias", "w2_scale_bias")
ACL_FORMAT_FRACTAL_NZ = 29  # value of the constant in vllm_ascend.utils; only passed through here


class HarnessUnavailable(RuntimeError):
    """The vllm-ascend wheel could not be found or downloaded."""


# --------------------------------------------------------------------------------------------
# The wheel


def _has_module(wheel: Path) -> bool:
    try:
        with zipfile.ZipFile(wheel) as archive:
            return MODULE_PATH in archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def _cached_wheels(folder: Path, version: str = VLLM_ASCEND_VERSION) -> list[Path]:
    return sorted(p for p in folder.glob(f"vllm_ascend-{version}-*.whl") if _has_module(p))


def _check_version(version: str) -> None:
    if version not in WHEEL_ENVS:
        raise ValueError(f"vllm-ascend version {version!r}: the harness knows {list(WHEEL_ENVS)}")


@cache
def find_wheel(version: str = VLLM_ASCEND_VERSION) -> Path:
    """The vllm-ascend wheel of `version` (default 0.11.0): $W4A8CONV_VLLM_ASCEND_WHEEL (for 0.13.0
    $W4A8CONV_VLLM_ASCEND_0_13_WHEEL), else the cache, else `pip download`."""
    _check_version(version)
    wheel_env = WHEEL_ENVS[version]
    given = os.environ.get(wheel_env)
    if given:
        path = Path(given).expanduser()
        if not _has_module(path):
            raise HarnessUnavailable(f"${wheel_env}={given}: not a wheel holding {MODULE_PATH}")
        if version != VLLM_ASCEND_VERSION and not path.name.startswith(f"vllm_ascend-{version}-"):
            raise HarnessUnavailable(f"${wheel_env}={given}: not a vllm_ascend-{version} wheel")
        return path
    cache_dir = Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()
    return download_wheel(f"vllm-ascend=={version}", cache_dir, lambda: _cached_wheels(cache_dir, version),
                          f"vllm_ascend-{version}-*.whl", FALLBACK_TAGS, wheel_env, timeout=300)


def download_wheel(requirement: str, cache_dir: Path, cached, pattern: str, fallback_tags: list[str],
                   wheel_env: str, timeout: int) -> Path:
    """A wheel from `cache_dir` (`cached()` lists usable ones), else `pip download` of `requirement`
    into it, retried with `fallback_tags` when pip finds nothing for this interpreter."""
    found = cached()
    if found:
        return found[0]
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        for broken in cache_dir.glob(pattern):  # pip would reuse a broken file
            broken.unlink()
    except OSError as exc:
        raise HarnessUnavailable(f"cannot create the wheel cache {cache_dir}: {exc}") from None
    base = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", str(cache_dir),
            "--disable-pip-version-check", "--quiet"]
    errors = []
    for extra in ([], list(fallback_tags)):
        try:
            done = subprocess.run(base + extra + [requirement], capture_output=True, text=True, timeout=timeout,
                                  check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            errors.append(str(exc))
            continue
        found = cached()
        if found:
            return found[0]
        errors.append((done.stderr or done.stdout).strip()[-600:])
    raise HarnessUnavailable(f"could not download {requirement} into {cache_dir} "
                             f"(set ${wheel_env} to a wheel on disk): {' | '.join(errors)}")


@cache
def module_source(wheel: Path | None = None) -> str:
    """The text of vllm-ascend's w4a8_dynamic module, read from the wheel."""
    with zipfile.ZipFile(wheel or find_wheel()) as archive:
        return archive.read(MODULE_PATH).decode("utf-8")


@cache
def _module_code(wheel: Path):
    return compile(module_source(wheel), f"{wheel.name}/{MODULE_PATH}", "exec")


# --------------------------------------------------------------------------------------------
# torch_npu stand-ins (from the op documentation)


def pack_int4_last_axis(values: torch.Tensor) -> torch.Tensor:
    """Pack int values in [-8, 7] along the last axis: value 8j+t -> bits 4t..4t+3 of int32 word j."""
    if values.shape[-1] % 8:
        raise ValueError(f"last axis {values.shape[-1]} is not a multiple of 8")
    wide = values.to(torch.int64)
    if wide.numel() and (wide.min() < -8 or wide.max() > 7):
        raise ValueError("values outside the int4 range [-8, 7]")
    nibbles = (wide & 0xF).reshape(*values.shape[:-1], values.shape[-1] // 8, 8)
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    words = (nibbles << shifts).sum(dim=-1)                  # in [0, 2**32)
    words = torch.where(words >= 2**31, words - 2**32, words)  # two's complement int32
    return words.to(torch.int32).contiguous()


def npu_convert_weight_to_int4pack(weight: torch.Tensor, inner_k_tiles: int = 0) -> torch.Tensor:
    if weight.dtype != torch.int32:
        raise TypeError(f"npu_convert_weight_to_int4pack takes int32, got {weight.dtype}")
    return pack_int4_last_axis(weight)


def npu_quantize(x: torch.Tensor, scales: torch.Tensor, zero_points, dtype, axis: int = 1,
                 div_mode: bool = True) -> torch.Tensor:
    if dtype != torch.quint4x2 or zero_points is not None or div_mode:
        raise NotImplementedError("stand-in covers npu_quantize(x, scales, None, torch.quint4x2, axis, False) only")
    scale = scales.to(torch.float32)
    if scale.numel() != 1:  # one scale per index of `axis`
        shape = [1] * x.dim()
        shape[axis] = -1
        scale = scale.reshape(shape)
    value = torch.round(x.to(torch.float32) * scale)  # torch.round: half to even, like rint
    return pack_int4_last_axis(value.clamp(-8, 7).to(torch.int32))


def npu_format_cast(tensor: torch.Tensor, acl_format: int) -> torch.Tensor:
    return tensor


def maybe_trans_nz(weight: torch.Tensor) -> torch.Tensor:
    """vllm_ascend.utils.maybe_trans_nz (0.13): an FRACTAL_NZ cast or nothing, a layout step: the identity."""
    return weight


@contextlib.contextmanager
def _tensor_npu_identity():
    """`Tensor.npu()` as the identity for the duration of a call into the module (restored after)."""
    missing = object()
    original = torch.Tensor.__dict__.get("npu", missing)
    torch.Tensor.npu = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        if original is missing:
            del torch.Tensor.npu
        else:
            torch.Tensor.npu = original


# --------------------------------------------------------------------------------------------
# The module, executed with stand-ins


def _unavailable(name: str):
    def call(*args, **kwargs):
        raise NotImplementedError(f"{name} is not part of weight post-processing (harness stand-in)")
    return call


# What a version's module imports beyond the 0.11.0 names above (module -> extra attributes).
_VERSION_STANDINS = {
    "0.13.0": {
        "vllm_ascend.ops.fused_moe": {},
        "vllm_ascend.ops.fused_moe.experts_selector": dict(select_experts=_unavailable("select_experts")),
        "vllm_ascend.utils": dict(maybe_trans_nz=maybe_trans_nz),
    },
}


def _standins(description: dict, tp_world: int, ep_world: int, enable_ep: bool,
              version: str = VLLM_ASCEND_VERSION) -> dict[str, types.ModuleType]:
    config = SimpleNamespace(quant_config=SimpleNamespace(quant_description=description),
                             parallel_config=SimpleNamespace(enable_expert_parallel=enable_ep))
    # When expert parallelism is off, vllm-ascend's EP group spans the MoE tensor-parallel ranks.
    ep_group = SimpleNamespace(world_size=ep_world, rank_in_group=0)
    contents = {
        "torch_npu": dict(npu_convert_weight_to_int4pack=npu_convert_weight_to_int4pack, npu_quantize=npu_quantize,
                          npu_format_cast=npu_format_cast,
                          npu_weight_quant_batchmatmul=_unavailable("npu_weight_quant_batchmatmul")),
        "vllm": {},
        "vllm.config": dict(get_current_vllm_config=lambda: config),
        "vllm.distributed": dict(get_ep_group=lambda: ep_group,
                                 get_tensor_model_parallel_world_size=lambda: tp_world),
        "vllm.forward_context": dict(get_forward_context=_unavailable("get_forward_context")),
        "vllm_ascend": {},
        "vllm_ascend.ascend_config": dict(get_ascend_config=lambda: SimpleNamespace(
            dynamic_eplb=False, expert_map_record_path=None)),
        "vllm_ascend.distributed": {},
        # A group without `device_group`: the module catches the AttributeError (no HCCL name on CPU).
        "vllm_ascend.distributed.parallel_state": dict(get_mc2_group=lambda: SimpleNamespace()),
        "vllm_ascend.ops": {},
        "vllm_ascend.ops.moe": {},
        "vllm_ascend.ops.moe.experts_selector": dict(select_experts=_unavailable("select_experts")),
        "vllm_ascend.utils": dict(ACL_FORMAT_FRACTAL_NZ=ACL_FORMAT_FRACTAL_NZ),
    }
    for name, attrs in _VERSION_STANDINS.get(version, {}).items():
        contents[name] = {**contents.get(name, {}), **attrs}
    modules = {}
    for name, attrs in contents.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        modules[name] = module
    return modules


def _importer(standins: dict[str, types.ModuleType]):
    """An `__import__` for the executed module: stand-ins first, the real thing for everything else."""
    real = builtins.__import__
    faked_roots = {name.partition(".")[0] for name in standins}

    def import_(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and name.partition(".")[0] in faked_roots:
            if name not in standins:
                raise ImportError(f"the harness has no stand-in for {name!r}")
            return standins[name] if fromlist else standins[name.partition(".")[0]]
        return real(name, globals, locals, fromlist, level)

    return import_


@cache
def _load_module(wheel: Path, description_items: tuple, tp_world: int, ep_world: int,
                 enable_ep: bool, version: str = VLLM_ASCEND_VERSION) -> types.ModuleType:
    """Execute the module once per configuration; its stand-ins answer for that configuration only."""
    standins = _standins(dict(description_items), tp_world, ep_world, enable_ep, version)
    module = types.ModuleType("vllm_ascend.quantization.w4a8_dynamic")
    module.__dict__["__builtins__"] = dict(vars(builtins), __import__=_importer(standins))
    exec(_module_code(wheel), module.__dict__)
    return module


# --------------------------------------------------------------------------------------------
# The source checkpoint


class SourceCheckpoint:
    """An msModelSlim checkpoint directory: description, config.json and tensors (any sharding)."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        descriptions = sorted(self.root.glob("quant_model_description*.json"))
        if len(descriptions) != 1:
            raise ValueError(f"{self.root}: expected one quant_model_description*.json, found "
                             f"{[p.name for p in descriptions]}")
        self.description: dict = json.loads(descriptions[0].read_text())
        self.config: dict = json.loads((self.root / "config.json").read_text())
        self._files: dict[str, Path] = {}
        for path in sorted(self.root.glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                    self._files[name] = path

    @property
    def names(self) -> list[str]:
        return list(self._files)

    def tensor(self, name: str) -> torch.Tensor:
        with safe_open(str(self._files[name]), framework="pt") as handle:
            return handle.get_tensor(name)

    def under(self, head: str) -> dict[str, torch.Tensor]:
        """The tensors `head + suffix` with a suffix free of dots, by suffix."""
        return {n[len(head):]: self.tensor(n) for n in self._files if n.startswith(head) and "." not in n[len(head):]}

    @property
    def quant_items(self) -> tuple:
        """The description keys the module reads, only where present (the module supplies defaults)."""
        return tuple((k, self.description[k]) for k in ("group_size", "version") if k in self.description)

    @property
    def model_dtype(self) -> torch.dtype:
        return getattr(torch, self.config.get("torch_dtype", "bfloat16"))

    def experts(self, prefix: str) -> tuple[int, tuple[str, str, str]]:
        """Number of experts and the (gate, up, down) projection names of an MoE block."""
        pattern = re.compile(re.escape(prefix) + r"\.experts\.(\d+)\.([^.]+)\.weight$")
        found: dict[int, set[str]] = {}
        for name in self._files:
            match = pattern.match(name)
            if match:
                found.setdefault(int(match.group(1)), set()).add(match.group(2))
        if not found or sorted(found) != list(range(len(found))):
            raise ValueError(f"{prefix}: experts are not numbered 0..E-1: {sorted(found)}")
        for triple in (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2")):
            if all(set(triple) <= projections for projections in found.values()):
                return len(found), triple
        raise ValueError(f"{prefix}: unknown expert projection names {sorted(found[0])}")


def with_description_keys(root: Path | str, into: Path | str, **keys) -> Path:
    """A copy of checkpoint `root` in `into` (hard links to its files, so a converter accepts it as a
    directory of its own) whose description also holds `keys`, e.g. the group_size a description lacks,
    which vllm-ascend would otherwise read as 256."""
    root, into = Path(root), Path(into)
    into.mkdir(parents=True)
    for path in root.iterdir():
        if path.name.startswith("quant_model_description"):
            (into / path.name).write_text(json.dumps({**json.loads(path.read_text()), **keys}))
        else:
            os.link(path, into / path.name)
    return into


@lru_cache(maxsize=16)
def _source(root: str) -> SourceCheckpoint:
    return SourceCheckpoint(root)


# --------------------------------------------------------------------------------------------
# Loading, as vLLM's weight loaders do, then the module's own post-processing

CHANNEL_SUFFIXES = ("weight_scale", "weight_offset")  # loaded per channel: down_proj's copied whole


def _register(layer: torch.nn.Module, params: dict) -> dict[str, torch.Tensor]:
    """Register the factories' tensors; return a per-parameter mask of what loading wrote."""
    written = {}
    for name, value in params.items():
        layer.register_parameter(name, torch.nn.Parameter(value, requires_grad=False))
        written[name] = torch.zeros(value.shape, dtype=torch.bool)
    return written


def _copy(dest: torch.Tensor, mask: torch.Tensor, source: torch.Tensor, what: str) -> None:
    if tuple(dest.shape) != tuple(source.shape):
        raise ValueError(f"{what}: checkpoint slice {tuple(source.shape)} does not fit parameter {tuple(dest.shape)}")
    dest.copy_(source)
    mask.fill_(True)


def _check_written(layer_name: str, written: dict[str, torch.Tensor]) -> None:
    missing = [name for name, mask in written.items() if not bool(mask.all())]
    if missing:
        raise ValueError(f"{layer_name}: the checkpoint left parameters (partly) unloaded: {missing}")


def moe_rank_tensors(root: Path | str, prefix: str, tp_size: int = 1, tp_rank: int = 0, ep_size: int = 1,
                     ep_rank: int = 0, version: str = VLLM_ASCEND_VERSION) -> dict[str, torch.Tensor]:
    """The six tensors an MoE rank holds after `process_weights_after_loading` (of vllm-ascend `version`).

    Expert parallelism (ep_size > 1) implies MoE tensor parallelism 1, as in vLLM.
    """
    _check_version(version)
    if ep_size > 1 and tp_size != 1:
        raise ValueError("with expert parallelism the MoE tensor-parallel size is 1")
    if not (0 <= tp_rank < tp_size and 0 <= ep_rank < ep_size):
        raise ValueError(f"rank out of range: tp {tp_rank}/{tp_size}, ep {ep_rank}/{ep_size}")
    source = _source(str(Path(root).resolve()))
    num_experts, (gate, up, down) = source.experts(prefix)
    intermediate = source.tensor(f"{prefix}.experts.0.{gate}.weight_scale").shape[0]
    hidden = source.tensor(f"{prefix}.experts.0.{down}.weight_scale").shape[0]
    if num_experts % ep_size or intermediate % tp_size:
        raise ValueError(f"{prefix}: {num_experts} experts / {intermediate} intermediate do not split over "
                         f"ep {ep_size} / tp {tp_size}")
    enable_ep = ep_size > 1
    module = _load_module(find_wheel(version), source.quant_items, tp_size, ep_size if enable_ep else tp_size,
                          enable_ep, version)
    local_experts, part = num_experts // ep_size, intermediate // tp_size
    dtype = torch.bfloat16
    with _tensor_npu_identity():
        method = module.AscendW4A8DynamicFusedMoEMethod()
        if method.tp_size != tp_size:
            raise AssertionError(f"module sees MoE tp_size {method.tp_size}, harness loads for {tp_size}")
        layer = torch.nn.Module()
        written = _register(layer, {**method.get_weight(local_experts, part, hidden, dtype),
                                    **method.get_dynamic_quant_param(local_experts, part, hidden, dtype)})
        for local in range(local_experts):
            expert = ep_rank * local_experts + local
            for proj, shard in ((gate, "w1"), (up, "w3"), (down, "w2")):
                head = f"{prefix}.experts.{expert}.{proj}."
                for suffix, tensor in source.under(head).items():
                    name = ("w2_" if shard == "w2" else "w13_") + suffix
                    if name not in written:
                        raise ValueError(f"{head}{suffix}: vllm-ascend declares no parameter {name}")
                    dest, mask = getattr(layer, name).data[local], written[name][local]
                    what = f"{head}{suffix} -> {name}[{local}]"
                    if shard == "w2":
                        if suffix in CHANNEL_SUFFIXES:
                            _copy(dest, mask, tensor, what)
                        else:
                            width = dest.shape[1]
                            _copy(dest, mask, tensor.narrow(1, tp_rank * width, width), what)
                    else:
                        height = dest.shape[0] // 2
                        start = 0 if shard == "w1" else height
                        _copy(dest.narrow(0, start, height), mask.narrow(0, start, height),
                              tensor.narrow(0, tp_rank * height, height), what)
        _check_written(prefix, written)
        method.process_weights_after_loading(layer)
    return {key: getattr(layer, key).data for key in MOE_KEYS}


def linear_tensors(root: Path | str, prefix: str, version: str = VLLM_ASCEND_VERSION) -> dict[str, torch.Tensor]:
    """Every parameter a W4A8_DYNAMIC Linear layer holds after post-processing (tensor parallelism 1),
    with the module of vllm-ascend `version`."""
    _check_version(version)
    source = _source(str(Path(root).resolve()))
    # the quant method's tensors only: a float `bias` (Qwen2's q/k/v) belongs to the Linear layer itself
    stored = {suffix: tensor for suffix, tensor in source.under(prefix + ".").items()
              if source.description.get(f"{prefix}.{suffix}") == "W4A8_DYNAMIC"}
    if "weight" not in stored or "weight_scale" not in stored:
        raise ValueError(f"{prefix}: no W4A8_DYNAMIC Linear tensors in {source.root}")
    module = _load_module(find_wheel(version), source.quant_items, 1, 1, False, version)
    dtype = source.model_dtype
    output_size = stored["weight_scale"].shape[0]
    input_size = stored["weight"].shape[1]
    bias = stored.get("scale_bias")
    layer_type = "row" if bias is not None and bias.dim() == 2 and bias.shape[1] == 16 else None
    with _tensor_npu_identity():
        method = module.AscendW4A8DynamicLinearMethod()
        params = {k: v for k, v in method.get_weight(input_size, output_size, dtype).items() if not k.startswith("_")}
        params.update(method.get_pertensor_param(dtype))
        params.update(method.get_perchannel_param(output_size, dtype))
        params.update(method.get_pergroup_param(input_size, output_size, dtype, layer_type=layer_type))
        layer = torch.nn.Module()
        written = _register(layer, params)
        for suffix, tensor in stored.items():
            if suffix not in written:
                raise ValueError(f"{prefix}.{suffix}: vllm-ascend declares no parameter {suffix}")
            _copy(getattr(layer, suffix).data, written[suffix], tensor, f"{prefix}.{suffix}")
        _check_written(prefix, written)
        method.process_weights_after_loading(layer)
    return {name: param.data for name, param in layer.named_parameters()}
