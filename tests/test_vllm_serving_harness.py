"""The serving harness is faithful: vLLM 0.11.0's real load_weights loop and parameter loaders, with
vllm-ascend 0.11.0's real quantization config and W4A8_DYNAMIC module, leave every rank holding what
`vllm_ascend_harness` derives independently (its own slicing, then vllm-ascend's post-processing).
The same for the release pair vLLM 0.13.0 + vllm-ascend 0.13.0 (`release="0.13"`), against the
0.13.0 module, where the real 0.13 code loads at all; where it does not, the tests pin how it fails:

* with per-group scales (group_size > 0) vllm-ascend 0.13's AscendFusedMoEMethod.create_weights
  marks every parameter whose name holds "weight_scale" / "weight_offset" as GROUP (0.11: only the
  `*_second` ones), so vLLM's loader cuts down_proj's per-channel weight_scale / weight_offset
  ([hidden, 1]) on its input axis like a group scale: rank 0 gets the whole column, tp_rank >= 1
  raises in `narrow`;
* with per-channel scales (group_size 0) it marks nothing as GROUP (an operator-precedence slip makes
  the list empty), so a version-1.0.0 down_proj scale_bias ([hidden, 16]) is copied whole into its
  [hidden, 16/tp] parameter: raises for tp > 1;
* vllm-ascend 0.13 dropped the quant-type lookup by an MoE prefix ("...experts": all its experts'
  types) for model types outside its own packed-modules table, so a Mixtral MoE layer finds no
  "<prefix>.weight" in the description (KeyError).

The wheels are read at test time (downloaded into caches outside the repository); without them
these tests skip, and fail when $CI is set (`release_or_skip`).
"""
from __future__ import annotations

import importlib
import importlib.metadata
import io
import re
import sys
import tarfile
import zipfile

from collections.abc import Callable
from typing import TypeVar

import pytest
import torch

from conftest import running_in_ci
from w4a8conv.synthetic import PRESETS

try:
    import vllm_ascend_harness as harness
    import vllm_serving_harness as serving
    from cases import LINEAR_CASES, MOE_CASES, splits
except ImportError:  # tests/ imported as a package
    from tests import vllm_ascend_harness as harness
    from tests import vllm_serving_harness as serving
    from tests.cases import LINEAR_CASES, MOE_CASES, splits

T = TypeVar("T")
SOURCE_TYPE = "W4A8_DYNAMIC"
R013 = "0.13"
ASCEND_013 = serving.RELEASES[R013].ascend_version
BIAS_RTOL = 1e-5  # of max |bias|: fp32 sums in another order differ in the last bits


def _installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _leftovers() -> list[str]:
    return sorted(n for n in sys.modules if n.partition(".")[0] in serving.STANDIN_ROOTS)


def release_or_skip(what: str, fetch: Callable[[], T]) -> T:
    """`fetch()`'s release sources; where they cannot be had the test skips, and fails when $CI is set
    (a serving test that cannot get its release must not pass unnoticed there)."""
    try:
        return fetch()
    except serving.HarnessUnavailable as exc:
        reason = f"{what} unavailable: {exc}"
        if running_in_ci():
            pytest.fail(f"{reason} ($CI is set: the serving tests must run)")
        pytest.skip(reason)


@pytest.fixture(scope="session")
def wheels():
    return release_or_skip(f"vllm / vllm-ascend {serving.VLLM_VERSION} wheel",
                           lambda: (serving.vllm_sources(), harness.find_wheel()))


@pytest.fixture(scope="session")
def wheels_013():
    return release_or_skip(f"vllm / vllm-ascend {ASCEND_013} wheel",
                           lambda: (serving.vllm_sources(R013), harness.find_wheel(ASCEND_013)))


@pytest.fixture(autouse=True)
def no_leftover_modules():
    """Every test leaves sys.modules without vllm / vllm_ascend / torch_npu names."""
    before = _leftovers()
    yield
    assert _leftovers() == before, f"left in sys.modules: {sorted(set(_leftovers()) - set(before))}"


# --------------------------------------------------------------------------------------------
# Cases


# 0.13: TP 1 and 2 and EP 2, through the DeepSeek loop (Mixtral: see test_013_mixtral_moe_finds_no_quant_type)
MOE_CASES_013 = [pytest.param(name, tp, ep, id=f"{name}-tp{tp}-ep{ep}")
                 for name, spec in PRESETS.items() if spec.moe_layers and spec.model_type != "mixtral"
                 for tp, ep in splits(spec) if tp <= 2]


def _rank_splits(tp: int, ep: int) -> list[dict]:
    return [{"tp_size": tp, "tp_rank": r if tp > 1 else 0, "ep_size": ep, "ep_rank": r if ep > 1 else 0}
            for r in range(max(tp, ep))]


def _moe_blocks(source: harness.SourceCheckpoint) -> dict[str, tuple[int, int, int]]:
    """FusedMoE prefix (`...mlp.experts`) -> (experts, hidden, intermediate) of the W4A8_DYNAMIC MoE blocks."""
    blocks = {}
    for name, kind in source.description.items():
        match = re.match(r"(.*\.experts)\.\d+\.[^.]+\.weight$", name)
        if kind == SOURCE_TYPE and match and match.group(1) not in blocks:
            experts_prefix = match.group(1)
            block = experts_prefix[: -len(".experts")]
            num_experts, (gate, _, down) = source.experts(block)
            intermediate = source.tensor(f"{experts_prefix}.0.{gate}.weight_scale").shape[0]
            hidden = source.tensor(f"{experts_prefix}.0.{down}.weight_scale").shape[0]
            blocks[experts_prefix] = (num_experts, hidden, intermediate)
    return blocks


def _dense_mlps(source: harness.SourceCheckpoint) -> list[str]:
    """Prefixes of the W4A8_DYNAMIC gate/up/down MLPs that are not routed experts (dense, shared experts)."""
    return sorted({name[: -len(".gate_proj.weight")] for name, kind in source.description.items()
                   if kind == SOURCE_TYPE and name.endswith(".gate_proj.weight") and ".experts." not in name})


def _under(weights, prefixes: list[str]):
    """The stream restricted to the modules built. Our model holds only those layers, and vLLM's real
    loop indexes params_dict[name] for every tensor it cannot skip, so embeddings, norms, attention,
    the router and other layers would raise KeyError. The order within the stream is kept."""
    heads = tuple(p + "." for p in prefixes)
    return ((name, tensor) for name, tensor in weights if name.startswith(heads))


def _scramble(module: torch.nn.Module, seed: int = 0) -> None:
    """Fill the fresh parameters so that a region left unloaded cannot match the reference by chance."""
    gen = torch.Generator().manual_seed(seed)
    for param in module.parameters():
        if param.is_floating_point():
            param.data.fill_(float("nan"))
        else:
            info = torch.iinfo(param.dtype)
            param.data.copy_(torch.randint(info.min, info.max, param.shape, generator=gen, dtype=torch.int64))


# --------------------------------------------------------------------------------------------
# Comparison


def assert_same(got: torch.Tensor, want: torch.Tensor, what: str, bias: bool = False) -> None:
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype}, reference {want.dtype}"
    assert tuple(got.shape) == tuple(want.shape), f"{what}: shape {tuple(got.shape)}, reference {tuple(want.shape)}"
    if bias and want.numel():
        assert bool(torch.isfinite(got).all()), f"{what}: non-finite values"
        tolerance = BIAS_RTOL * want.double().abs().max().item()
        error = (got.double() - want.double()).abs().max().item()
        assert error <= tolerance, f"{what}: max |diff| {error:.3g} > {tolerance:.3g}"
    elif got.is_floating_point():  # bit-identical, NaN-safe
        assert torch.equal(got.contiguous().view(torch.int32), want.contiguous().view(torch.int32)), \
            f"{what}: {int((got != want).sum())} of {got.numel()} values differ"
    else:
        assert torch.equal(got, want), f"{what}: {int((got != want).sum())} of {got.numel()} elements differ"


# --------------------------------------------------------------------------------------------
# MoE through vLLM's real loop


def _other_ranks_experts(names, blocks, split) -> set[str]:
    """The checkpoint names of the experts held by other EP ranks (experts are split contiguously)."""
    if split["ep_size"] == 1:
        return set()
    found = set()
    for name in names:
        for prefix, (experts, _, _) in blocks.items():
            match = re.match(re.escape(prefix) + r"\.(\d+)\.", name)
            if match and int(match.group(1)) // (experts // split["ep_size"]) != split["ep_rank"]:
                found.add(name)
    return found


# vllm-ascend 0.13's DeepSeek loop (patch_deepseekv3) also reports, unmapped, the checkpoint names of
# the experts of other EP ranks: its `continue` for an expert not on this rank leaves only its inner
# chunk loop, and the name is added to the loaded set after it (vLLM's loops skip them).
REPORTS_OTHER_RANKS_EXPERTS = {(R013, "deepseek_v2"), (R013, "deepseek_v3")}


def _load_moe(src, source, blocks, split, model_type=None, release=serving.DEFAULT_RELEASE):
    """One rank: build the FusedMoE layers, stream the checkpoint through the real loop, post-process."""
    model_type = model_type or source.config["model_type"]
    with serving.ServingEnv(source.description, model_type=model_type, params_dtype=source.model_dtype,
                            release=release, **split) as env:
        layers = {prefix: env.moe_layer(prefix, *shape) for prefix, shape in blocks.items()}
        method_cls = sys.modules["vllm_ascend.quantization.w4a8_dynamic"].AscendW4A8DynamicFusedMoEMethod
        fused_moe_cls = sys.modules["vllm.model_executor.layers.fused_moe"].FusedMoE
        for prefix, layer in layers.items():
            assert isinstance(layer, fused_moe_cls), prefix
            assert type(layer.quant_method.quant_method) is method_cls, prefix
            assert layer.quant_method.quant_method.tp_size == (1 if split["ep_size"] > 1 else split["tp_size"])
            _scramble(layer)
        model = env.model(layers)
        stream = list(_under(serving.weights_from_dir(src), list(layers)))
        loaded = env.load_weights(model, iter(stream))
        params = {name for name, _ in model.named_parameters()}
        if (release, model_type) in REPORTS_OTHER_RANKS_EXPERTS:
            params |= _other_ranks_experts([name for name, _ in stream], blocks, split)
        assert loaded == params, f"loaded {sorted(loaded ^ params)} differently from the model's parameters"
        env.process_weights_after_loading(model)
    return layers


def _check_moe(src, layers, split, label, version=harness.VLLM_ASCEND_VERSION):
    for prefix, layer in layers.items():
        want = harness.moe_rank_tensors(src, prefix[: -len(".experts")], version=version, **split)
        where = f"{label} {prefix} tp {split['tp_rank']}/{split['tp_size']} ep {split['ep_rank']}/{split['ep_size']}"
        for key in harness.MOE_KEYS:
            assert_same(getattr(layer, key).data, want[key], f"{where} {key}", bias=key.endswith("scale_bias"))


@pytest.mark.parametrize("preset, tp, ep", MOE_CASES)
def test_moe_through_vllm_loop_equals_reference(wheels, preset_source, preset, tp, ep):
    src = preset_source(preset)
    source = harness.SourceCheckpoint(src)
    blocks = _moe_blocks(source)
    assert blocks, f"{preset}: no W4A8_DYNAMIC MoE block"
    for split in _rank_splits(tp, ep):
        _check_moe(src, _load_moe(src, source, blocks, split), split, preset)


def test_moe_through_qwen3_moe_loop_equals_reference(wheels, preset_source):
    """The same checkpoint through Qwen3MoeModel.load_weights (behind the AutoWeightsLoader hop)."""
    src = preset_source("moe-group-v1")
    source = harness.SourceCheckpoint(src)
    blocks = _moe_blocks(source)
    for split in _rank_splits(2, 1):
        _check_moe(src, _load_moe(src, source, blocks, split, model_type="qwen3_moe"), split, "qwen3_moe")


def _failure_013(source, split) -> str | None:
    """How vllm-ascend 0.13's real loaders fail for a rank (a regex of the error), None if they load
    (see the module docstring)."""
    if split["tp_size"] == 1:
        return None
    per_group = source.description.get("group_size", 256) > 0  # w4a8_dynamic's default
    if per_group and split["tp_rank"] >= 1:  # down_proj weight_scale [hidden, 1] cut on its axis 1
        return r"start \(\d+\) \+ length \(1\) exceeds dimension size \(1\)"
    if not per_group and source.description.get("version") == "1.0.0":  # scale_bias [hidden, 16] copied whole
        return r"size of tensor a \(\d+\) must match the size of tensor b \(16\)"
    return None


@pytest.mark.parametrize("preset, tp, ep", MOE_CASES_013)
def test_013_moe_through_deepseek_loop_equals_reference(wheels_013, preset_source, preset, tp, ep):
    src = preset_source(preset)
    source = harness.SourceCheckpoint(src)
    blocks = _moe_blocks(source)
    assert blocks, f"{preset}: no W4A8_DYNAMIC MoE block"
    for split in _rank_splits(tp, ep):
        failure = _failure_013(source, split)
        if failure:
            with pytest.raises(RuntimeError, match=failure):
                _load_moe(src, source, blocks, split, release=R013)
            continue
        _check_moe(src, _load_moe(src, source, blocks, split, release=R013), split, f"{preset} 0.13", ASCEND_013)


def test_013_moe_through_qwen3_moe_loop_equals_reference(wheels_013, preset_source):
    """vLLM 0.13's Qwen3MoeModel.load_weights (not patched by vllm-ascend), per-group scales, EP 2."""
    src = preset_source("moe-group-v1")
    source = harness.SourceCheckpoint(src)
    blocks = _moe_blocks(source)
    for split in _rank_splits(1, 2):
        layers = _load_moe(src, source, blocks, split, model_type="qwen3_moe", release=R013)
        _check_moe(src, layers, split, "qwen3_moe 0.13", ASCEND_013)


def test_013_mixtral_moe_finds_no_quant_type(wheels_013, preset_source):
    source = harness.SourceCheckpoint(preset_source("mixed-v1"))
    prefix, shape = next(iter(_moe_blocks(source).items()))
    with serving.ServingEnv(source.description, model_type="mixtral", release=R013) as env:
        with pytest.raises(KeyError, match=re.escape(f"{prefix}.weight")):
            env.moe_layer(prefix, *shape)
    with serving.ServingEnv(source.description, model_type="mixtral") as env:  # 0.11 finds it
        assert env.moe_layer(prefix, *shape).w13_weight.shape[0] == shape[0]


# --------------------------------------------------------------------------------------------
# Linear through vLLM's real merged/row loaders


def _check_linear(preset_source, preset, release=serving.DEFAULT_RELEASE, version=harness.VLLM_ASCEND_VERSION):
    src = preset_source(preset)
    source = harness.SourceCheckpoint(src)
    mlps = _dense_mlps(source)
    assert mlps, f"{preset}: no W4A8_DYNAMIC dense MLP"
    with serving.ServingEnv(source.description, model_type=source.config["model_type"],
                            params_dtype=source.model_dtype, release=release) as env:
        layers = {}
        for mlp in mlps:
            inter = source.tensor(f"{mlp}.gate_proj.weight_scale").shape[0]
            hidden = source.tensor(f"{mlp}.down_proj.weight_scale").shape[0]
            layers[f"{mlp}.gate_up_proj"] = env.linear_layer(f"{mlp}.gate_up_proj", "merged", hidden, [inter, inter])
            layers[f"{mlp}.down_proj"] = env.linear_layer(f"{mlp}.down_proj", "row", inter, [hidden])
        row_cls = sys.modules["vllm.model_executor.layers.linear"].RowParallelLinear
        assert isinstance(layers[f"{mlps[0]}.down_proj"], row_cls)
        for layer in layers.values():
            _scramble(layer)
        model = env.model(layers)
        sources = [f"{mlp}.{proj}" for mlp in mlps for proj in ("gate_proj", "up_proj", "down_proj")]
        loaded = env.load_weights(model, _under(serving.weights_from_dir(src), sources))
        params = {name for name, _ in model.named_parameters()}
        assert loaded == params, f"loaded {sorted(loaded ^ params)} differently from the model's parameters"
        env.process_weights_after_loading(model)
    for mlp in mlps:
        gate = harness.linear_tensors(src, f"{mlp}.gate_proj", version=version)
        up = harness.linear_tensors(src, f"{mlp}.up_proj", version=version)
        # gate and up are stacked on the output axis: the last one after post-processing (which transposes
        # the weight and weight_scale_second and flattens the per-channel tensors), except for
        # weight_offset_second, which post-processing leaves as loaded, [output, groups]
        expected = {f"{mlp}.gate_up_proj": {k: torch.cat([gate[k], up[k]], dim=0 if k == "weight_offset_second" else -1)
                                            for k in gate},
                    f"{mlp}.down_proj": harness.linear_tensors(src, f"{mlp}.down_proj", version=version)}
        for prefix, want in expected.items():
            got = dict(layers[prefix].named_parameters())
            assert set(got) == set(want), f"{preset} {prefix}: {sorted(got)} vs reference {sorted(want)}"
            for key in want:
                assert_same(got[key].data, want[key], f"{preset} {release} {prefix} {key}",
                            bias=key.endswith("bias"))


@pytest.mark.parametrize("preset", LINEAR_CASES)
def test_linear_through_vllm_loop_equals_reference(wheels, preset_source, preset):
    _check_linear(preset_source, preset)


@pytest.mark.parametrize("preset", LINEAR_CASES)
def test_013_linear_through_deepseek_loop_equals_reference(wheels_013, preset_source, preset):
    _check_linear(preset_source, preset, R013, ASCEND_013)


# --------------------------------------------------------------------------------------------
# The environment itself


# vllm-ascend reads the quant type of experts.0's three projections for a deepseek MoE block
EXPERT_0 = {f"model.layers.1.mlp.experts.0.{proj}.weight": SOURCE_TYPE
            for proj in ("gate_proj", "up_proj", "down_proj")}


def test_env_installs_real_modules_and_leaves_nothing_behind(wheels):
    description = {"model_quant_type": SOURCE_TYPE, "version": "1.0.0", "group_size": 32, **EXPERT_0}
    path_before = list(sys.path)
    installed_before = _installed_version("vllm-ascend")
    with serving.ServingEnv(description, tp_size=2, tp_rank=1) as env:
        utils = importlib.import_module("vllm_ascend.quantization.utils")
        w4a8 = importlib.import_module("vllm_ascend.quantization.w4a8_dynamic")
        quant_config = importlib.import_module("vllm_ascend.quantization.quant_config")
        assert utils.ASCEND_QUANTIZATION_METHOD_MAP["W4A8_DYNAMIC"]["moe"] is w4a8.AscendW4A8DynamicFusedMoEMethod
        assert utils.get_quant_method.__code__.co_filename.endswith("vllm_ascend/quantization/utils.py")
        assert isinstance(env.quant_config, quant_config.AscendQuantConfig)
        config = importlib.import_module("vllm.config").get_current_vllm_config()
        assert config.quant_config.quant_description is env.quant_config.quant_description
        assert config.parallel_config.enable_expert_parallel is False
        assert config.model_config.hf_config.model_type == "deepseek_v3"
        distributed = importlib.import_module("vllm.distributed")
        assert distributed.get_ep_group().world_size == 2 and distributed.get_tensor_model_parallel_rank() == 1
        assert importlib.import_module("vllm_ascend._version").version == "0.11.0"
        for dist in ("vllm-ascend", "vllm_ascend", "vllm"):
            assert importlib.metadata.version(dist) == "0.11.0", dist
        # The loaders are the wheels' code, not copies.
        fused_moe = importlib.import_module("vllm.model_executor.layers.fused_moe").FusedMoE
        ascend_moe = importlib.import_module("vllm_ascend.ops.common_fused_moe").AscendFusedMoE
        linear = importlib.import_module("vllm.model_executor.layers.linear")
        assert fused_moe.weight_loader.__code__.co_filename == \
            f"{env.vllm_wheel.name}/vllm/model_executor/layers/fused_moe/layer.py"
        assert ascend_moe._load_w13.__code__.co_filename == \
            f"{env.ascend_wheel.name}/vllm_ascend/ops/common_fused_moe.py"
        assert issubclass(ascend_moe, fused_moe) and fused_moe._load_w13 is not ascend_moe._load_w13
        assert linear.MergedColumnParallelLinear.weight_loader.__code__.co_filename.endswith(
            "vllm/model_executor/layers/linear.py")
        layer = env.moe_layer("model.layers.1.mlp.experts", 8, 256, 128)
        assert layer.tp_size == 2 and layer.tp_rank == 1 and layer.expert_map is None
        assert tuple(layer.w13_weight.shape) == (8, 64, 256)  # version 1.0.0: I/tp int8 rows hold 2 int4
    assert sys.path == path_before
    assert not _leftovers()
    assert _installed_version("vllm-ascend") == installed_before


def test_env_expert_parallel_map_and_restoration_after_an_error(wheels):
    description = {"model_quant_type": SOURCE_TYPE, "group_size": 0, **EXPERT_0}
    with pytest.raises(RuntimeError, match="boom"):
        with serving.ServingEnv(description, ep_size=2, ep_rank=1) as env:
            layer = env.moe_layer("model.layers.1.mlp.experts", 8, 256, 128)
            assert layer.expert_map.tolist() == [-1, -1, -1, -1, 0, 1, 2, 3]
            assert layer.expert_map.dtype == torch.int32
            assert (layer.tp_size, layer.ep_size, layer.ep_rank) == (1, 2, 1)
            assert layer.w13_weight.shape[0] == 4
            raise RuntimeError("boom")
    assert not _leftovers()
    with pytest.raises(ValueError):
        serving.ServingEnv(description, tp_size=2, ep_size=2)


def test_013_env_installs_real_modules_and_leaves_nothing_behind(wheels_013):
    description = {"model_quant_type": SOURCE_TYPE, "version": "1.0.0", "group_size": 32, **EXPERT_0}
    path_before = list(sys.path)
    with serving.ServingEnv(description, tp_size=2, tp_rank=1, release=R013) as env:
        w4a8 = importlib.import_module("vllm_ascend.quantization.w4a8_dynamic")
        utils = importlib.import_module("vllm_ascend.quantization.utils")
        assert utils.ASCEND_QUANTIZATION_METHOD_MAP["W4A8_DYNAMIC"]["moe"] is w4a8.AscendW4A8DynamicFusedMoEMethod
        assert importlib.import_module("vllm_ascend._version").version == ASCEND_013
        for dist in ("vllm-ascend", "vllm"):
            assert importlib.metadata.version(dist) == "0.13.0", dist
        # maybe_trans_nz: importable where the real code takes it from, the identity
        nz = importlib.import_module("vllm_ascend.utils").maybe_trans_nz
        assert w4a8.maybe_trans_nz is nz
        weight = torch.ones(2, 3, dtype=torch.int8)
        assert nz(weight) is weight
        # vLLM's loaders as they are (no vllm-ascend overrides), the real AscendFusedMoE.__init__
        fused_moe = importlib.import_module("vllm.model_executor.layers.fused_moe").FusedMoE
        ascend_moe = importlib.import_module("vllm_ascend.ops.fused_moe.fused_moe").AscendFusedMoE
        assert issubclass(ascend_moe, fused_moe) and ascend_moe._load_w13 is fused_moe._load_w13
        assert fused_moe.weight_loader.__code__.co_filename == \
            f"{env.vllm_wheel.name}/vllm/model_executor/layers/fused_moe/layer.py"
        assert ascend_moe.__init__.__code__.co_filename == \
            f"{env.ascend_wheel.name}/vllm_ascend/ops/fused_moe/fused_moe.py"
        layer = env.moe_layer("model.layers.1.mlp.experts", 8, 256, 128)
        assert layer.tp_size == 2 and layer.tp_rank == 1 and layer.expert_map is None
        assert tuple(layer.w13_weight.shape) == (8, 64, 256)
        assert layer.quant_method.moe is layer.moe_config  # 0.13: FusedMoEMethodBase.__init__(layer.moe_config)
        # the DeepSeek loop is the one vllm-ascend 0.13 patches in
        model = env.model({"model.layers.1.mlp.experts": layer})
        assert model.load_weights.__code__.co_filename == \
            f"{env.ascend_wheel.name}/vllm_ascend/patch/worker/patch_deepseekv3.py"
    with serving.ServingEnv(description, ep_size=2, ep_rank=1, release=R013) as env:
        layer = env.moe_layer("model.layers.1.mlp.experts", 8, 256, 128)
        assert layer.expert_map.tolist() == [-1, -1, -1, -1, 0, 1, 2, 3]  # vllm-ascend's init_eplb_config
        assert layer.expert_map.dtype == torch.int32 and layer.local_num_experts == 4
        assert layer.w13_weight.shape[0] == 4
    assert sys.path == path_before
    assert not _leftovers()
    with pytest.raises(ValueError, match="release"):
        serving.ServingEnv(description, release="0.12")


# --------------------------------------------------------------------------------------------
# The release-source cache


def _fake_release(tmp_path, kind: str):
    """A tiny vllm-ascend 9.9.9 archive: a wheel or an sdist, with a .py, a binary and metadata."""
    files = {"vllm_ascend/__init__.py": b"X = 1\n", "vllm_ascend/ops/op.py": b"Y = 2\n",
             "vllm_ascend/_C.so": b"\x7fELF", "README.md": b"readme"}
    if kind == "wheel":
        path = tmp_path / "vllm_ascend-9.9.9-cp311-cp311-linux_x86_64.whl"
        with zipfile.ZipFile(path, "w") as archive:
            for name, data in {**files, "vllm_ascend-9.9.9.dist-info/METADATA": b"Version: 9.9.9\n"}.items():
                archive.writestr(name, data)
        return path
    path = tmp_path / "vllm_ascend-9.9.9.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        for name, data in {**files, "PKG-INFO": b"Version: 9.9.9\n"}.items():
            info = tarfile.TarInfo(f"vllm_ascend-9.9.9/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("kind", ["wheel", "sdist"])
def test_release_sources_keep_only_the_python_files_and_the_metadata(tmp_path, monkeypatch, kind):
    archive = _fake_release(tmp_path, kind)
    monkeypatch.setenv(serving.SOURCES_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("W4A8CONV_TEST_RELEASE", str(archive))
    folder = serving.release_sources.__wrapped__("vllm-ascend", "9.9.9", sdist=kind == "sdist",
                                                 env="W4A8CONV_TEST_RELEASE")
    kept = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert kept == ["vllm_ascend-9.9.9.dist-info/METADATA", "vllm_ascend/__init__.py", "vllm_ascend/ops/op.py"]
    assert serving._member_text(folder, "vllm_ascend/ops/op.py") == "Y = 2\n"
    archive.unlink()  # a second call reads the cache, not the archive
    assert serving.release_sources.__wrapped__("vllm-ascend", "9.9.9", env="W4A8CONV_TEST_RELEASE") == folder


@pytest.mark.parametrize("ci, outcome", [("1", pytest.fail.Exception), ("", pytest.skip.Exception)])
def test_a_release_that_cannot_be_fetched_fails_under_ci_and_skips_elsewhere(monkeypatch, ci, outcome):
    """Every serving test reaches its releases through `release_or_skip` (the `wheels` fixtures)."""
    def unavailable():
        raise serving.HarnessUnavailable("no network")

    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="release pair 9.9 unavailable: no network"):
        release_or_skip("release pair 9.9", unavailable)
