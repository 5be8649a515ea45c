"""Test harness: the serving-side weight loading of vLLM + vllm-ascend release pairs, run on the CPU.

`vllm_ascend_harness` runs vllm-ascend's W4A8_DYNAMIC post-processing on tensors that the harness
itself slices as vLLM would. This harness goes one step further: the slicing is vLLM's own code.
Inside a `ServingEnv`, a checkpoint's tensors go through

* the model's real `load_weights` loop (vLLM 0.11.0 `DeepseekV2ForCausalLM.load_weights`,
  `Qwen3MoeModel.load_weights` or `MixtralModel.load_weights`, with the real
  `FusedMoE.make_expert_params_mapping`, `default_weight_loader`, `maybe_remap_kv_scale_name`,
  `get_spec_layer_idx_from_weight_name`),
* the real parameter loaders (vLLM `FusedMoE.weight_loader` and its `_load_*` helpers with
  vllm-ascend's `AscendFusedMoE._load_w13/_load_w2/transpose_weight` on top; vLLM's v1
  `weight_loader` of Replicated/Column/MergedColumn/RowParallelLinear),
* the real parameter factories reached through the real quantization config (vllm-ascend
  `AscendQuantConfig.get_quant_method` -> `AscendFusedMoEMethod` / `AscendLinearMethod` ->
  `utils.get_quant_method` -> `w4a8_dynamic`), and
* the real `process_weights_after_loading`.

Nothing of vLLM or vllm-ascend is kept in this repository: each release is fetched from the package
index at first use (`release_sources`: the wheel, or for vllm-ascend 0.23.0.post1 the sdist, which pip
leaves unpacked), its `*.py` files and metadata are kept in a cache outside the repository and the
archive is deleted (vllm-ascend 0.11/0.13 are small wheels, read as they are through
`vllm_ascend_harness.find_wheel`). The needed functions and classes are picked out of the source with
`ast` (annotations dropped: they name types nobody stands in for), compiled under the release's file
name and executed with stand-in globals. What is stand-in is written here from behaviour: process
groups and configuration answering for one rank, the torch_npu ops (from `vllm_ascend_harness`), the
constructors of the layers (the weight-relevant part of `FusedMoE.__init__` / 0.11's
`AscendFusedMoE.__init__` / the `LinearBase` subclasses), the model containers, and the vllm-ascend
quantization schemes other than W4A8_DYNAMIC (dummy classes).

Releases (`RELEASES`, `ServingEnv(..., release=...)`): "0.11" (the default; vLLM 0.11.0 + vllm-ascend
0.11.0), "0.13" (0.13.0 + 0.13.0), "0.18" (0.18.0 + 0.18.0) and "0.23" (vLLM 0.23.0 + vllm-ascend
0.23.0.post1). What differs between them for weight loading is kept in the table (members, module
paths, the constructor of the MoE layer, where schemes are registered). In 0.13 and later vllm-ascend's
`AscendFusedMoE` no longer overrides the loaders (vLLM's `_load_w13` / `_load_w2` are used as they
are) and its constructor is real here too (`__init__`, with vllm-ascend's `init_eplb_config` for the
expert map; under it a stand-in for vLLM's `FusedMoE.__init__`). 0.13's DeepSeek loop is the one
vllm-ascend patches over vLLM's (`CustomDeepseekV2ForCausalLM.load_weights` of
`vllm_ascend/patch/worker/patch_deepseekv3.py`). From 0.14 the quantization code is the scheme
registry (`quantization/methods/`), `modelslim_config.py` and `method_adapters.py`.
`vllm_ascend.utils.maybe_trans_nz` is the identity, like `npu_format_cast`.

Environment:
  W4A8CONV_SERVING_SOURCES  the source cache (default ~/.cache/w4a8conv/serving-sources)
  W4A8CONV_VLLM_WHEEL, W4A8CONV_VLLM_0_13_WHEEL, W4A8CONV_VLLM_0_18_WHEEL, W4A8CONV_VLLM_0_23_WHEEL
                            a vLLM wheel already on disk, extracted instead of downloaded
  W4A8CONV_VLLM_ASCEND_0_18_WHEEL, W4A8CONV_VLLM_ASCEND_0_23_SDIST  the same for vllm-ascend 0.18 / 0.23.0.post1
  (and W4A8CONV_VLLM_ASCEND_WHEEL / W4A8CONV_VLLM_ASCEND_0_13_WHEEL / W4A8CONV_VLLM_ASCEND_CACHE,
  see vllm_ascend_harness)
"""
from __future__ import annotations

import abc
import ast
import atexit
import collections
import collections.abc
import contextlib
import dataclasses
import enum
import fcntl
import functools
import importlib.machinery
import importlib.util
import itertools
import json
import linecache
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
import typing
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy
import torch
from safetensors import safe_open

try:
    import vllm_ascend_harness as _ascend
except ImportError:  # tests/ imported as a package
    from tests import vllm_ascend_harness as _ascend

__all__ = ["VLLM_VERSION", "VLLM_ASCEND_VERSION", "HarnessUnavailable", "vllm_sources", "release_sources",
           "release_wheels", "ServingEnv",
           "weights_from_dir", "MODEL_TYPES", "RELEASES", "DEFAULT_RELEASE", "Release"]

VLLM_VERSION = "0.11.0"  # of the default release; RELEASES has the others
VLLM_ASCEND_VERSION = _ascend.VLLM_ASCEND_VERSION
HarnessUnavailable = _ascend.HarnessUnavailable

VLLM_WHEEL_ENV = "W4A8CONV_VLLM_WHEEL"

# Wheel members read by the harness.
FUSED_MOE = "vllm/model_executor/layers/fused_moe/layer.py"
FUSED_MOE_METHOD_BASE = "vllm/model_executor/layers/fused_moe/fused_moe_method_base.py"  # 0.13
LINEAR = "vllm/model_executor/layers/linear.py"
BASE_CONFIG = "vllm/model_executor/layers/quantization/base_config.py"
QUANTIZATION_INIT = "vllm/model_executor/layers/quantization/__init__.py"
MODEL_EXECUTOR_UTILS = "vllm/model_executor/utils.py"
WEIGHT_UTILS = "vllm/model_executor/model_loader/weight_utils.py"
EPLB_STATE = "vllm/distributed/eplb/eplb_state.py"
DEEPSEEK = "vllm/model_executor/models/deepseek_v2.py"
QWEN3_MOE = "vllm/model_executor/models/qwen3_moe.py"
MIXTRAL = "vllm/model_executor/models/mixtral.py"
ASCEND_FUSED_MOE = "vllm_ascend/ops/common_fused_moe.py"
ASCEND_UTILS = "vllm_ascend/utils.py"
ASCEND_FUSED_MOE_0_13 = "vllm_ascend/ops/fused_moe/fused_moe.py"
ASCEND_PREPARE_FINALIZE = "vllm_ascend/ops/fused_moe/prepare_finalize.py"
ASCEND_EPLB_UTILS = "vllm_ascend/eplb/core/eplb_utils.py"
ASCEND_PATCH_DEEPSEEK = "vllm_ascend/patch/worker/patch_deepseekv3.py"
METHODS_INIT = "vllm_ascend/quantization/methods/__init__.py"  # 0.14+
ASCEND_DEEPSEEK_V4 = "vllm_ascend/models/deepseek_v4.py"  # 0.23
MODELS_UTILS = "vllm/model_executor/models/utils.py"
ASCEND_DEEPSEEK_V4_MTP = "vllm_ascend/models/deepseek_v4_mtp.py"
EXPERT_MAP_MANAGER = "vllm/model_executor/layers/fused_moe/expert_map_manager.py"  # vLLM 0.23
ASCEND_FUSED_MOE_0_23 = "vllm_ascend/ops/fused_moe/fused_moe_0_23_0.py"
ASCEND_FUSED_MOE_COMMON = "vllm_ascend/ops/fused_moe/fused_moe.py"
MODELSLIM_CONFIG = "vllm_ascend/quantization/modelslim_config.py"
METHOD_ADAPTERS = "vllm_ascend/quantization/method_adapters.py"

# model_type -> (models file, class holding load_weights, ForCausalLM class holding packed_modules_mapping,
#                whether load_weights sits on the inner `model` (behind vLLM's AutoWeightsLoader))
MODEL_TYPES = {
    "deepseek_v2": (DEEPSEEK, "DeepseekV2ForCausalLM", "DeepseekV2ForCausalLM", False),
    "deepseek_v3": (DEEPSEEK, "DeepseekV2ForCausalLM", "DeepseekV2ForCausalLM", False),
    "qwen3_moe": (QWEN3_MOE, "Qwen3MoeModel", "Qwen3MoeForCausalLM", True),
    "mixtral": (MIXTRAL, "MixtralModel", "MixtralForCausalLM", True),
}
STANDIN_ROOTS = ("vllm", "vllm_ascend", "torch_npu")
DEFAULT_RELEASE = "0.11"


# --------------------------------------------------------------------------------------------
# The vLLM wheel


SOURCES_ENV = "W4A8CONV_SERVING_SOURCES"
DEFAULT_SOURCES = Path.home() / ".cache" / "w4a8conv" / "serving-sources"


def _archive_members(archive: Path) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """(path inside the distribution, reader) of every file of a wheel or an sdist (.tar.gz or unpacked)."""
    if archive.is_dir():
        for path in sorted(archive.rglob("*")):
            if path.is_file():
                yield path.relative_to(archive).as_posix(), path.read_bytes
    elif archive.name.endswith(".tar.gz"):
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                if member.isfile():
                    yield member.name.split("/", 1)[-1], functools.partial(
                        lambda m: tar.extractfile(m).read(), member)
    else:
        with zipfile.ZipFile(archive) as wheel:
            for name in wheel.namelist():
                yield name, functools.partial(wheel.read, name)


def _extract_sources(archive: Path, package: str, dist_info: str, folder: Path) -> None:
    """The package's *.py files and the distribution's METADATA (an sdist's PKG-INFO), into `folder`."""
    part = folder.with_name(folder.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    for name, read in _archive_members(archive):
        if name == "PKG-INFO" or name.endswith(".dist-info/METADATA"):
            target = part / dist_info / "METADATA"
        elif name.startswith(f"{package}/") and name.endswith(".py"):
            target = part / name
        else:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(read())
    if not (part / dist_info / "METADATA").is_file() or not (part / package / "__init__.py").is_file():
        shutil.rmtree(part, ignore_errors=True)
        raise HarnessUnavailable(f"{archive}: holds no {package}/__init__.py or no metadata")
    part.rename(folder)


@functools.cache
def release_sources(dist: str, version: str, *, sdist: bool = False, env: str | None = None) -> Path:
    """A folder with the *.py files of `dist`==`version` and its METADATA, read from its wheel (`sdist`: its
    source distribution, the only form some releases have on the index) and cached under
    $W4A8CONV_SERVING_SOURCES (default ~/.cache/w4a8conv/serving-sources); the archive itself is not kept.
    `$env` may name the wheel / sdist / unpacked sdist on disk instead of downloading it."""
    package = dist.replace("-", "_")
    dist_info = f"{package}-{version}.dist-info"
    folder = Path(os.environ.get(SOURCES_ENV) or DEFAULT_SOURCES).expanduser() / f"{package}-{version}"
    if (folder / dist_info / "METADATA").is_file():
        return folder
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HarnessUnavailable(f"cannot create the source cache {folder.parent}: {exc}") from None
    # Test runs from several clones share the cache: one fetches, the others wait and find it there.
    with open(folder.with_name(f".{folder.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / dist_info / "METADATA").is_file():
            _fetch_sources(dist, version, package, dist_info, folder, sdist=sdist, env=env)
    return folder


def _fetch_sources(dist: str, version: str, package: str, dist_info: str, folder: Path, *, sdist: bool,
                   env: str | None) -> None:
    given = os.environ.get(env) if env else None
    if given:
        _extract_sources(Path(given).expanduser(), package, dist_info, folder)
        return
    with tempfile.TemporaryDirectory(prefix="w4a8conv-release-", dir=folder.parent) as scratch:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", scratch, "--disable-pip-version-check",
                   "--quiet"]
        if sdist:  # preparing its metadata fails without the NPU build tools; --no-clean keeps it unpacked
            command += ["--no-binary", ":all:", "--no-build-isolation", "--no-clean"]
        else:
            command += ["--only-binary", ":all:"]
        build = Path(scratch) / "build"
        build.mkdir()
        try:
            done = subprocess.run(command + [f"{dist}=={version}"], capture_output=True, text=True, timeout=900,
                                  check=False, env=dict(os.environ, TMPDIR=str(build)))
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise HarnessUnavailable(f"could not download {dist}=={version}: {exc}") from None
        found = sorted(Path(scratch).glob("*.whl")) + sorted(Path(scratch).glob("*.tar.gz")) + sorted(
            info.parent for info in build.glob("*/*/PKG-INFO")
            if re.search(rf"^Version: {re.escape(version)}$", info.read_text(errors="replace"), re.M))
        if not found:
            raise HarnessUnavailable(f"could not download {dist}=={version} (set ${env} to it on disk): "
                                     f"{(done.stderr or done.stdout).strip()[-600:]}")
        _extract_sources(found[0], package, dist_info, folder)


def vllm_sources(release: str = DEFAULT_RELEASE) -> Path:
    """The extracted sources of the vLLM release a release pair pins (see `release_sources`)."""
    spec = _release(release)
    return release_sources("vllm", spec.vllm_version, env=spec.vllm_wheel_env)


def release_wheels(release: str = DEFAULT_RELEASE) -> tuple[Path, Path]:
    """(vllm, vllm-ascend) of a release: folders of extracted sources, except vllm-ascend 0.11/0.13, whose
    small wheels `vllm_ascend_harness` reads as they are; HarnessUnavailable when either cannot be had."""
    spec = _release(release)
    if spec.layout == "registry":
        return vllm_sources(release), release_sources("vllm-ascend", spec.ascend_version, sdist=spec.ascend_sdist,
                                                      env=spec.ascend_source_env)
    return vllm_sources(release), _ascend.find_wheel(spec.ascend_version)


# --------------------------------------------------------------------------------------------
# Reading and compiling wheel source


@functools.cache
def _member_text(wheel: Path, member: str) -> str:
    """A member's text, from a wheel or from a folder of extracted sources (`release_sources`)."""
    if wheel.is_dir():
        try:
            return (wheel / member).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise HarnessUnavailable(f"{wheel.name} has no {member}") from None
    with zipfile.ZipFile(wheel) as archive:
        try:
            return archive.read(member).decode("utf-8")
        except KeyError:
            raise HarnessUnavailable(f"{wheel.name} has no {member}") from None


def _filename(wheel: Path, member: str) -> str:
    """The name code from a wheel member is compiled under; registered with linecache for tracebacks."""
    name = f"{wheel.name}/{member}"
    if name not in linecache.cache:
        text = _member_text(wheel, member)
        linecache.cache[name] = (len(text), None, text.splitlines(keepends=True), name)
    return name


class _NoAnnotations(ast.NodeTransformer):
    """Drop annotations: they name types nobody stands in for and take no part in behaviour."""

    def visit_arg(self, node: ast.arg) -> ast.arg:
        node.annotation = None
        return node

    def _function(self, node):
        node.returns = None
        self.generic_visit(node)
        return node

    visit_FunctionDef = visit_AsyncFunctionDef = _function

    def visit_AnnAssign(self, node: ast.AnnAssign):
        self.generic_visit(node)
        if node.value is None:
            return ast.copy_location(ast.Pass(), node)
        return ast.copy_location(ast.Assign(targets=[node.target], value=node.value), node)


@functools.cache
def _tree(wheel: Path, member: str) -> ast.Module:
    tree = ast.parse(_member_text(wheel, member), _filename(wheel, member))
    return _NoAnnotations().visit(tree)


def _defined_name(node: ast.stmt) -> str | None:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return node.name
    if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
        return node.targets[0].id
    return None


def _top_level(wheel: Path, member: str, name: str) -> ast.stmt:
    found = [node for node in _tree(wheel, member).body if _defined_name(node) == name]
    if not found:
        raise HarnessUnavailable(f"{wheel.name}/{member} defines no top-level {name!r}")
    return found[-1]


def _class_members(wheel: Path, member: str, class_name: str, names: Iterable[str]) -> list[ast.stmt]:
    """The definitions of `names` in a class body, in source order (all @overload variants included)."""
    cls = _top_level(wheel, member, class_name)
    if not isinstance(cls, ast.ClassDef):
        raise HarnessUnavailable(f"{wheel.name}/{member}: {class_name} is not a class")
    wanted = set(names)
    picked = [node for node in cls.body if _defined_name(node) in wanted]
    missing = wanted - {_defined_name(node) for node in picked}
    if missing:
        raise HarnessUnavailable(f"{wheel.name}/{member}: {class_name} defines no {sorted(missing)}")
    return picked


@functools.cache
def _code_top_level(wheel: Path, member: str, names: tuple[str, ...]):
    body = [_top_level(wheel, member, name) for name in names]
    return compile(ast.Module(body=body, type_ignores=[]), _filename(wheel, member), "exec")


@functools.cache
def _code_class(wheel: Path, member: str, class_name: str, names: tuple[str, ...], new_name: str):
    """`class <new_name>(__harness_base__): <the real definitions of names in class_name>`."""
    members = _class_members(wheel, member, class_name, names)
    original = _top_level(wheel, member, class_name)
    extra = {"type_params": []} if "type_params" in ast.ClassDef._fields else {}
    cls = ast.ClassDef(name=new_name, bases=[ast.Name(id="__harness_base__", ctx=ast.Load())], keywords=[],
                       body=members, decorator_list=[], **extra)
    ast.copy_location(cls, original)
    module = ast.fix_missing_locations(ast.Module(body=[cls], type_ignores=[]))
    return compile(module, _filename(wheel, member), "exec")


def _define(wheel: Path, member: str, names: Iterable[str], namespace: dict) -> dict:
    """Execute the real top-level definitions `names` of a wheel member into `namespace`."""
    exec(_code_top_level(wheel, member, tuple(names)), namespace)
    return namespace


def _real_class(wheel: Path, member: str, class_name: str, names: Iterable[str], base: type, namespace: dict,
                new_name: str | None = None) -> type:
    """A class named like the real one, deriving from `base`, whose body is the real `names`."""
    new_name = new_name or class_name
    scope = dict(namespace, __harness_base__=base)
    exec(_code_class(wheel, member, class_name, tuple(names), new_name), scope)
    return scope[new_name]


def _real_dataclass(wheel: Path, member: str, class_name: str, namespace: dict) -> type:
    """A real top-level dataclass, annotations kept (they declare its fields)."""
    tree = ast.parse(_member_text(wheel, member), _filename(wheel, member))
    node = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name), None)
    if node is None:
        raise HarnessUnavailable(f"{wheel.name}/{member} defines no class {class_name}")
    scope = dict(namespace)
    exec(compile(ast.Module(body=[node], type_ignores=[]), _filename(wheel, member), "exec"), scope)
    return scope[class_name]


def _literal(wheel: Path, member: str, name: str, class_name: str | None = None):
    """The literal value assigned to a (class-level) name in a wheel member."""
    nodes = (_class_members(wheel, member, class_name, [name]) if class_name
             else [_top_level(wheel, member, name)])
    return ast.literal_eval(nodes[-1].value)


# --------------------------------------------------------------------------------------------
# importlib.metadata for the stand-in packages


@functools.cache
def _dist_dir(vllm_wheel: Path, ascend_wheel: Path, vllm_version: str = VLLM_VERSION,
              ascend_version: str = VLLM_ASCEND_VERSION) -> str:
    """A directory with the wheels' real dist-info METADATA (for importlib.metadata.version)."""
    root = tempfile.mkdtemp(prefix="w4a8conv-serving-dist-")
    atexit.register(shutil.rmtree, root, True)
    for wheel, dist in ((vllm_wheel, f"vllm-{vllm_version}.dist-info"),
                        (ascend_wheel, f"vllm_ascend-{ascend_version}.dist-info")):
        folder = Path(root) / dist
        folder.mkdir()
        (folder / "METADATA").write_text(_member_text(wheel, f"{dist}/METADATA"), encoding="utf-8")
    return root


# --------------------------------------------------------------------------------------------
# Stand-ins written from behaviour


class _Logger:
    """vLLM's logger interface (`info_once`, `warning_once`, ...), forwarded to logging."""

    def __init__(self, name: str = "w4a8conv.vllm_serving_harness"):
        self._log = logging.getLogger(name)

    def __getattr__(self, method: str):
        level = method.removesuffix("_once")
        target = getattr(self._log, level if level in ("debug", "info", "warning", "error", "exception",
                                                       "critical") else "debug")
        return lambda msg, *args, **kwargs: target(msg, *args)


def _unavailable(name: str):
    def call(*args, **kwargs):
        raise NotImplementedError(f"{name} is not part of weight loading (harness stand-in)")
    return call


def _dummy_class(name: str, module: str, base: type = object) -> type:
    def init(self, *args, **kwargs):
        raise NotImplementedError(f"{module}.{name} is a harness stand-in (only W4A8_DYNAMIC is real)")
    return type(name, (base,), {"__init__": init, "__module__": module})


def _permissive_module(name: str, attrs: dict | None = None) -> types.ModuleType:
    """A stand-in module whose names not given are placeholders raising when called: names imported by the
    real modules for paths weight loading never takes (serving, other features)."""
    module = _module(name, attrs)

    def missing(attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _unavailable(f"{name}.{attr}")

    module.__getattr__ = missing
    return module


def _relative_imports(wheel: Path, member: str) -> list[tuple[str, list[str]]]:
    """(module, names) of each `from .module import names` at the top level of a member."""
    return [(node.module, [alias.name for alias in node.names]) for node in _tree(wheel, member).body
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module]


def _divide(numerator: int, denominator: int) -> int:
    if numerator % denominator:
        raise ValueError(f"{numerator} is not divisible by {denominator}")
    return numerator // denominator


class _FusedMoEInit(torch.nn.Module):
    """The weight-relevant part of vLLM FusedMoE.__init__ (written from behaviour)."""

    def __init__(self, *, num_experts: int, hidden_size: int, intermediate_size: int, params_dtype: torch.dtype,
                 quant_config, prefix: str, moe_parallel_config: SimpleNamespace, vllm_config=None):
        super().__init__()
        self.moe_parallel_config = moe_parallel_config  # read by the real tp_size/ep_size/... properties
        self.global_num_experts = num_experts
        self.layer_name = prefix
        self.prefix = prefix
        self.hidden_size = hidden_size
        self.intermediate_size_per_partition = intermediate_size // self.tp_size
        self.params_dtype = params_dtype
        self.quant_config = quant_config
        self.custom_routing_function = None
        self.e_score_correction_bias = None
        self.moe_config = SimpleNamespace(num_experts=num_experts, hidden_dim=hidden_size,
                                          intermediate_size_per_partition=self.intermediate_size_per_partition,
                                          in_dtype=params_dtype, moe_parallel_config=moe_parallel_config)


class _LinearInit(torch.nn.Module):
    """The weight-relevant part of the LinearBase subclasses' constructors (written from behaviour)."""

    def __init__(self, *, prefix: str, input_size: int, output_sizes: list[int], input_size_per_partition: int,
                 output_partition_sizes: list[int], params_dtype: torch.dtype, quant_config, tp_size: int,
                 tp_rank: int):
        super().__init__()
        self.prefix = prefix
        self.input_size = input_size
        self.output_sizes = list(output_sizes)
        self.output_size = sum(output_sizes)
        self.input_size_per_partition = input_size_per_partition
        self.output_partition_sizes = list(output_partition_sizes)
        self.output_size_per_partition = sum(output_partition_sizes)
        self.params_dtype = params_dtype
        self.quant_config = quant_config
        self.tp_size, self.tp_rank = tp_size, tp_rank
        self.skip_bias_add = False
        self.quant_method = quant_config.get_quant_method(self, prefix=prefix)
        if self.quant_method is None:
            raise ValueError(f"{prefix}: the quantization config gives no method for this layer")
        self.quant_method.create_weights(self, self.input_size_per_partition, self.output_partition_sizes,
                                         self.input_size, self.output_size, self.params_dtype,
                                         weight_loader=self.weight_loader)
        self.register_parameter("bias", None)


class _FusedMoEInit013(torch.nn.Module):
    """The weight-relevant part of vLLM 0.13 FusedMoE.__init__ (written from behaviour), under the real
    AscendFusedMoE.__init__ of vllm-ascend 0.13. vLLM's constructor also asks the quantization config
    for a method and creates the weights, with its own expert map; AscendFusedMoE.__init__ then does
    both again, replacing them (same method class, same parameter names), so here they are done once,
    by the real AscendFusedMoE.__init__."""

    def __init__(self, *, num_experts: int, hidden_size: int, intermediate_size: int, params_dtype: torch.dtype,
                 quant_config, prefix: str, moe_parallel_config: SimpleNamespace, top_k: int = 1, **unused):
        super().__init__()
        self.moe_parallel_config = moe_parallel_config  # read by the real tp_size/ep_size/... properties
        self.params_dtype = params_dtype
        self.global_num_experts = num_experts
        self.logical_num_experts = num_experts
        self.layer_name = prefix
        self.enable_eplb = False
        self.rocm_aiter_fmoe_enabled = False  # read by the real expert_map property
        self._expert_map = None               # EP: vLLM's own map, which AscendFusedMoE replaces
        self.expert_mask = None
        self.top_k = top_k
        self.hidden_size = hidden_size
        self.intermediate_size_per_partition = intermediate_size // self.tp_size
        self.custom_routing_function = None
        self.e_score_correction_bias = None
        self.quant_config = quant_config
        parallel = moe_parallel_config
        self.moe_config = SimpleNamespace(  # FusedMoEConfig, its properties resolved
            num_experts=num_experts, experts_per_token=top_k, hidden_dim=hidden_size,
            num_local_experts=num_experts, moe_parallel_config=parallel, in_dtype=params_dtype,
            has_bias=False, is_act_and_mul=True, is_lora_enabled=False,
            tp_size=parallel.tp_size, dp_size=parallel.dp_size, ep_size=parallel.ep_size,
            tp_rank=parallel.tp_rank, dp_rank=parallel.dp_rank, ep_rank=parallel.ep_rank, use_ep=parallel.use_ep)

    def _init_runner(self):
        """(vLLM 0.18+) the runner that executes the experts: not part of weight loading."""
        return None


class _ExpertMapManagerState:
    """The state vLLM 0.23's ExpertMapManager keeps (its real `map_global_to_local` reads it); vllm-ascend's
    AscendFusedMoE.__init__ overwrites it with its own expert map."""

    def __init__(self):
        self._expert_map = None
        self._local_num_experts = None


class _FusedMoEInit023(torch.nn.Module):
    """The weight-relevant part of vLLM 0.23 FusedMoE.__init__ (written from behaviour), under the real
    AscendFusedMoE.__init__ of vllm-ascend 0.23 (which, as in 0.13/0.18, asks for the quant method and
    creates the weights itself). hidden_size and intermediate_size_per_partition are vLLM 0.23 properties
    reading moe_config."""

    expert_map_manager_class: type  # set by ServingEnv: the state above with the real map_global_to_local

    def __init__(self, *, num_experts: int, hidden_size: int, intermediate_size: int, params_dtype: torch.dtype,
                 quant_config, prefix: str, moe_parallel_config: SimpleNamespace, top_k: int = 1,
                 vllm_config=None, **unused):
        super().__init__()
        parallel = moe_parallel_config
        self.moe_parallel_config = parallel
        self.vllm_config = vllm_config
        self.params_dtype = params_dtype
        self.global_num_experts = num_experts
        self.logical_num_experts = num_experts
        self.layer_name = prefix
        self.enable_eplb = False
        self.rocm_aiter_fmoe_enabled = False
        self._expert_map = None
        self.expert_mask = None
        self.top_k = top_k
        self.custom_routing_function = None
        self.e_score_correction_bias = None
        self.quant_config = quant_config
        self.router = None
        self.expert_map_manager = self.expert_map_manager_class()
        self.moe_config = SimpleNamespace(  # FusedMoEConfig, its properties resolved
            num_experts=num_experts, experts_per_token=top_k, hidden_dim=hidden_size,
            intermediate_size_per_partition=intermediate_size // parallel.tp_size,
            num_local_experts=num_experts, moe_parallel_config=parallel, in_dtype=params_dtype,
            has_bias=False, is_act_and_mul=True, is_lora_enabled=False,
            tp_size=parallel.tp_size, dp_size=parallel.dp_size, ep_size=parallel.ep_size,
            tp_rank=parallel.tp_rank, dp_rank=parallel.dp_rank, ep_rank=parallel.ep_rank, use_ep=parallel.use_ep)


@dataclasses.dataclass(frozen=True)
class Release:
    """A vLLM + vllm-ascend release pair: where its weight-loading code lives and what it imports."""

    vllm_version: str
    ascend_version: str
    vllm_wheel_env: str                  # a vLLM wheel on disk to read instead of downloading it
    moe_method_base: str                 # the vLLM member defining FusedMoEMethodBase
    fused_moe_init: type                 # stand-in for vLLM's FusedMoE.__init__
    fused_moe_members: tuple[str, ...]   # the real FusedMoE members (properties and loaders)
    ascend_moe: tuple[str, str]          # (module, wheel member) of AscendFusedMoE
    ascend_moe_members: tuple[str, ...]  # its real members
    ascend_moe_builder: str              # ServingEnv method making AscendFusedMoE from them
    experts_selector: str                # the module vllm-ascend imports select_experts from
    ascend_utils_literals: tuple[str, ...]  # the constants of vllm_ascend/utils.py read by the real code
    other_schemes: tuple[tuple[str, tuple[str, ...]], ...]  # quantization schemes other than W4A8_DYNAMIC
    # model_type -> (wheel "vllm"/"ascend", member, class): the served load_weights where not MODEL_TYPES'
    loaders: tuple[tuple[str, tuple[str, str, str]], ...] = ()
    # "map": 0.11-0.13 (quant_config.py, ASCEND_QUANTIZATION_METHOD_MAP; wheels read as they are);
    # "registry": 0.14+ (modelslim_config.py, method_adapters.py, methods/; sources via `release_sources`)
    layout: str = "map"
    ascend_source_env: str = ""  # (registry) a vllm-ascend wheel / sdist on disk instead of a download
    ascend_sdist: bool = False   # (registry) the release is on the index as an sdist only
    merged_members: tuple[str, ...] = ("weight_loader",)  # the real MergedColumnParallelLinear members
    # (vLLM member, names): where determine_expert_map and friends are defined
    expert_map_functions: tuple[tuple[str, tuple[str, ...]], ...] = (
        (FUSED_MOE, ("determine_expert_map", "get_compressed_expert_map")),)
    model_types: tuple[tuple[str, tuple[str, str, str, bool]], ...] = ()  # MODEL_TYPES entries that moved
    # the top-level names of vLLM's linear.py its weight loaders use
    linear_helpers: tuple[str, ...] = ("WEIGHT_LOADER_V2_SUPPORTED", "adjust_bitblas_shard", "adjust_marlin_shard",
                                       "adjust_bitsandbytes_4bit_shard", "adjust_scalar_to_fused_array",
                                       "left_shift_bitsandbytes_4bit_shard", "LinearMethodBase")


_LOADER_MEMBERS = ("_load_per_tensor_weight_scale", "_load_combined_w13_weight_scale",
                   "_load_model_weight_or_group_weight_scale", "_load_per_channel_weight_scale", "_load_w13",
                   "_load_w2", "_load_single_value", "_load_g_idx", "_map_global_expert_id_to_local_expert_id",
                   "weight_loader", "make_expert_params_mapping")
_PROPERTIES = ("tp_size", "dp_size", "ep_size", "tp_rank", "dp_rank", "ep_rank", "use_ep")
_LINEAR_HELPERS_0_18 = ("WEIGHT_LOADER_V2_SUPPORTED", "adjust_marlin_shard", "adjust_block_scale_shard",
                        "adjust_bitsandbytes_4bit_shard", "adjust_scalar_to_fused_array", "LinearMethodBase")
_PROPERTIES_0_18 = ("tp_size", "ep_size", "tp_rank", "ep_rank", "use_ep")  # dp_* dropped

RELEASES = {
    "0.11": Release(
        vllm_version=VLLM_VERSION, ascend_version=VLLM_ASCEND_VERSION,
        vllm_wheel_env=VLLM_WHEEL_ENV,
        moe_method_base=FUSED_MOE, fused_moe_init=_FusedMoEInit, fused_moe_members=_PROPERTIES + _LOADER_MEMBERS,
        ascend_moe=("vllm_ascend.ops.common_fused_moe", ASCEND_FUSED_MOE),
        ascend_moe_members=("transpose_weight", "_load_w13", "_load_w2"), ascend_moe_builder="_ascend_moe_0_11",
        experts_selector="vllm_ascend.ops.moe.experts_selector",
        ascend_utils_literals=("ASCEND_QUANTIZATION_METHOD", "ACL_FORMAT_FRACTAL_ND", "ACL_FORMAT_FRACTAL_NZ"),
        other_schemes=(("w8a8", ("AscendW8A8LinearMethod", "AscendW8A8FusedMoEMethod", "AscendC8KVCacheMethod")),
                       ("w8a8_dynamic", ("AscendW8A8DynamicLinearMethod", "AscendW8A8DynamicFusedMoEMethod")),
                       ("w4a4_flatquant_dynamic", ("AscendW4A4FlatQuantDynamicLinearMethod",)))),
    "0.13": Release(
        vllm_version="0.13.0", ascend_version="0.13.0",
        vllm_wheel_env="W4A8CONV_VLLM_0_13_WHEEL",
        moe_method_base=FUSED_MOE_METHOD_BASE, fused_moe_init=_FusedMoEInit013,
        fused_moe_members=_PROPERTIES + ("expert_map",) + _LOADER_MEMBERS,
        ascend_moe=("vllm_ascend.ops.fused_moe.fused_moe", ASCEND_FUSED_MOE_0_13),
        ascend_moe_members=("moe_counter", "gate_stream", "__init__", "_get_quant_type"),
        ascend_moe_builder="_ascend_moe_0_13",
        experts_selector="vllm_ascend.ops.fused_moe.experts_selector",
        ascend_utils_literals=("ASCEND_QUANTIZATION_METHOD", "ACL_FORMAT_FRACTAL_ND", "ACL_FORMAT_FRACTAL_NZ",
                               "COMPRESSED_TENSORS_METHOD"),
        other_schemes=(("w8a8", ("AscendW8A8LinearMethod",)),
                       ("w8a8_dynamic", ("AscendW8A8DynamicLinearMethod", "AscendW8A8DynamicFusedMoEMethod")),
                       ("w4a4_flatquant_dynamic", ("AscendW4A4FlatQuantDynamicLinearMethod",)),
                       ("w4a16", ("AscendW4A16FusedMoEMethod",)),
                       ("w8a8_pdmix", ("AscendW8A8PDMixLinearMethod", "AscendW8A8PDMixFusedMoeMethod")),
                       ("w8a8mxfp8", ("AscendW8A8MXFP8DynamicLinearMethod",)),
                       ("w8a16", ("AscendW8A16LinearMethod",))),
        # vllm-ascend 0.13 replaces DeepseekV2ForCausalLM.load_weights (patch/worker/patch_deepseekv3.py)
        loaders=tuple((model_type, ("ascend", ASCEND_PATCH_DEEPSEEK, "CustomDeepseekV2ForCausalLM"))
                      for model_type in ("deepseek_v2", "deepseek_v3"))),
    "0.18": Release(
        vllm_version="0.18.0", ascend_version="0.18.0",
        vllm_wheel_env="W4A8CONV_VLLM_0_18_WHEEL",
        moe_method_base=FUSED_MOE_METHOD_BASE, fused_moe_init=_FusedMoEInit013,
        fused_moe_members=_PROPERTIES_0_18 + ("expert_map",) + _LOADER_MEMBERS,
        ascend_moe=("vllm_ascend.ops.fused_moe.fused_moe", ASCEND_FUSED_MOE_0_13),
        ascend_moe_members=("moe_counter", "gate_stream", "__init__", "_get_quant_type"),
        ascend_moe_builder="_ascend_moe_registry", experts_selector="vllm_ascend.ops.fused_moe.experts_selector",
        ascend_utils_literals=("ASCEND_QUANTIZATION_METHOD", "ACL_FORMAT_FRACTAL_ND", "ACL_FORMAT_FRACTAL_NZ",
                               "COMPRESSED_TENSORS_METHOD"),
        other_schemes=(), layout="registry", ascend_source_env="W4A8CONV_VLLM_ASCEND_0_18_WHEEL",
        linear_helpers=_LINEAR_HELPERS_0_18, merged_members=("validate_shard_id", "weight_loader")),
    # vllm-ascend 0.23.0.post1 is an sdist only; its W4A8 code is 0.23.0's. With vLLM 0.23.0 it serves MoE
    # through vLLM's FusedMoE (fused_moe_0_23_0.py), not the RoutedExperts path of later vLLM.
    "0.23": Release(
        vllm_version="0.23.0", ascend_version="0.23.0.post1",
        vllm_wheel_env="W4A8CONV_VLLM_0_23_WHEEL",
        moe_method_base=FUSED_MOE_METHOD_BASE, fused_moe_init=_FusedMoEInit023,
        fused_moe_members=_PROPERTIES_0_18 + ("expert_map", "hidden_size", "intermediate_size_per_partition",
                                              "_get_hidden_dim", "_narrow_expert_data_for_padding")
        + _LOADER_MEMBERS,
        ascend_moe=("vllm_ascend.ops.fused_moe.fused_moe", ASCEND_FUSED_MOE_0_23),
        ascend_moe_members=("moe_counter", "gate_stream", "__init__", "_get_quant_type"),
        ascend_moe_builder="_ascend_moe_registry", experts_selector="vllm_ascend.ops.fused_moe.experts_selector",
        ascend_utils_literals=("ASCEND_QUANTIZATION_METHOD", "ACL_FORMAT_FRACTAL_ND", "ACL_FORMAT_FRACTAL_NZ",
                               "COMPRESSED_TENSORS_METHOD"),
        other_schemes=(), layout="registry", ascend_source_env="W4A8CONV_VLLM_ASCEND_0_23_SDIST", ascend_sdist=True,
        linear_helpers=_LINEAR_HELPERS_0_18, merged_members=("validate_shard_id", "weight_loader"),
        expert_map_functions=((EXPERT_MAP_MANAGER, ("determine_expert_map",)),),
        # vLLM 0.23's DeepSeek loop sits on the inner DeepseekV2Model, behind AutoWeightsLoader; DeepSeek-V4
        # is vllm-ascend's own model
        model_types=tuple((model_type, (DEEPSEEK, "DeepseekV2Model", "DeepseekV2ForCausalLM", True))
                          for model_type in ("deepseek_v2", "deepseek_v3"))
        + (("deepseek_v4", (ASCEND_DEEPSEEK_V4, "AscendDeepseekV4ForCausalLM", "AscendDeepseekV4ForCausalLM",
                            False)),),
        loaders=(("deepseek_v4", ("ascend", ASCEND_DEEPSEEK_V4, "AscendDeepseekV4ForCausalLM")),)),
}


def _release(name: str) -> Release:
    if name not in RELEASES:
        raise ValueError(f"release {name!r}: the harness knows {sorted(RELEASES)}")
    return RELEASES[name]


class _ModelRoot(torch.nn.Module):
    """The attributes a model's load_weights reads; submodules are attached by ServingEnv.model."""

    def __init__(self, config: SimpleNamespace, quant_config, num_redundant_experts: int = 0):
        super().__init__()
        self.config = config
        self.quant_config = quant_config
        self.num_redundant_experts = num_redundant_experts
        self.use_mha = False  # (vLLM 0.18+ DeepSeek) MLA attention: no q/k/v stacking


class _AutoLoadedRoot(torch.nn.Module):
    """A ForCausalLM whose load_weights hands `model.*` to its `model` child, as vLLM's AutoWeightsLoader does."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        def inner():
            for name, tensor in weights:
                head, _, rest = name.partition(".")
                if head != "model":
                    raise ValueError(f"{name}: this harness routes only model.* weights (to the `model` child)")
                yield rest, tensor
        return {f"model.{name}" for name in self.model.load_weights(inner())}


def _module(name: str, attrs: dict | None = None, package: bool = False, file: str | None = None) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=package)
    module.__package__ = name if package else name.rpartition(".")[0]
    if package:
        module.__path__ = []
    if file:
        module.__file__ = file
    module.__dict__.update(attrs or {})
    return module


# --------------------------------------------------------------------------------------------
# The environment


class ServingEnv:
    """One rank of a vLLM + vllm-ascend server (0.11.0 + 0.11.0 by default, release="0.13" for
    0.13.0 + 0.13.0), for loading weights on the CPU.

    Use as a context manager; inside it, `vllm.*`, `vllm_ascend.*` and `torch_npu` are importable
    (the real vllm-ascend quantization modules among stand-ins), and the methods below build layers,
    load a checkpoint through the model's real load_weights, and post-process.
    """

    def __init__(self, description: dict, *, model_type: str = "deepseek_v3", tp_size: int = 1, tp_rank: int = 0,
                 ep_size: int = 1, ep_rank: int = 0, params_dtype: torch.dtype = torch.bfloat16,
                 release: str = DEFAULT_RELEASE):
        self._spec = _release(release)
        if model_type not in self._model_types():
            raise ValueError(f"model_type {model_type!r}: the harness knows {sorted(self._model_types())} "
                             f"for release {release}")
        if not (tp_size >= 1 and ep_size >= 1 and 0 <= tp_rank < tp_size and 0 <= ep_rank < ep_size):
            raise ValueError(f"bad split: tp {tp_rank}/{tp_size}, ep {ep_rank}/{ep_size}")
        if ep_size > 1 and tp_size != 1:
            raise ValueError("with expert parallelism this harness requires tp_size 1")
        self.release = release
        self.description = dict(description)  # AscendQuantConfig adds keys to the dict it is given
        self.model_type = model_type
        self.tp_size, self.tp_rank, self.ep_size, self.ep_rank = tp_size, tp_rank, ep_size, ep_rank
        self.enable_ep = ep_size > 1
        self.params_dtype = params_dtype
        self.quant_config = None
        self._active = False

    def _model_types(self) -> dict[str, tuple[str, str, str, bool]]:
        return {**MODEL_TYPES, **dict(self._spec.model_types)}

    # ---- context

    def __enter__(self) -> ServingEnv:
        if self._active:
            raise RuntimeError("ServingEnv is not reentrant")
        self.vllm_wheel, self.ascend_wheel = release_wheels(self.release)
        self._saved_modules = {n: m for n, m in sys.modules.items() if self._ours(n)}
        self._saved_path = list(sys.path)
        self._added: set[str] = set()
        self._num_experts: dict[int, int] = {}  # id(MoE layer) -> its experts (logical, as built)
        self._active = True
        try:
            self._dist = _dist_dir(self.vllm_wheel, self.ascend_wheel, self._spec.vllm_version,
                                   self._spec.ascend_version)
            sys.path.insert(0, self._dist)
            self._install()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        for name in [n for n in sys.modules if self._ours(n) or n in self._added]:
            del sys.modules[name]
        sys.modules.update(self._saved_modules)
        sys.path[:] = self._saved_path
        sys.path_importer_cache.pop(getattr(self, "_dist", None), None)
        self._active = False

    @staticmethod
    def _ours(name: str) -> bool:
        return name.partition(".")[0] in STANDIN_ROOTS

    def _require_active(self) -> None:
        if not self._active:
            raise RuntimeError("use ServingEnv as a context manager (with ServingEnv(...) as env: ...)")

    # ---- module installation

    def _add(self, name: str, module: types.ModuleType) -> types.ModuleType:
        sys.modules[name] = module
        self._added.add(name)
        parent, _, child = name.rpartition(".")
        if parent and parent in sys.modules:
            setattr(sys.modules[parent], child, module)
        return module

    def _add_with_parents(self, name: str, module: types.ModuleType) -> types.ModuleType:
        """`_add`, after stand-in packages for the parents not installed yet."""
        parts = name.split(".")
        for end in range(1, len(parts)):
            parent = ".".join(parts[:end])
            if parent not in sys.modules:
                self._add(parent, _module(parent, package=True))
        return self._add(name, module)

    def _exec(self, name: str, wheel: Path, member: str, package: bool = False) -> types.ModuleType:
        """A whole real module from a wheel, executed as `name` (its imports resolve through sys.modules)."""
        module = self._add(name, _module(name, package=package, file=_filename(wheel, member)))
        exec(compile(_member_text(wheel, member), _filename(wheel, member), "exec"), module.__dict__)
        return module

    def _install(self) -> None:
        vw, aw = self.vllm_wheel, self.ascend_wheel
        spec = self._spec
        ep_world = self.ep_size if self.enable_ep else self.tp_size  # EP off: the EP group spans the MoE TP ranks
        ep_rank = self.ep_rank if self.enable_ep else self.tp_rank
        logger = _Logger()
        self._logger = logger
        platform = SimpleNamespace(use_sync_weight_loader=lambda: False, is_cuda_alike=lambda: False,
                                   is_cuda=lambda: False, is_rocm=lambda: False, is_cpu=lambda: False,
                                   is_out_of_tree=lambda: True, device_type="npu", device_name="npu",
                                   supported_quantization=[])
        hf_config = SimpleNamespace(model_type=self.model_type)
        self.vllm_config = SimpleNamespace(
            quant_config=None,  # the real AscendQuantConfig, below
            parallel_config=SimpleNamespace(enable_expert_parallel=self.enable_ep, tensor_parallel_size=self.tp_size,
                                            data_parallel_size=self.ep_size if self.enable_ep else 1,
                                            expert_placement_strategy="linear", enable_dbo=False),
            model_config=SimpleNamespace(hf_config=hf_config, hf_text_config=hf_config, dtype=self.params_dtype),
            compilation_config=SimpleNamespace(static_forward_context={}), lora_config=None)
        tp_group = SimpleNamespace(world_size=self.tp_size, rank_in_group=self.tp_rank)
        ep_group = SimpleNamespace(world_size=ep_world, rank_in_group=ep_rank)
        dp_group = SimpleNamespace(world_size=self.ep_size if self.enable_ep else 1,
                                   rank_in_group=self.ep_rank if self.enable_ep else 0)
        # A group without `device_group`: w4a8_dynamic catches the AttributeError (no HCCL on the CPU).
        mc2_group = SimpleNamespace()
        self._groups = SimpleNamespace(tp=tp_group, ep=ep_group, dp=dp_group, mc2=mc2_group)
        self.ascend_config = SimpleNamespace(dynamic_eplb=False, expert_map_record_path=None, expert_map_path=None,
                                             init_redundancy_expert=0, enable_shared_expert_dp=False,
                                             oproj_tensor_parallel_size=None, multistream_overlap_gate=False,
                                             mix_placement=False, flashcomm2_oproj_tensor_parallel_size=None,
                                             # 0.14+: EPLB settings moved under eplb_config
                                             eplb_config=SimpleNamespace(dynamic_eplb=False, expert_map_path=None,
                                                                         num_redundant_experts=0, eplb_policy_type=0),
                                             multistream_overlap_shared_expert=False, weight_nz_mode=1,
                                             ascend_compilation_config=SimpleNamespace(enable_static_kernel=False))
        # The real constants of vllm_ascend/utils.py (the module itself pulls in the NPU runtime).
        ascend_utils = {name: _literal(aw, ASCEND_UTILS, name) for name in spec.ascend_utils_literals}

        # torch_npu and the vllm/vllm_ascend packages
        self._add("torch_npu", _module("torch_npu", dict(
            npu_convert_weight_to_int4pack=_ascend.npu_convert_weight_to_int4pack,
            npu_quantize=_ascend.npu_quantize, npu_format_cast=_ascend.npu_format_cast,
            npu_weight_quant_batchmatmul=_unavailable("npu_weight_quant_batchmatmul")), package=True))
        for name in ("vllm", "vllm.model_executor", "vllm.model_executor.layers", "vllm.model_executor.models",
                     "vllm.model_executor.model_loader", "vllm.distributed.eplb", "vllm.attention"):
            self._add(name, _module(name, package=True))
        self._add("vllm.logger", _module("vllm.logger", dict(logger=logger, init_logger=lambda name: logger)))
        self._add("vllm.config", _module("vllm.config", dict(get_current_vllm_config=lambda: self.vllm_config)))
        self._add("vllm.distributed", _module("vllm.distributed", dict(
            get_ep_group=lambda: ep_group, get_tp_group=lambda: tp_group, get_dp_group=lambda: dp_group,
            get_pp_group=lambda: SimpleNamespace(world_size=1, rank_in_group=0, is_first_rank=True,
                                                 is_last_rank=True),
            get_tensor_model_parallel_world_size=lambda: self.tp_size,
            get_tensor_model_parallel_rank=lambda: self.tp_rank, divide=_divide,
            tensor_model_parallel_all_reduce=_unavailable("tensor_model_parallel_all_reduce")), package=True))
        self._add("vllm.forward_context", _module("vllm.forward_context", dict(
            get_forward_context=_unavailable("get_forward_context"))))
        self._add("vllm.platforms", _module("vllm.platforms", dict(current_platform=platform), package=True))
        self._add("vllm.attention.layer", _module("vllm.attention.layer", dict(
            Attention=type("Attention", (torch.nn.Module,), {"__module__": "vllm.attention.layer"}))))
        # vllm.utils.torch_utils (0.13's model_executor/utils.py imports it; not used in loading)
        self._add("vllm.utils", _module("vllm.utils", package=True))
        self._add("vllm.utils.torch_utils", _module("vllm.utils.torch_utils", dict(
            is_torch_equal_or_newer=_unavailable("is_torch_equal_or_newer"))))

        if importlib.util.find_spec("transformers") is None:  # (vLLM 0.23) named in annotations only
            self._add("transformers", _module("transformers", dict(PretrainedConfig=type("PretrainedConfig", (), {}))))
        # Real vLLM modules, executed whole: quantization base classes and registry, set_weight_attrs.
        base_config = self._exec("vllm.model_executor.layers.quantization.base_config", vw, BASE_CONFIG)
        self._exec("vllm.model_executor.layers.quantization", vw, QUANTIZATION_INIT, package=True)
        sys.modules["vllm.model_executor.layers.quantization"].base_config = base_config
        mutils = self._exec("vllm.model_executor.utils", vw, MODEL_EXECUTOR_UTILS)
        QuantizeMethodBase = base_config.QuantizeMethodBase
        self._QuantizeMethodBase = QuantizeMethodBase

        # vllm.distributed.eplb.eplb_state: EplbState with its real initial physical->logical map
        EplbState = _real_class(vw, EPLB_STATE, "EplbState", ["build_initial_global_physical_to_logical_map"],
                                object, {"__name__": "vllm.distributed.eplb.eplb_state"})
        self._add("vllm.distributed.eplb.eplb_state", _module("vllm.distributed.eplb.eplb_state",
                                                               dict(EplbState=EplbState)))

        # vllm.model_executor.layers.fused_moe: real FusedMoeWeightScaleSupported, FusedMoEMethodBase,
        # determine_expert_map, get_compressed_expert_map; FusedMoE = stand-in constructor + the real
        # properties and loader methods.
        moe_ns = {"__name__": "vllm.model_executor.layers.fused_moe.layer", "torch": torch, "F": torch.nn.functional,
                  "UninitializedParameter": torch.nn.parameter.UninitializedParameter, "Enum": enum.Enum,
                  "abstractmethod": abc.abstractmethod, "overload": typing.overload, "Literal": typing.Literal,
                  "Optional": typing.Optional, "Union": typing.Union, "Callable": collections.abc.Callable,
                  "Iterable": collections.abc.Iterable, "get_args": typing.get_args,
                  "nullcontext": contextlib.nullcontext,
                  "ExpertPlacementStrategy": None,  # only named in determine_expert_map's error message
                  "EplbState": EplbState, "QuantizeMethodBase": QuantizeMethodBase,
                  "QuantizationConfig": base_config.QuantizationConfig, "set_weight_attrs": mutils.set_weight_attrs,
                  "current_platform": platform, "logger": logger,
                  "get_ep_group": lambda: ep_group, "get_dp_group": lambda: dp_group,
                  "get_tensor_model_parallel_world_size": lambda: self.tp_size,
                  "get_current_vllm_config": lambda: self.vllm_config,
                  # 0.13's weight_loader names it after `allow_flashinfer and ...` (False here)
                  "is_flashinfer_supporting_global_sf": _unavailable("is_flashinfer_supporting_global_sf")}
        in_layer = spec.moe_method_base == FUSED_MOE  # FusedMoEMethodBase: in layer.py (0.11) or its own file
        _define(vw, FUSED_MOE, ["FusedMoeWeightScaleSupported"] + ["FusedMoEMethodBase"] * in_layer, moe_ns)
        for member, names in spec.expert_map_functions:
            _define(vw, member, names, moe_ns)
        if not in_layer:
            base_ns = {"__name__": "vllm.model_executor.layers.fused_moe.fused_moe_method_base", "torch": torch,
                       "abstractmethod": abc.abstractmethod, "QuantizeMethodBase": QuantizeMethodBase,
                       "logger": logger}
            moe_ns["FusedMoEMethodBase"] = _define(vw, spec.moe_method_base, ["FusedMoEMethodBase"],
                                                   base_ns)["FusedMoEMethodBase"]
        fused_init = spec.fused_moe_init
        if "expert_map_manager_class" in fused_init.__annotations__:  # vLLM 0.23: the real map_global_to_local
            manager = _real_class(vw, EXPERT_MAP_MANAGER, "ExpertMapManager", ["map_global_to_local"],
                                  _ExpertMapManagerState, {"__name__": "vllm.model_executor.layers.fused_moe."
                                                                       "expert_map_manager", "torch": torch})
            fused_init = type(fused_init.__name__, (fused_init,), {"expert_map_manager_class": manager})
        FusedMoE = _real_class(vw, FUSED_MOE, "FusedMoE", spec.fused_moe_members, fused_init, moe_ns)
        moe_exports = dict(FusedMoE=FusedMoE, FusedMoEMethodBase=moe_ns["FusedMoEMethodBase"],
                           FusedMoeWeightScaleSupported=moe_ns["FusedMoeWeightScaleSupported"],
                           determine_expert_map=moe_ns["determine_expert_map"],
                           FusedMoEConfig=SimpleNamespace)
        self._add("vllm.model_executor.layers.fused_moe",
                  _module("vllm.model_executor.layers.fused_moe", moe_exports, package=True))
        self._add("vllm.model_executor.layers.fused_moe.layer",
                  _module("vllm.model_executor.layers.fused_moe.layer", moe_exports))
        self._add("vllm.model_executor.layers.fused_moe.config",
                  _module("vllm.model_executor.layers.fused_moe.config", dict(FusedMoEConfig=SimpleNamespace)))

        # vllm.model_executor.layers.linear: real LinearMethodBase, shard helpers and v1 weight loaders.
        class BasevLLMParameter(torch.nn.Parameter):  # vllm.model_executor.parameter, stand-in
            def __new__(cls, data: torch.Tensor, **kwargs):
                return super().__new__(cls, data=data, requires_grad=False)

            def __init__(self, data: torch.Tensor, weight_loader=None, **kwargs):
                self._weight_loader = weight_loader

            @property
            def weight_loader(self):
                return self._weight_loader

            @weight_loader.setter
            def weight_loader(self, value):
                self._weight_loader = value

        parameter_classes = {name: type(name, (BasevLLMParameter,), {}) for name in (
            "PerTensorScaleParameter", "ModelWeightParameter", "PackedvLLMParameter", "PackedColumnParameter",
            "RowvLLMParameter", "BlockQuantScaleParameter", "ChannelQuantScaleParameter", "GroupQuantScaleParameter")}
        self._add("vllm.model_executor.parameter", _module("vllm.model_executor.parameter",
                                                           dict(BasevLLMParameter=BasevLLMParameter,
                                                                **parameter_classes)))
        linear_ns = {"__name__": "vllm.model_executor.layers.linear", "torch": torch, "nn": torch.nn,
                     "Parameter": torch.nn.Parameter,
                     "UninitializedParameter": torch.nn.parameter.UninitializedParameter,
                     "itertools": itertools, "abstractmethod": abc.abstractmethod, "Any": typing.Any,
                     "Literal": typing.Literal, "Optional": typing.Optional, "Union": typing.Union,
                     "logger": logger, "QuantizeMethodBase": QuantizeMethodBase,
                     "QuantizationConfig": base_config.QuantizationConfig,
                     "set_weight_attrs": mutils.set_weight_attrs, "current_platform": platform,
                     "divide": _divide, "BasevLLMParameter": BasevLLMParameter, **parameter_classes}
        _define(vw, LINEAR, spec.linear_helpers, linear_ns)
        LinearBase = type("LinearBase", (_LinearInit,), {"__module__": linear_ns["__name__"]})
        Replicated = _real_class(vw, LINEAR, "ReplicatedLinear", ["weight_loader"], LinearBase, linear_ns)
        Column = _real_class(vw, LINEAR, "ColumnParallelLinear", ["weight_loader"], LinearBase, linear_ns)
        Merged = _real_class(vw, LINEAR, "MergedColumnParallelLinear", spec.merged_members, Column, linear_ns)
        Row = _real_class(vw, LINEAR, "RowParallelLinear", ["weight_loader"], LinearBase, linear_ns)
        self._linear_classes = {"replicated": Replicated, "column": Column, "merged": Merged, "row": Row}
        self._add("vllm.model_executor.layers.linear", _module("vllm.model_executor.layers.linear", dict(
            LinearBase=LinearBase, LinearMethodBase=linear_ns["LinearMethodBase"], ReplicatedLinear=Replicated,
            ColumnParallelLinear=Column, MergedColumnParallelLinear=Merged, RowParallelLinear=Row,
            UnquantizedLinearMethod=_dummy_class("UnquantizedLinearMethod", linear_ns["__name__"],
                                                 linear_ns["LinearMethodBase"]),
            WEIGHT_LOADER_V2_SUPPORTED=linear_ns["WEIGHT_LOADER_V2_SUPPORTED"])))

        # Other vllm layer modules the quant config imports (classes it only tests isinstance against).
        self._add("vllm.model_executor.layers.quantization.kv_cache", _module(
            "vllm.model_executor.layers.quantization.kv_cache",
            dict(BaseKVCacheMethod=_dummy_class("BaseKVCacheMethod", "vllm.model_executor.layers.quantization."
                                                "kv_cache", QuantizeMethodBase))))
        self._add("vllm.model_executor.layers.vocab_parallel_embedding", _module(
            "vllm.model_executor.layers.vocab_parallel_embedding", dict(
                VocabParallelEmbedding=type("VocabParallelEmbedding", (torch.nn.Module,), {}),
                UnquantizedEmbeddingMethod=_dummy_class("UnquantizedEmbeddingMethod", "vllm", QuantizeMethodBase))))
        # (0.13's quant config maps prefixes of vision-language models with it)
        self._add("vllm.model_executor.models.utils", _module("vllm.model_executor.models.utils", dict(
            WeightsMapper=_dummy_class("WeightsMapper", "vllm.model_executor.models.utils"))))

        # vllm.model_executor.model_loader.weight_utils: real default_weight_loader, maybe_remap_kv_scale_name
        weight_ns = _define(vw, WEIGHT_UTILS, ["default_weight_loader", "maybe_remap_kv_scale_name"], {
            "__name__": "vllm.model_executor.model_loader.weight_utils", "torch": torch, "logger": logger,
            "Optional": typing.Optional, "Any": typing.Any})
        self._add("vllm.model_executor.model_loader.weight_utils", _module(
            "vllm.model_executor.model_loader.weight_utils",
            {k: weight_ns[k] for k in ("default_weight_loader", "maybe_remap_kv_scale_name")}))
        if importlib.util.find_spec("regex") is None:  # maybe_remap_kv_scale_name imports it for k/v scales
            self._add("regex", re)

        if spec.layout == "registry":
            self._install_ascend_registry(FusedMoE=FusedMoE, moe_ns=moe_ns, linear_ns=linear_ns, weight_ns=weight_ns,
                                          ascend_utils=ascend_utils)
            return
        # vllm_ascend: the package, _version and the quantization package are real; the rest stand-in.
        self._exec("vllm_ascend", aw, "vllm_ascend/__init__.py", package=True)
        self._exec("vllm_ascend._version", aw, "vllm_ascend/_version.py")
        self._add("vllm_ascend.utils", _module("vllm_ascend.utils", dict(
            ascend_utils, mlp_tp_enable=lambda: False, oproj_tp_enable=lambda: False, enable_sp=lambda *a: False,
            is_310p=lambda: False, flashcomm2_enable=lambda: False, maybe_trans_nz=_ascend.maybe_trans_nz)))
        self._add("vllm_ascend.ascend_config", _module("vllm_ascend.ascend_config",
                                                       dict(get_ascend_config=lambda: self.ascend_config)))
        self._add("vllm_ascend.distributed", _module("vllm_ascend.distributed", package=True))
        self._add("vllm_ascend.distributed.parallel_state", _module("vllm_ascend.distributed.parallel_state", dict(
            get_mc2_group=lambda: mc2_group, get_mlp_tp_group=lambda: tp_group, get_otp_group=lambda: tp_group,
            get_flashcomm2_otp_group=lambda: tp_group)))
        self._add("vllm_ascend.ops", _module("vllm_ascend.ops", package=True))
        self._add_with_parents(spec.experts_selector, _module(spec.experts_selector, dict(
            select_experts=_unavailable("select_experts"))))
        self._add("vllm_ascend.ops.linear", _module("vllm_ascend.ops.linear", dict(
            AscendUnquantizedLinearMethod=_dummy_class("AscendUnquantizedLinearMethod", "vllm_ascend.ops.linear",
                                                       linear_ns["LinearMethodBase"]))))
        quant_pkg = self._exec("vllm_ascend.quantization", aw, "vllm_ascend/quantization/__init__.py", package=True)
        for scheme, classes in spec.other_schemes:
            name = f"vllm_ascend.quantization.{scheme}"
            self._add(name, _module(name, {c: _dummy_class(c, name) for c in classes}))
        w4a8 = self._exec("vllm_ascend.quantization.w4a8_dynamic", aw, "vllm_ascend/quantization/w4a8_dynamic.py")

        # AscendFusedMoE, as the release builds it (see RELEASES), in its module
        moe_module, _ = spec.ascend_moe
        AscendFusedMoE = getattr(self, spec.ascend_moe_builder)(FusedMoE, moe_ns, w4a8)
        self._moe_class = AscendFusedMoE
        self._add_with_parents(moe_module, _module(moe_module, dict(
            AscendFusedMoE=AscendFusedMoE,
            AscendUnquantizedFusedMoEMethod=_dummy_class("AscendUnquantizedFusedMoEMethod", moe_module,
                                                         moe_ns["FusedMoEMethodBase"]))))

        # The real quantization dispatch and config.
        utils = self._exec("vllm_ascend.quantization.utils", aw, "vllm_ascend/quantization/utils.py")
        quant_config = self._exec("vllm_ascend.quantization.quant_config", aw,
                                  "vllm_ascend/quantization/quant_config.py")
        assert utils.ASCEND_QUANTIZATION_METHOD_MAP["W4A8_DYNAMIC"]["moe"] is w4a8.AscendW4A8DynamicFusedMoEMethod
        assert quant_pkg.utils is utils and quant_pkg.w4a8_dynamic is w4a8
        self.quant_config = quant_config.AscendQuantConfig(self.description)
        self.vllm_config.quant_config = self.quant_config
        self._install_model(FusedMoE, moe_ns, weight_ns)

    def _install_model(self, FusedMoE: type, moe_ns: dict, weight_ns: dict) -> None:
        """vLLM's configure_quant_config (the model class's packed_modules_mapping, passed by reference) and
        the model's real load_weights (vLLM's, or the one vllm-ascend patches over it)."""
        vw, aw, spec, logger = self.vllm_wheel, self.ascend_wheel, self._spec, self._logger
        models_file, loader_class, causal_lm_class, inner = self._model_types()[self.model_type]
        code = aw if models_file.startswith("vllm_ascend/") else vw  # vllm-ascend's own models (DeepSeek-V4)
        self.quant_config.packed_modules_mapping = _literal(code, models_file, "packed_modules_mapping",
                                                            causal_lm_class)
        model_ns = {"__name__": f"vllm.model_executor.models.{Path(models_file).stem}", "typing": typing,
                    "torch": torch, "nn": torch.nn, "Callable": collections.abc.Callable,
                    "Iterable": collections.abc.Iterable, "Optional": typing.Optional, "Union": typing.Union,
                    "Any": typing.Any, "FusedMoE": FusedMoE, "logger": logger,
                    "is_pp_missing_parameter": lambda name, model: False,  # no pipeline parallelism
                    "default_weight_loader": weight_ns["default_weight_loader"],
                    "maybe_remap_kv_scale_name": weight_ns["maybe_remap_kv_scale_name"],
                    # the names vllm-ascend's patched DeepSeek loop adds
                    "SharedFusedMoE": type("SharedFusedMoE", (FusedMoE,), {"__module__": moe_ns["__name__"]}),
                    "get_ascend_config": lambda: self.ascend_config,
                    # (vLLM 0.18+) ROCm's fused shared experts: off on Ascend
                    "rocm_aiter_ops": SimpleNamespace(is_fusion_moe_shared_experts_enabled=lambda: False),
                    # (DeepSeek-V4) its loops' version switch, TP split of the attention sinks, DSA context
                    # parallelism (off)
                    "vllm_version_is": lambda version: version == spec.vllm_version,
                    "get_tensor_model_parallel_rank": lambda: self.tp_rank,
                    "get_tensor_model_parallel_world_size": lambda: self.tp_size, "enable_dsa_cp": lambda: False}
        # vLLM 0.23: the mapping helper, the fp8 indexer-weight hook of the DeepSeek loop (a no-op for other
        # weights), no pipeline-parallel layers missing
        model_ns["get_pp_missing_layer_names"] = lambda model: []
        for wheel, member, name in ((vw, FUSED_MOE, "fused_moe_make_expert_params_mapping"),
                                    (code, models_file, "_try_load_fp8_indexer_wk")):
            if any(_defined_name(node) == name for node in _tree(wheel, member).body):
                _define(wheel, member, [name], model_ns)
        if models_file in (DEEPSEEK, ASCEND_DEEPSEEK_V4):
            _define(code, models_file, ["get_spec_layer_idx_from_weight_name"], model_ns)
            methods = ["load_weights"]
        else:
            methods = ["get_expert_mapping", "load_weights"]
        where, member, class_name = dict(spec.loaders).get(self.model_type, ("vllm", models_file, loader_class))
        self._model_class = _real_class(vw if where == "vllm" else aw, member, class_name, methods, _ModelRoot,
                                        model_ns, new_name=loader_class)
        if self.model_type == "deepseek_v4":  # its MTP layer has a loop of its own (same helper names)
            self._mtp_class = _real_class(aw, ASCEND_DEEPSEEK_V4_MTP, "DeepSeekV4MTP",
                                          ["load_weights", "no_mtp_block_in_name"], _ModelRoot, model_ns)
        self._inner_loader = inner

    def _install_ascend_registry(self, *, FusedMoE: type, moe_ns: dict, linear_ns: dict, weight_ns: dict,
                                 ascend_utils: dict) -> None:
        """vllm-ascend 0.14+: the real `quantization` package, `quant_type`, `methods` (`registry`, `base`,
        `w4a8`; the other schemes' modules stand-in classes), `modelslim_config` and `method_adapters`."""
        aw, spec, groups = self.ascend_wheel, self._spec, self._groups
        self._add("vllm.model_executor.layers.attention_layer_base", _module(
            "vllm.model_executor.layers.attention_layer_base",
            dict(AttentionLayerBase=type("AttentionLayerBase", (), {}))))
        sys.modules["vllm.config"].get_current_vllm_config_or_none = lambda: self.vllm_config
        # vLLM's real WeightsMapper (0.23 maps DeepSeek-V4's native layer names with it)
        sys.modules["vllm.model_executor.models.utils"].WeightsMapper = _real_dataclass(
            self.vllm_wheel, MODELS_UTILS, "WeightsMapper", {
                "__name__": "vllm.model_executor.models.utils", "dataclass": dataclasses.dataclass,
                "field": dataclasses.field, "Mapping": collections.abc.Mapping, "Iterable": collections.abc.Iterable,
                "Any": typing.Any, "re": re, "torch": torch})
        self._add("vllm_ascend.logger", _module("vllm_ascend.logger"))  # (0.23) imported for its log setup
        self._exec("vllm_ascend", aw, "vllm_ascend/__init__.py", package=True)
        self._exec("vllm_ascend._version", aw, "vllm_ascend/_version.py")
        self._add("vllm_ascend.utils", _permissive_module("vllm_ascend.utils", dict(
            ascend_utils, mlp_tp_enable=lambda: False, oproj_tp_enable=lambda: False, enable_sp=lambda *a: False,
            is_310p=lambda: False, flashcomm2_enable=lambda: False, enable_dsa_cp_with_layer_shard=lambda: False,
            maybe_trans_nz=_ascend.maybe_trans_nz, vllm_version_is=lambda version: version == spec.vllm_version)))
        self._add("vllm_ascend.ascend_config", _module("vllm_ascend.ascend_config",
                                                       dict(get_ascend_config=lambda: self.ascend_config)))
        self._add("vllm_ascend.ascend_forward_context", _permissive_module("vllm_ascend.ascend_forward_context"))
        self._add("vllm_ascend.distributed", _module("vllm_ascend.distributed", package=True))
        self._add("vllm_ascend.distributed.parallel_state", _module("vllm_ascend.distributed.parallel_state", dict(
            get_mc2_group=lambda: groups.mc2, get_mlp_tp_group=lambda: groups.tp, get_otp_group=lambda: groups.tp,
            get_flashcomm2_otp_group=lambda: groups.tp)))
        self._add("vllm_ascend.ops", _module("vllm_ascend.ops", package=True))
        self._add("vllm_ascend.ops.fused_moe", _module("vllm_ascend.ops.fused_moe", package=True))
        for name in ("vllm_ascend.ops.fused_moe.experts_selector", "vllm_ascend.ops.fused_moe.moe_runtime_args"):
            self._add(name, _permissive_module(name))  # only `apply` uses them
        self._add("vllm_ascend.ops.linear", _module("vllm_ascend.ops.linear", dict(
            AscendUnquantizedLinearMethod=_dummy_class("AscendUnquantizedLinearMethod", "vllm_ascend.ops.linear",
                                                       linear_ns["LinearMethodBase"]))))
        self._exec("vllm_ascend.quantization", aw, "vllm_ascend/quantization/__init__.py", package=True)
        self._exec("vllm_ascend.quantization.quant_type", aw, "vllm_ascend/quantization/quant_type.py")
        methods = "vllm_ascend.quantization.methods"
        package = self._add(methods, _module(methods, package=True, file=_filename(aw, METHODS_INIT)))
        for real in ("registry", "base", "w4a8"):
            self._exec(f"{methods}.{real}", aw, f"vllm_ascend/quantization/methods/{real}.py")
        for module, names in _relative_imports(aw, METHODS_INIT):
            if module not in ("registry", "base", "w4a8"):
                name = f"{methods}.{module}"
                self._add(name, _module(name, {c: _dummy_class(c, name) for c in names}))
        exec(compile(_member_text(aw, METHODS_INIT), _filename(aw, METHODS_INIT), "exec"), package.__dict__)
        modelslim = self._exec("vllm_ascend.quantization.modelslim_config", aw, MODELSLIM_CONFIG)
        self._exec("vllm_ascend.quantization.method_adapters", aw, METHOD_ADAPTERS)
        w4a8 = sys.modules[f"{methods}.w4a8"]
        assert package.get_scheme_class("W4A8_DYNAMIC", "moe") is w4a8.AscendW4A8DynamicFusedMoEMethod

        moe_module, _ = spec.ascend_moe
        self._moe_class = getattr(self, spec.ascend_moe_builder)(FusedMoE, moe_ns, w4a8)
        self._add_with_parents(moe_module, _module(moe_module, dict(
            AscendFusedMoE=self._moe_class,
            AscendUnquantizedFusedMoEMethod=_dummy_class("AscendUnquantizedFusedMoEMethod", moe_module,
                                                         moe_ns["FusedMoEMethodBase"]))))
        self.quant_config = modelslim.AscendModelSlimConfig(self.description)
        self.vllm_config.quant_config = self.quant_config
        self._install_model(FusedMoE, moe_ns, weight_ns)

    def _ascend_moe_registry(self, FusedMoE: type, moe_ns: dict, w4a8: types.ModuleType) -> type:
        """0.18, 0.23: the real AscendFusedMoE.__init__ (expert map from vllm-ascend's real init_eplb_config)
        over a stand-in for vLLM's FusedMoE.__init__; vLLM's loaders as they are."""
        aw, logger, groups = self.ascend_wheel, self._logger, self._groups
        eplb = _define(aw, ASCEND_EPLB_UTILS, ["expert_file_to_tensor", "generate_global_placement",
                                               "init_eplb_config", "generate_log2phy_map"], {
            "__name__": "vllm_ascend.eplb.core.eplb_utils", "torch": torch, "np": numpy, "json": json, "os": os,
            "sys": sys, "defaultdict": collections.defaultdict, "logger": logger,
            "determine_expert_map": moe_ns["determine_expert_map"]})
        module, member = self._spec.ascend_moe
        fused_ns = {"__name__": module, "torch": torch, "Optional": typing.Optional, "Callable": typing.Callable,
                    "logger": logger, "get_current_vllm_config": lambda: self.vllm_config,
                    "get_ascend_config": lambda: self.ascend_config, "get_tp_group": lambda: groups.tp,
                    "get_dp_group": lambda: groups.dp, "get_ep_group": lambda: groups.ep,
                    "get_mc2_group": lambda: groups.mc2,
                    "AscendUnquantizedFusedMoEMethod": _dummy_class("AscendUnquantizedFusedMoEMethod", module),
                    "init_eplb_config": eplb["init_eplb_config"],
                    "get_compressed_expert_map": moe_ns.get("get_compressed_expert_map"),
                    "setup_moe_comm_method": lambda moe_config: None,  # communication, not weights
                    "QuantType": sys.modules["vllm_ascend.quantization.quant_type"].QuantType,
                    # (0.23) the runner executes the experts; sequence parallelism is off
                    "AscendMoERunner": lambda *args, **kwargs: None, "enable_sp": lambda *args: False,
                    "wraps": functools.wraps,
                    "VllmEplbAdaptor": SimpleNamespace(register_layer=lambda layer: None)}  # EPLB's run-time list
        if fused_ns["get_compressed_expert_map"] is None:  # 0.23 defines its own
            _define(aw, ASCEND_FUSED_MOE_COMMON, ["get_compressed_expert_map"], fused_ns)
        return _real_class(aw, member, "AscendFusedMoE", self._spec.ascend_moe_members, FusedMoE, fused_ns)

    # ---- AscendFusedMoE, per release

    def _ascend_moe_0_11(self, FusedMoE: type, moe_ns: dict, w4a8: types.ModuleType) -> type:
        """0.11: a stand-in constructor (written from behaviour) + the real loader overrides."""
        harness = self

        class _AscendFusedMoEInit(FusedMoE):
            """The weight-relevant part of AscendFusedMoE.__init__ (written from behaviour)."""

            def __init__(self, **kwargs):
                super().__init__(**kwargs)
                ascend_config = harness.ascend_config
                self.expert_map = None
                self.log2phy = None
                self.quant_method = self.quant_config.get_quant_method(self, self.layer_name)
                if self.quant_method is None:
                    raise ValueError(f"{self.layer_name}: the quantization config gives no method for this layer")
                self.dynamic_eplb = bool(ascend_config.dynamic_eplb or ascend_config.expert_map_record_path)
                self.global_redundant_expert_num = ascend_config.init_redundancy_expert
                self.global_num_experts = kwargs["num_experts"] + self.global_redundant_expert_num
                self.local_num_experts, self.expert_map = moe_ns["determine_expert_map"](
                    self.ep_size, self.ep_rank, self.global_num_experts)
                # the factories get a count of the experts mapped to this rank (a 0-d tensor under EP)
                local_num_experts = (self.global_num_experts if self.expert_map is None
                                     else self.expert_map.ne(-1).sum())
                self.moe_config.num_experts = self.global_num_experts
                self.moe_config.num_local_experts = self.local_num_experts
                self.moe_config.original_num_experts = kwargs["num_experts"]
                self.quant_method.create_weights(layer=self, num_experts=local_num_experts,
                                                 hidden_size=self.hidden_size,
                                                 intermediate_size_per_partition=self.intermediate_size_per_partition,
                                                 params_dtype=self.params_dtype, weight_loader=self.weight_loader)

        module, member = self._spec.ascend_moe
        fused_ns = {"__name__": module, "torch": torch, "Optional": typing.Optional}
        return _real_class(self.ascend_wheel, member, "AscendFusedMoE", self._spec.ascend_moe_members,
                           _AscendFusedMoEInit, fused_ns)

    def _ascend_moe_0_13(self, FusedMoE: type, moe_ns: dict, w4a8: types.ModuleType) -> type:
        """0.13: the real AscendFusedMoE.__init__ (expert map from vllm-ascend's real init_eplb_config) over
        a stand-in for vLLM's FusedMoE.__init__; no loader overrides (vLLM's loaders are used)."""
        aw, logger, groups = self.ascend_wheel, self._logger, self._groups
        eplb = _define(aw, ASCEND_EPLB_UTILS, ["expert_file_to_tensor", "generate_global_placement",
                                               "init_eplb_config", "generate_log2phy_map"], {
            "__name__": "vllm_ascend.eplb.core.eplb_utils", "torch": torch, "np": numpy, "json": json, "os": os,
            "sys": sys, "defaultdict": collections.defaultdict, "logger": logger})
        quant_type = _define(aw, ASCEND_PREPARE_FINALIZE, ["QuantType"], {
            "__name__": "vllm_ascend.ops.fused_moe.prepare_finalize", "Enum": enum.Enum})["QuantType"]
        module, member = self._spec.ascend_moe
        fused_ns = {"__name__": module, "torch": torch, "Optional": typing.Optional, "Callable": typing.Callable,
                    "logger": logger, "get_current_vllm_config": lambda: self.vllm_config,
                    "get_ascend_config": lambda: self.ascend_config, "get_tp_group": lambda: groups.tp,
                    "get_dp_group": lambda: groups.dp, "get_ep_group": lambda: groups.ep,
                    "get_mc2_group": lambda: groups.mc2,
                    "AscendUnquantizedFusedMoEMethod": _dummy_class("AscendUnquantizedFusedMoEMethod", module),
                    "init_eplb_config": eplb["init_eplb_config"],
                    "get_compressed_expert_map": moe_ns["get_compressed_expert_map"],
                    "setup_moe_comm_method": lambda moe_config: None,  # communication, not weights
                    "QuantType": quant_type,
                    "AscendW4A8DynamicFusedMoEMethod": w4a8.AscendW4A8DynamicFusedMoEMethod,
                    "AscendW8A8DynamicFusedMoEMethod":
                        sys.modules["vllm_ascend.quantization.w8a8_dynamic"].AscendW8A8DynamicFusedMoEMethod}
        return _real_class(aw, member, "AscendFusedMoE", self._spec.ascend_moe_members, FusedMoE, fused_ns)

    # ---- layers and model

    def moe_layer(self, prefix: str, num_experts: int, hidden: int, intermediate: int) -> torch.nn.Module:
        """vllm-ascend's AscendFusedMoE for this rank: the real quant method's parameters, real loaders."""
        self._require_active()
        if intermediate % self.tp_size:
            raise ValueError(f"{prefix}: intermediate {intermediate} does not split over tp {self.tp_size}")
        if self.enable_ep:
            parallel = SimpleNamespace(tp_size=1, tp_rank=0, dp_size=self.ep_size, dp_rank=self.ep_rank,
                                       ep_size=self.ep_size, ep_rank=self.ep_rank, use_ep=True)
        else:
            parallel = SimpleNamespace(tp_size=self.tp_size, tp_rank=self.tp_rank, dp_size=1, dp_rank=0, ep_size=1,
                                       ep_rank=0, use_ep=False)
        with _ascend._tensor_npu_identity(), warnings.catch_warnings():  # 0.13's expert map goes to the device
            warnings.filterwarnings("ignore", "Creating a tensor from a list of numpy.ndarrays", UserWarning)
            layer = self._moe_class(num_experts=num_experts, hidden_size=hidden, intermediate_size=intermediate,
                                    params_dtype=self.params_dtype, quant_config=self.quant_config, prefix=prefix,
                                    moe_parallel_config=parallel, vllm_config=self.vllm_config)
        self._num_experts[id(layer)] = num_experts
        return layer

    def linear_layer(self, prefix: str, kind: str, input_size: int, output_sizes: list[int]) -> torch.nn.Module:
        """A Linear layer of `kind` replicated/column/merged/row with vLLM's real v1 weight_loader."""
        self._require_active()
        if kind not in self._linear_classes:
            raise ValueError(f"kind {kind!r}: one of {sorted(self._linear_classes)}")
        output_sizes = list(output_sizes)
        if kind != "merged" and len(output_sizes) != 1:
            raise ValueError(f"{kind} layer {prefix}: one output size expected, got {output_sizes}")
        tp = self.tp_size
        if kind == "replicated":
            in_part, out_parts = input_size, output_sizes
        elif kind == "row":
            in_part, out_parts = _divide(input_size, tp), output_sizes
        else:
            in_part, out_parts = input_size, [_divide(size, tp) for size in output_sizes]
        return self._linear_classes[kind](prefix=prefix, input_size=input_size, output_sizes=output_sizes,
                                          input_size_per_partition=in_part, output_partition_sizes=out_parts,
                                          params_dtype=self.params_dtype, quant_config=self.quant_config,
                                          tp_size=tp, tp_rank=self.tp_rank)

    def model(self, modules: dict[str, torch.nn.Module], *, mtp: bool = False, **config) -> torch.nn.Module:
        """A module tree holding each module at its dotted prefix, with the attributes load_weights reads.

        `config` overrides the hf_config fields (by default: the experts of the MoE layers given,
        num_hidden_layers from the `layers.N` prefixes, num_nextn_predict_layers=0). `mtp`: DeepSeek-V4's
        MTP model, whose own load_weights takes the `mtp.0.` weights.
        """
        self._require_active()
        experts = {self._num_experts[id(m)] for m in modules.values() if isinstance(m, self._moe_class)}
        if len(experts) > 1 and not {"n_routed_experts", "num_experts", "num_local_experts"} & set(config):
            raise ValueError(f"MoE layers with different expert counts {sorted(experts)}: pass the config field")
        num_experts = experts.pop() if experts else 0
        layers = [int(m.group(1)) for p in modules for m in [re.search(r"(?:^|\.)layers\.(\d+)(?:\.|$)", p)] if m]
        fields = dict(model_type=self.model_type, n_routed_experts=num_experts, num_experts=num_experts,
                      num_local_experts=num_experts, num_hidden_layers=max(layers, default=-1) + 1,
                      num_nextn_predict_layers=0, num_attention_heads=self.tp_size)
        fields.update(config)
        hf_config = SimpleNamespace(**fields)
        if mtp:
            root = self._mtp_class(hf_config, self.quant_config)
        elif self._inner_loader:
            root = _AutoLoadedRoot()
            root.config = hf_config
            root.model = self._model_class(hf_config, self.quant_config)
        else:
            root = self._model_class(hf_config, self.quant_config)
        for prefix, module in modules.items():
            *path, last = prefix.split(".")
            node = root
            for part in path:
                child = node._modules.get(part)
                if child is None:
                    child = torch.nn.Module()
                    node.add_module(part, child)
                node = child
            if last in node._modules:
                raise ValueError(f"{prefix}: a module is already there")
            node.add_module(last, module)
        return root

    # ---- loading

    def load_weights(self, model: torch.nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The model type's real load_weights loop over (name, tensor) pairs; the names it loaded."""
        self._require_active()
        return model.load_weights(weights)

    def process_weights_after_loading(self, model: torch.nn.Module) -> None:
        """As vLLM's loader does: every submodule's quant method post-processes it (Tensor.npu() = identity)."""
        self._require_active()
        with _ascend._tensor_npu_identity():
            for _, module in model.named_modules():
                method = getattr(module, "quant_method", None)
                if isinstance(method, self._QuantizeMethodBase):
                    method.process_weights_after_loading(module)


def weights_from_dir(root: Path | str) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of every *.safetensors file of a checkpoint directory: files by name, tensors in the
    order `safe_open(...).keys()` gives them (by name; vLLM's safetensors_weights_iterator reads a file
    the same way, so this is the order a server sees, not the header's offset order)."""
    for path in sorted(Path(root).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                yield name, handle.get_tensor(name)
