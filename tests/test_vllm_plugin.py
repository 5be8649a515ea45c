"""The vLLM plugin, exercised on the CPU through vLLM 0.11.0's real `load_weights` loops and vllm-ascend
0.11.0's real quantization config and wrappers (tests/vllm_serving_harness.py): a converted checkpoint,
loaded with the plugin registered, leaves every rank holding exactly what vllm-ascend holds after
loading and post-processing the *source* checkpoint (tests/vllm_ascend_harness.py), and everything the
plugin cannot serve exactly is refused.

What cannot run here: the FRACTAL_NZ cast (`torch_npu.npu_format_cast`, identity in the harness) and
serving itself (`apply` calls vllm-ascend's NPU kernels); docs/serving.md says so.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
import importlib
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from w4a8conv.constants import CONVERTED_TYPE, DESCRIPTION_NAME
from w4a8conv.errors import NotConvertedError, ServingError, UnsupportedSplitError
from w4a8conv.runtime import NpuReadyCheckpoint
from w4a8conv.runtime import vllm_ascend as plugin
from w4a8conv.synthetic import PRESETS

try:
    import test_vllm_serving_harness as checks
    from cases import MOE_CASES as BASE_CASES
    import vllm_ascend_harness as harness
    import vllm_serving_harness as serving
except ImportError:  # tests/ imported as a package
    from tests import test_vllm_serving_harness as checks
    from tests.cases import MOE_CASES as BASE_CASES
    from tests import vllm_ascend_harness as harness
    from tests import vllm_serving_harness as serving

MOE_PARAMS = {"w13_weight", "w2_weight", "w13_weight_scale", "w2_weight_scale", "w13_scale_bias", "w2_scale_bias"}
MOE = "model.layers.1.mlp.experts"

wheels = checks.wheels
no_leftover_modules = checks.no_leftover_modules


def description(out) -> dict:
    return json.loads((out / DESCRIPTION_NAME).read_text())


def moe_blocks(out) -> dict[str, tuple[int, int, int]]:
    """FusedMoE prefix -> (experts, hidden, intermediate), from the converted checkpoint's stamp."""
    modules = description(out)["w4a8conv"]["modules"]
    return {f"{p}.experts": (m["num_experts"], m["hidden"], m["intermediate"])
            for p, m in modules.items() if m["kind"] == "moe"}


def model_type(out) -> str:
    return json.loads((out / "config.json").read_text())["model_type"]


def load_moe(out, split, *, desc=None, drop=(), kind=None, blocks=None, release=serving.DEFAULT_RELEASE):
    """One rank with the plugin registered: build the layers, stream the converted checkpoint through
    vLLM's loop, post-process. Returns the layers (parameters detached from the environment)."""
    with serving.ServingEnv(desc or description(out), model_type=kind or model_type(out), release=release,
                            **split) as env:
        plugin.register()
        layers = {prefix: env.moe_layer(prefix, *shape) for prefix, shape in (blocks or moe_blocks(out)).items()}
        for layer in layers.values():
            assert getattr(type(layer.quant_method.quant_method), "_w4a8conv_scheme", False)
            checks._scramble(layer)
        model = env.model(layers)
        weights = ((n, t) for n, t in checks._under(serving.weights_from_dir(out), list(layers)) if n not in drop)
        env.load_weights(model, weights)
        env.process_weights_after_loading(model)
    return layers


# vllm-ascend 0.13 resolves an MoE layer's scheme from `experts.0.gate_proj`-style keys only, so it
# cannot build a w1/w3/w2-named (Mixtral) layer at all, converted or not.
MOE_CASES = [pytest.param(*case.values, release, id=f"{case.id}-{release}") for case in BASE_CASES
             for release in serving.RELEASES
             if not (release == "0.13" and PRESETS[case.values[0]].projections[0] == "w1")]


@pytest.mark.parametrize("preset, tp, ep, release", MOE_CASES)
def test_moe_rank_holds_what_vllm_ascend_derives_from_the_source(wheels, converted, preset, tp, ep, release):
    src, out = converted(preset)
    view = NpuReadyCheckpoint.open(out)
    version = serving.RELEASES[release].ascend_version
    for split in checks._rank_splits(tp, ep):
        for prefix, layer in load_moe(out, split, release=release).items():
            want = harness.moe_rank_tensors(src, prefix.removesuffix(".experts"), version=version, **split)
            for key, tensor in view.moe_layer(prefix.removesuffix(".experts"), **split).items():
                if want[key].numel() == 0:
                    # vllm-ascend 0.11 keeps no bias for per-channel "0"; the checkpoint view's is checked
                    # against an independent float64 sum in test_vllm_ascend_equivalence
                    want[key] = tensor
            got = dict(layer.named_parameters())
            assert set(got) == MOE_PARAMS, sorted(got)
            where = f"{preset} {release} {prefix} tp {split['tp_rank']}/{tp} ep {split['ep_rank']}/{ep}"
            for key in MOE_PARAMS:
                checks.assert_same(got[key].data, want[key], f"{where} {key}", bias=key.endswith("scale_bias"))


def test_moe_through_the_qwen3_moe_loop(wheels, converted):
    src, out = converted("moe-group-v1")
    for split in checks._rank_splits(2, 1):
        for prefix, layer in load_moe(out, split, kind="qwen3_moe").items():
            want = harness.moe_rank_tensors(src, prefix.removesuffix(".experts"), **split)
            for key in MOE_PARAMS:
                checks.assert_same(getattr(layer, key).data, want[key], key, bias=key.endswith("scale_bias"))


def dense_mlps(out) -> tuple[list[str], Callable[[str], tuple[int, int]]]:
    """The converted W4A8 dense MLPs (and shared experts) and their (intermediate, hidden) sizes."""
    records = description(out)["w4a8conv"]["modules"]
    mlps = sorted({p.rsplit(".", 1)[0] for p, m in records.items() if m["kind"] == "linear"})
    return mlps, lambda mlp: (records[f"{mlp}.gate_proj"]["out_features"], records[f"{mlp}.down_proj"]["out_features"])


def load_mlps(root, mlps, layers_of, *, release, plugin_on: bool, tp_size=1, tp_rank=0):
    """Dense MLPs (merged gate_up_proj, row-parallel down_proj) of a checkpoint, for one TP rank, through
    vLLM's real loop; with `plugin_on` the converted checkpoint through the plugin, else the source
    through vllm-ascend's own W4A8_DYNAMIC path."""
    with serving.ServingEnv(description(root), model_type=model_type(root), release=release, tp_size=tp_size,
                            tp_rank=tp_rank) as env:
        if plugin_on:
            plugin.register()
        layers = {}
        for mlp in mlps:
            inter, hidden = layers_of(mlp)
            layers[f"{mlp}.gate_up_proj"] = env.linear_layer(f"{mlp}.gate_up_proj", "merged", hidden, [inter, inter])
            layers[f"{mlp}.down_proj"] = env.linear_layer(f"{mlp}.down_proj", "row", inter, [hidden])
        for layer in layers.values():
            checks._scramble(layer)
        model = env.model(layers)
        sources = [f"{mlp}.{proj}" for mlp in mlps for proj in ("gate_proj", "up_proj", "down_proj")]
        env.load_weights(model, checks._under(serving.weights_from_dir(root), sources))
        env.process_weights_after_loading(model)
    return layers


@pytest.mark.parametrize("release", list(serving.RELEASES))
@pytest.mark.parametrize("preset", ["linear-v0", "linear-v1"])
def test_linear_layers_hold_what_vllm_ascend_derives_from_the_source(wheels, converted, preset, release):
    """Dense MLPs at TP 1: gate/up through vLLM's merged loader path (shard ids 0, 1), down as a row layer."""
    src, out = converted(preset)
    mlps, sizes = dense_mlps(out)
    bias = "scale_bias" if PRESETS[preset].version == "1.0.0" else "weight_scale_bias"
    version = serving.RELEASES[release].ascend_version
    layers = load_mlps(out, mlps, sizes, release=release, plugin_on=True)
    for mlp in mlps:
        gate, up = (harness.linear_tensors(src, f"{mlp}.{proj}", version=version) for proj in ("gate_proj", "up_proj"))
        expected = {f"{mlp}.gate_up_proj": {k: torch.cat([gate[k], up[k]], dim=-1) for k in gate},
                    f"{mlp}.down_proj": harness.linear_tensors(src, f"{mlp}.down_proj", version=version)}
        for prefix, want in expected.items():
            got = dict(layers[prefix].named_parameters())
            # vllm-ascend also keeps weight_scale / weight_offset(_second), which its apply never reads
            assert set(got) == {"weight", "weight_scale_second", bias}, sorted(got)
            for key, tensor in got.items():
                checks.assert_same(tensor.data, want[key], f"{preset} {prefix} {key}", bias=key == bias)


# --------------------------------------------------------------------------------------------
# Refusals


def test_a_parameter_left_unloaded_is_refused(wheels, converted):
    _src, out = converted("moe-group-v1")
    with pytest.raises(ServingError, match=rf"{MOE}: parameters left unloaded \(w13_scale_bias at \(row, shard\) "
                                           r"\[\[5, 1\]\]\)"):
        load_moe(out, {}, drop={f"{MOE}.5.up_proj.scale_bias"})


def test_an_expert_parallel_rank_needs_only_its_experts(wheels, converted):
    """Rank 1 of EP 2 holds experts 4..7: dropping expert 0 does not matter, dropping expert 4 does."""
    _src, out = converted("moe-group-v1")
    load_moe(out, {"ep_size": 2, "ep_rank": 1}, drop={f"{MOE}.0.down_proj.weight"})
    with pytest.raises(ServingError, match=r"w2_weight at \(row, shard\) \[\[0, 0\]\]"):
        load_moe(out, {"ep_size": 2, "ep_rank": 1}, drop={f"{MOE}.4.down_proj.weight"})


@pytest.mark.parametrize("preset, tp, rule", [
    ("moe-group-v1", 8, "intermediate part 16 is not a multiple of group_size 32"),
    ("moe-channel-v0", 32, "MoE TP size must divide 16"),  # version "1.0.0" is refused by vllm-ascend itself
])
def test_a_split_the_layout_cannot_cut_is_refused(wheels, converted, preset, tp, rule):
    _src, out = converted(preset)
    with pytest.raises(UnsupportedSplitError, match=rule):
        load_moe(out, {"tp_size": tp, "tp_rank": 0})


@pytest.mark.parametrize("edit, error, message", [
    (lambda d: d.pop("w4a8conv"), NotConvertedError, "no 'w4a8conv' stamp"),
    (lambda d: d["w4a8conv"].update(layout_version=3), NotConvertedError,
     "layout version 3; this w4a8conv serves version 2 only"),
    (lambda d: d["w4a8conv"].update(layout="other"), NotConvertedError, "layout 'other' is not"),
    (lambda d: d["w4a8conv"]["modules"].pop("model.layers.1.mlp"), ServingError,
     "records no converted moe layer"),
], ids=["no-stamp", "future-layout", "foreign-layout", "layer-not-recorded"])
def test_a_description_the_plugin_cannot_trust_is_refused(wheels, converted, edit, error, message):
    _src, out = converted("moe-group-v1")
    desc = copy.deepcopy(description(out))
    edit(desc)
    with pytest.raises(error, match=message):
        load_moe(out, {}, desc=desc)


def test_layer_shapes_that_disagree_with_the_stamp_are_refused(wheels, converted):
    _src, out = converted("moe-group-v1")
    with pytest.raises(ServingError, match="vLLM builds hidden 256, intermediate 64 x TP 1"):
        load_moe(out, {}, blocks={MOE: (8, 256, 64)})


def test_redundant_experts_are_refused(wheels, converted):
    """With EPLB's redundant experts vLLM serves more physical experts than the checkpoint holds."""
    _src, out = converted("moe-group-v1")
    with pytest.raises(UnsupportedSplitError, match="serves 9 physical experts, the checkpoint holds 8"):
        load_moe(out, {}, blocks={MOE: (9, 256, 128)})


def test_dynamic_eplb_is_refused(wheels, converted):
    _src, out = converted("moe-group-v1")
    with serving.ServingEnv(description(out), model_type=model_type(out)) as env:
        plugin.register()
        base = sys.modules["vllm_ascend.quantization.w4a8_dynamic"]
        eplb = base.get_ascend_config()
        base.get_ascend_config = lambda: SimpleNamespace(**{**vars(eplb), "dynamic_eplb": True})
        with pytest.raises(ServingError, match="dynamic EPLB"):
            env.moe_layer(MOE, 8, 256, 128)


@pytest.mark.parametrize("release", list(serving.RELEASES))
def test_linear_layers_at_tp_2_hold_what_vllm_ascend_holds(wheels, converted, release):
    """Column-parallel (merged gate/up) and row-parallel (down) at TP 2, every rank: the plugin on the converted
    checkpoint against vllm-ascend's own path on the source, both through vLLM's real loaders."""
    src, out = converted("linear-v1")
    mlps, sizes = dense_mlps(out)
    for rank in range(2):
        split = dict(release=release, tp_size=2, tp_rank=rank)
        got = load_mlps(out, mlps, sizes, plugin_on=True, **split)
        want = load_mlps(src, mlps, sizes, plugin_on=False, **split)
        for prefix, layer in got.items():
            params = dict(layer.named_parameters())
            assert set(params) == {"weight", "weight_scale_second", "scale_bias"}, sorted(params)
            reference = dict(want[prefix].named_parameters())
            for key, tensor in params.items():
                checks.assert_same(tensor.data, reference[key].data, f"{release} rank {rank} {prefix} {key}",
                                   bias=key == "scale_bias")


def test_a_row_parallel_version_0_layer_beyond_tp_1_is_refused(wheels, converted):
    """Its bias is vllm-ascend's sum over the rank's input slice; the checkpoint holds the whole sum."""
    _src, out = converted("linear-v0")
    inter, hidden = dense_mlps(out)[1]("model.layers.0.mlp")
    with serving.ServingEnv(description(out), model_type=model_type(out), tp_size=2, tp_rank=0) as env:
        plugin.register()
        env.linear_layer("model.layers.0.mlp.gate_up_proj", "merged", hidden, [inter, inter])  # column: fine
        with pytest.raises(UnsupportedSplitError, match=r"row-parallel version \"0\" layer's bias"):
            env.linear_layer("model.layers.0.mlp.down_proj", "row", inter, [hidden])


def test_without_the_plugin_vllm_ascend_refuses_the_converted_type(wheels, converted):
    _src, out = converted("moe-group-v1")
    with serving.ServingEnv(description(out), model_type=model_type(out)) as env:
        with pytest.raises(NotImplementedError, match="only supports following quant types"):
            env.moe_layer(MOE, 8, 256, 128)


@pytest.mark.parametrize("version", ["0.10.2rc1", "0.12.0rc1", "0.14.0rc1", "0.23.0"])
def test_an_unverified_vllm_ascend_release_is_refused(monkeypatch, version):
    monkeypatch.setattr(plugin, "_vllm_ascend_version", lambda: version)
    with pytest.raises(ServingError, match=rf"vllm-ascend 0\.11\.x, 0\.13\.x; vllm-ascend {version} is installed"):
        plugin.register()


@pytest.mark.parametrize("release, cast", [("0.11", "npu_format_cast"), ("0.13", "maybe_trans_nz")])
def test_the_only_device_step_is_the_releases_nz_cast_of_the_weights(wheels, converted, monkeypatch, release, cast):
    """0.11 casts the two expert weights with torch_npu; 0.13 through its own switch, Linear weights too."""
    _src, out = converted("linear-v1")  # an MoE layer and W4A8 dense MLPs
    records = description(out)["w4a8conv"]["modules"]
    moe = {f"{p}.experts": (m["num_experts"], m["hidden"], m["intermediate"]) for p, m in records.items()
           if m["kind"] == "moe"}
    cast_weights = []
    with serving.ServingEnv(description(out), model_type=model_type(out), release=release) as env:
        plugin.register()
        owner = importlib.import_module("torch_npu" if cast == "npu_format_cast" else "vllm_ascend.utils")
        real = getattr(owner, cast)
        monkeypatch.setattr(owner, cast, lambda w, *a: cast_weights.append(w.data_ptr()) or real(w, *a))
        layers = {prefix: env.moe_layer(prefix, *shape) for prefix, shape in moe.items()}
        linear = "model.layers.0.mlp.down_proj"
        layers[linear] = env.linear_layer(linear, "row", records[linear]["in_features"],
                                          [records[linear]["out_features"]])
        model = env.model(layers)
        env.load_weights(model, checks._under(serving.weights_from_dir(out), list(layers)))
        env.process_weights_after_loading(model)
    expected = [layers[p].w13_weight.data_ptr() for p in moe] + [layers[p].w2_weight.data_ptr() for p in moe]
    if release == "0.13":
        expected.append(layers[linear].weight.data_ptr())
    assert sorted(cast_weights) == sorted(expected)


# --------------------------------------------------------------------------------------------
# Registration


def test_registration_is_idempotent(wheels, converted):
    _src, out = converted("moe-group-v1")
    with serving.ServingEnv(description(out), model_type=model_type(out)):
        plugin.register()
        utils = importlib.import_module("vllm_ascend.quantization.utils")
        wrappers = importlib.import_module("vllm_ascend.quantization.quant_config")
        entry = dict(utils.ASCEND_QUANTIZATION_METHOD_MAP[CONVERTED_TYPE])
        hooks = (wrappers.AscendFusedMoEMethod.create_weights, wrappers.AscendLinearMethod.create_weights)
        plugin.register()
        plugin.register()
        assert utils.ASCEND_QUANTIZATION_METHOD_MAP[CONVERTED_TYPE] == entry
        assert (wrappers.AscendFusedMoEMethod.create_weights, wrappers.AscendLinearMethod.create_weights) == hooks
        for hook in hooks:  # wrapped once: the wrapped function is vllm-ascend's own
            assert not getattr(hook.__wrapped__, "_w4a8conv_scheme", False)
            assert hook.__wrapped__.__code__.co_filename.endswith("vllm_ascend/quantization/quant_config.py")
        assert set(utils.ASCEND_QUANTIZATION_METHOD_MAP) > {"W4A8_DYNAMIC", CONVERTED_TYPE}


def test_register_without_vllm_ascend_does_nothing():
    assert plugin._vllm_ascend_version() is None
    assert plugin.register() is None
    assert not [m for m in sys.modules if m.partition(".")[0] in ("vllm", "vllm_ascend", "torch_npu")]


def test_importing_w4a8conv_imports_no_serving_stack():
    code = ("import sys, w4a8conv, w4a8conv.cli, w4a8conv.runtime, w4a8conv.runtime.vllm_ascend\n"
            "print(sorted(m for m in sys.modules if m.partition('.')[0] in ('vllm', 'vllm_ascend', 'torch_npu')))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"


def test_the_entry_point_is_declared():
    from importlib.metadata import entry_points

    (entry,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "w4a8conv"]
    assert entry.value == "w4a8conv.runtime.vllm_ascend:register"
    assert entry.load() is plugin.register
