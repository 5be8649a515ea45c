"""The serving harness is faithful: vLLM 0.11.0's real load_weights loop and parameter loaders, with
vllm-ascend 0.11.0's real quantization config and W4A8_DYNAMIC module, leave every rank holding what
`vllm_ascend_harness` derives independently (its own slicing, then vllm-ascend's post-processing).

Both wheels are read at test time (downloaded into caches outside the repository); without them
these tests skip.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import re
import sys

import pytest
import torch

from w4a8conv.synthetic import PRESETS

try:
    import vllm_ascend_harness as harness
    import vllm_serving_harness as serving
except ImportError:  # tests/ imported as a package
    from tests import vllm_ascend_harness as harness
    from tests import vllm_serving_harness as serving

SOURCE_TYPE = "W4A8_DYNAMIC"
BIAS_RTOL = 1e-5  # of max |bias|: fp32 sums in another order differ in the last bits
TP_SIZES = (1, 2, 4)
EP_SIZES = (2,)   # with MoE TP 1; EP 1 is the TP 1 case


def _installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _leftovers() -> list[str]:
    return sorted(n for n in sys.modules if n.partition(".")[0] in serving.STANDIN_ROOTS)


@pytest.fixture(scope="session")
def wheels():
    try:
        return serving.find_vllm_wheel(), harness.find_wheel()
    except serving.HarnessUnavailable as exc:
        pytest.skip(f"vllm / vllm-ascend {serving.VLLM_VERSION} wheel unavailable: {exc}")


@pytest.fixture(autouse=True)
def no_leftover_modules():
    """Every test leaves sys.modules without vllm / vllm_ascend / torch_npu names."""
    before = _leftovers()
    yield
    assert _leftovers() == before, f"left in sys.modules: {sorted(set(_leftovers()) - set(before))}"


# --------------------------------------------------------------------------------------------
# Cases


def split_allowed(intermediate: int, experts: int, group_size: int, tp: int, ep: int) -> bool:
    """TP: I/tp a multiple of 8 (int4 words) and of group_size when per-group; EP: experts divide."""
    if intermediate % tp or experts % ep:
        return False
    part = intermediate // tp
    return part % 8 == 0 and (group_size == 0 or part % group_size == 0)


def _splits(spec) -> list[tuple[int, int]]:
    candidates = [(tp, 1) for tp in TP_SIZES] + [(1, ep) for ep in EP_SIZES]
    return [(tp, ep) for tp, ep in candidates
            if split_allowed(spec.intermediate, spec.num_experts, spec.effective_group_size, tp, ep)]


MOE_CASES = [pytest.param(name, tp, ep, id=f"{name}-tp{tp}-ep{ep}")
             for name, spec in PRESETS.items() if spec.moe_layers for tp, ep in _splits(spec)]
LINEAR_CASES = [name for name, spec in PRESETS.items() if spec.w4a8_linear]


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


def _load_moe(src, source, blocks, split, model_type=None):
    """One rank: build the FusedMoE layers, stream the checkpoint through the real loop, post-process."""
    with serving.ServingEnv(source.description, model_type=model_type or source.config["model_type"],
                            params_dtype=source.model_dtype, **split) as env:
        layers = {prefix: env.moe_layer(prefix, *shape) for prefix, shape in blocks.items()}
        method_cls = sys.modules["vllm_ascend.quantization.w4a8_dynamic"].AscendW4A8DynamicFusedMoEMethod
        fused_moe_cls = sys.modules["vllm.model_executor.layers.fused_moe"].FusedMoE
        for prefix, layer in layers.items():
            assert isinstance(layer, fused_moe_cls), prefix
            assert type(layer.quant_method.quant_method) is method_cls, prefix
            assert layer.quant_method.quant_method.tp_size == (1 if split["ep_size"] > 1 else split["tp_size"])
            _scramble(layer)
        model = env.model(layers)
        loaded = env.load_weights(model, _under(serving.weights_from_dir(src), list(layers)))
        params = {name for name, _ in model.named_parameters()}
        assert loaded == params, f"loaded {sorted(loaded ^ params)} differently from the model's parameters"
        env.process_weights_after_loading(model)
    return layers


def _check_moe(src, layers, split, label):
    for prefix, layer in layers.items():
        want = harness.moe_rank_tensors(src, prefix[: -len(".experts")], **split)
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


# --------------------------------------------------------------------------------------------
# Linear through vLLM's real merged/row loaders


@pytest.mark.parametrize("preset", LINEAR_CASES)
def test_linear_through_vllm_loop_equals_reference(wheels, preset_source, preset):
    src = preset_source(preset)
    source = harness.SourceCheckpoint(src)
    mlps = _dense_mlps(source)
    assert mlps, f"{preset}: no W4A8_DYNAMIC dense MLP"
    with serving.ServingEnv(source.description, model_type=source.config["model_type"],
                            params_dtype=source.model_dtype) as env:
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
        gate, up = harness.linear_tensors(src, f"{mlp}.gate_proj"), harness.linear_tensors(src, f"{mlp}.up_proj")
        # gate and up are stacked on the output axis: the last one after post-processing (which transposes
        # the weight and weight_scale_second and flattens the per-channel tensors), except for
        # weight_offset_second, which post-processing leaves as loaded, [output, groups]
        expected = {f"{mlp}.gate_up_proj": {k: torch.cat([gate[k], up[k]], dim=0 if k == "weight_offset_second" else -1)
                                            for k in gate},
                    f"{mlp}.down_proj": harness.linear_tensors(src, f"{mlp}.down_proj")}
        for prefix, want in expected.items():
            got = dict(layers[prefix].named_parameters())
            assert set(got) == set(want), f"{preset} {prefix}: {sorted(got)} vs reference {sorted(want)}"
            for key in want:
                assert_same(got[key].data, want[key], f"{preset} {prefix} {key}", bias=key.endswith("bias"))


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
