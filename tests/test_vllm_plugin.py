"""The vLLM plugin, exercised on the CPU through the real weight-loading code of vLLM and vllm-ascend for
every release pair of `vllm_serving_harness.RELEASES` (tests/vllm_serving_harness.py): a converted
checkpoint, loaded with the plugin registered, leaves every rank holding exactly what that vllm-ascend
release holds after loading and post-processing the *source* checkpoint (0.11/0.13: its module run by
tests/vllm_ascend_harness.py; 0.14+: its own loading path in the serving harness; where the release
cannot load the source, what 0.11 holds, in the release's shapes), and everything the plugin cannot
serve exactly is refused.

What cannot run here: the FRACTAL_NZ cast (the identity in the harness) and serving itself (`apply`
calls vllm-ascend's NPU kernels); docs/serving.md says so.
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

from w4a8conv.api import inspect
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

no_leftover_modules = checks.no_leftover_modules


@pytest.fixture(scope="session")
def wheels() -> dict:
    """The sources of every release pair the plugin is exercised on (release -> (vLLM, vllm-ascend)); the
    tests skip where one cannot be had, and fail when $CI is set."""
    return {release: checks.release_or_skip(f"release pair {release}", lambda r=release: serving.release_wheels(r))
            for release in serving.RELEASES}


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


# vllm-ascend 0.13 and later resolve an MoE layer's scheme from `experts.0.gate_proj`-style keys only, so
# they cannot build a w1/w3/w2-named (Mixtral) layer at all, converted or not.
MOE_CASES = [pytest.param(*case.values, release, id=f"{case.id}-{release}") for case in BASE_CASES
             for release in serving.RELEASES
             if not (release != "0.11" and PRESETS[case.values[0]].projections[0] == "w1")]


REGISTRY_RELEASES = [name for name, spec in serving.RELEASES.items() if spec.layout == "registry"]


def release_cannot_load(src, split) -> bool:
    """Where vllm-ascend 0.13, 0.18 and 0.23's own loading of the *source* fails (docs/serving.md): per-group
    scales at MoE TP >= 2 without EP. 0.13/0.18 tag w2's [H, 1] weight_scale GROUP and vLLM cuts it out of
    range on rank >= 1; 0.23 copies 1 // TP = 0 of its columns, leaving it unwritten on every rank."""
    return split["tp_size"] > 1 and harness.SourceCheckpoint(src).description.get("group_size", 256) > 0


def release_holds(src, prefix, split, release) -> dict[str, torch.Tensor]:
    """The six tensors an MoE rank of `release` holds after loading the *source* through the release's own
    code in the serving harness (vLLM's loop and loaders, vllm-ascend's schemes and post-processing)."""
    source = harness.SourceCheckpoint(src)
    shape = moe_blocks_of_source(source)[prefix]
    with serving.ServingEnv(source.description, model_type=source.config["model_type"], release=release,
                            params_dtype=source.model_dtype, **split) as env:
        layer = env.moe_layer(prefix, *shape)
        checks._scramble(layer)
        model = env.model({prefix: layer})
        env.load_weights(model, checks._under(serving.weights_from_dir(src), [prefix]))
        env.process_weights_after_loading(model)
    return {key: getattr(layer, key).data for key in MOE_PARAMS}


def moe_blocks_of_source(source) -> dict[str, tuple[int, int, int]]:
    return checks._moe_blocks(source)


def in_release_shapes(tensors: dict[str, torch.Tensor], release: str) -> dict[str, torch.Tensor]:
    """0.11's tensors in a release's shapes (0.20+ squeezes the per-channel [E, 1, 2Ip] w13 scale)."""
    squeeze = plugin.RELEASES[tuple(int(part) for part in release.split("."))].squeezed_channel_scale
    scale = tensors["w13_weight_scale"]
    if squeeze and scale.dim() == 3 and scale.shape[1] == 1:
        return {**tensors, "w13_weight_scale": scale.squeeze(1)}
    return tensors


def expected_moe(src, prefix, split, release) -> dict[str, torch.Tensor]:
    """What the plugin must leave: the release's own tensors from the source, or where the release cannot
    load the source, the values vllm-ascend 0.11 holds, in the release's shapes."""
    spec = serving.RELEASES[release]
    if spec.layout == "map":
        return harness.moe_rank_tensors(src, prefix.removesuffix(".experts"), version=spec.ascend_version, **split)
    if release_cannot_load(src, split):
        return in_release_shapes(harness.moe_rank_tensors(src, prefix.removesuffix(".experts"), **split), release)
    return release_holds(src, prefix, split, release)


@pytest.mark.parametrize("preset, tp, ep, release", MOE_CASES)
def test_moe_rank_holds_what_vllm_ascend_derives_from_the_source(wheels, converted, preset, tp, ep, release):
    src, out = converted(preset)
    view = NpuReadyCheckpoint.open(out)
    for split in checks._rank_splits(tp, ep):
        for prefix, layer in load_moe(out, split, release=release).items():
            want = expected_moe(src, prefix, split, release)
            for key, tensor in in_release_shapes(view.moe_layer(prefix.removesuffix(".experts"), **split),
                                                 release).items():
                if want[key].numel() == 0:
                    # vllm-ascend keeps no bias for per-channel "0"; the checkpoint view's is checked
                    # against an independent float64 sum in test_vllm_ascend_equivalence
                    want[key] = tensor
            got = dict(layer.named_parameters())
            assert set(got) == MOE_PARAMS, sorted(got)
            where = f"{preset} {release} {prefix} tp {split['tp_rank']}/{tp} ep {split['ep_rank']}/{ep}"
            for key in MOE_PARAMS:
                checks.assert_same(got[key].data, want[key], f"{where} {key}", bias=key.endswith("scale_bias"))


def load_source_unprocessed(src, prefix, split, release) -> torch.nn.Module:
    """An MoE rank of `release` after its own loading of the *source* (no post-processing), fresh parameters
    NaN-filled, so that what its loaders leave unwritten shows."""
    source = harness.SourceCheckpoint(src)
    with serving.ServingEnv(source.description, model_type=source.config["model_type"], release=release,
                            params_dtype=source.model_dtype, **split) as env:
        layer = env.moe_layer(prefix, *moe_blocks_of_source(source)[prefix])
        checks._scramble(layer)
        env.load_weights(env.model({prefix: layer}), checks._under(serving.weights_from_dir(src), [prefix]))
    return layer


@pytest.mark.parametrize("release", REGISTRY_RELEASES)
def test_where_the_release_cannot_load_the_source_the_converted_checkpoint_serves(wheels, converted, release):
    """Per-group at MoE TP 2: the release's own loading of the source fails on rank 1 (0.18: vLLM cuts w2's
    [H, 1] scale out of range) or leaves w2's scale and offset unwritten on every rank (0.23: vLLM copies
    1 // 2 = 0 of its columns); the converted checkpoint loads, holding the values 0.11 holds."""
    src, out = converted("moe-group-v1")
    for rank in range(2):
        split = {"tp_size": 2, "tp_rank": rank, "ep_size": 1, "ep_rank": 0}
        assert release_cannot_load(src, split)
        if release == "0.18":
            if rank:
                with pytest.raises(RuntimeError, match=r"start \(1\) \+ length \(1\) exceeds dimension size"):
                    load_source_unprocessed(src, MOE, split, release)
        else:
            own = load_source_unprocessed(src, MOE, split, release)
            for key in ("w2_weight_scale", "w2_weight_offset"):
                assert bool(torch.isnan(getattr(own, key)).all()), f"{release} rank {rank}: {key} was written"
            assert not bool(torch.isnan(own.w13_weight_scale).any())
        layer = load_moe(out, split, release=release)[MOE]
        want = in_release_shapes(harness.moe_rank_tensors(src, MOE.removesuffix(".experts"), **split), release)
        for key in MOE_PARAMS:
            checks.assert_same(getattr(layer, key).data, want[key], f"{release} rank {rank} {key}",
                               bias=key.endswith("scale_bias"))


def test_dynamic_eplb_leaves_the_per_expert_lists_the_release_leaves(wheels, converted):
    """vllm-ascend 0.23 with dynamic EPLB: after its NZ cast it replaces the six expert parameters by
    per-expert lists (weights as int8, viewed as int32 by its `apply`) that EPLB moves between ranks; the
    plugin leaves the same lists, equal to the release's own from the source."""
    src, out = converted("moe-group-v1")
    held = {}
    for root, plugin_on in ((out, True), (src, False)):
        with serving.ServingEnv(description(out) if plugin_on else harness.SourceCheckpoint(src).description,
                                model_type=model_type(root), release="0.23", ep_size=2, ep_rank=1,
                                params_dtype=harness.SourceCheckpoint(src).model_dtype) as env:
            if plugin_on:
                plugin.register()
            env.ascend_config.eplb_config.dynamic_eplb = True
            layer = env.moe_layer(MOE, 8, 256, 128)
            assert layer.dynamic_eplb
            checks._scramble(layer)
            model = env.model({MOE: layer})
            env.load_weights(model, checks._under(serving.weights_from_dir(root), [MOE]))
            env.process_weights_after_loading(model)
        held[plugin_on] = layer
    ours, theirs = held[True], held[False]
    for key in MOE_PARAMS:
        assert not hasattr(ours, key) and not hasattr(theirs, key), key
        got, want = getattr(ours, f"{key}_list"), getattr(theirs, f"{key}_list")
        assert len(got) == len(want) == 4
        for expert, (a, b) in enumerate(zip(got, want)):
            checks.assert_same(a, b, f"{key}_list[{expert}]", bias=key.endswith("scale_bias"))


@pytest.mark.parametrize("release", list(serving.RELEASES))
def test_moe_through_the_qwen3_moe_loop(wheels, converted, release):
    src, out = converted("moe-group-v1")
    for split in checks._rank_splits(2, 1):
        for prefix, layer in load_moe(out, split, kind="qwen3_moe", release=release).items():
            want = expected_moe(src, prefix, split, release)
            for key in MOE_PARAMS:
                checks.assert_same(getattr(layer, key).data, want[key], key, bias=key.endswith("scale_bias"))


def dense_mlps(out) -> tuple[list[str], Callable[[str], tuple[int, int]]]:
    """The converted W4A8 dense MLPs (and shared experts) and their (intermediate, hidden) sizes."""
    records = description(out)["w4a8conv"]["modules"]
    mlps = sorted({p.rsplit(".", 1)[0] for p, m in records.items() if m["kind"] == "linear"})
    return mlps, lambda mlp: (records[f"{mlp}.gate_proj"]["out_features"], records[f"{mlp}.down_proj"]["out_features"])


def load_mlps(root, mlps, layers_of, *, release, plugin_on: bool, tp_size=1, tp_rank=0,
              params_dtype=torch.bfloat16):
    """Dense MLPs (merged gate_up_proj, row-parallel down_proj) of a checkpoint, for one TP rank, through
    vLLM's real loop; with `plugin_on` the converted checkpoint through the plugin, else the source
    through vllm-ascend's own W4A8_DYNAMIC path."""
    with serving.ServingEnv(description(root), model_type=model_type(root), release=release, tp_size=tp_size,
                            tp_rank=tp_rank, params_dtype=params_dtype) as env:
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
    spec = serving.RELEASES[release]
    layers = load_mlps(out, mlps, sizes, release=release, plugin_on=True)
    # 0.14+: the release's own path on the source, through vLLM's real loaders in the same harness (its
    # antiquant scales are created in the model's dtype)
    own = load_mlps(src, mlps, sizes, release=release, plugin_on=False,
                    params_dtype=harness.SourceCheckpoint(src).model_dtype) if spec.layout == "registry" else None
    for mlp in mlps:
        if own is not None:
            expected = {prefix: {k: v.data for k, v in own[prefix].named_parameters()}
                        for prefix in (f"{mlp}.gate_up_proj", f"{mlp}.down_proj")}
        else:
            gate, up = (harness.linear_tensors(src, f"{mlp}.{proj}", version=spec.ascend_version)
                        for proj in ("gate_proj", "up_proj"))
            expected = {f"{mlp}.gate_up_proj": {k: torch.cat([gate[k], up[k]], dim=-1) for k in gate},
                        f"{mlp}.down_proj": harness.linear_tensors(src, f"{mlp}.down_proj",
                                                                   version=spec.ascend_version)}
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


@pytest.mark.parametrize("layer_type", ["merged", "row"])
def test_a_linear_layer_the_stamp_has_no_linear_record_for_is_refused(wheels, converted, layer_type):
    """The Linear scheme takes its bias name from the stamp's Linear records; with none, vLLM building a
    converted Linear layer is refused as it creates the parameters, not served with a guessed name."""
    _src, out = converted("linear-v1")
    mlps, layers_of = dense_mlps(out)
    inter, hidden = layers_of(mlps[0])
    desc = copy.deepcopy(description(out))
    modules = desc["w4a8conv"]["modules"]
    for prefix in [p for p, m in modules.items() if m["kind"] == "linear"]:
        del modules[prefix]
    name, shape = ((f"{mlps[0]}.gate_up_proj", (hidden, [inter, inter])) if layer_type == "merged"
                   else (f"{mlps[0]}.down_proj", (inter, [hidden])))
    with serving.ServingEnv(desc, model_type=model_type(out), release=serving.DEFAULT_RELEASE) as env:
        plugin.register()
        with pytest.raises(ServingError, match="stamp records no converted linear layer, while vLLM builds a "):
            env.linear_layer(name, layer_type, *shape)


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


@pytest.mark.parametrize("version", ["0.10.2rc1", "0.12.0rc1", "0.14.0rc1", "0.19.1rc1", "0.26.0"])
def test_an_unverified_vllm_ascend_release_is_refused(monkeypatch, version):
    monkeypatch.setattr(plugin, "_vllm_ascend_version", lambda: version)
    with pytest.raises(ServingError, match=rf"vllm-ascend 0\.11\.x, 0\.13\.x, 0\.18\.x, 0\.23\.x; "
                                           rf"vllm-ascend {version} is installed"):
        plugin.register()


def release_key(release: str) -> tuple[int, int]:
    return tuple(int(part) for part in release.split("."))


@pytest.mark.parametrize("release", list(serving.RELEASES))
def test_the_nz_cast_runs_on_the_int8_view_and_the_weights_are_its_result_as_int32(wheels, converted, monkeypatch,
                                                                                   release):
    """The only device step: the release's NZ cast (0.11 torch_npu's, later its own switch, Linear weights
    too), given the stored int32 words as the int8 bytes vllm-ascend casts; the weight is then the cast's
    result viewed as int32. The cast here inverts every bit, so a result not taken from it shows."""
    _src, out = converted("linear-v1")  # an MoE layer and W4A8 dense MLPs
    spec = plugin.RELEASES[release_key(release)]
    view = NpuReadyCheckpoint.open(out)
    records = description(out)["w4a8conv"]["modules"]
    moe = {f"{p}.experts": (m["num_experts"], m["hidden"], m["intermediate"]) for p, m in records.items()
           if m["kind"] == "moe"}
    casts = []  # (input, output) of every cast
    with serving.ServingEnv(description(out), model_type=model_type(out), release=release) as env:
        plugin.register()
        owner = importlib.import_module("torch_npu" if spec.nz_cast == "format_cast" else "vllm_ascend.utils")
        name = "npu_format_cast" if spec.nz_cast == "format_cast" else spec.nz_cast

        def cast(weight, *args):
            casts.append((weight.clone(), torch.bitwise_not(weight)))
            return casts[-1][1]

        monkeypatch.setattr(owner, name, cast)
        layers = {prefix: env.moe_layer(prefix, *shape) for prefix, shape in moe.items()}
        linear = "model.layers.0.mlp.down_proj"
        layers[linear] = env.linear_layer(linear, "row", records[linear]["in_features"],
                                          [records[linear]["out_features"]])
        model = env.model(layers)
        env.load_weights(model, checks._under(serving.weights_from_dir(out), list(layers)))
        env.process_weights_after_loading(model)
    stored = {}
    for prefix in moe:
        tensors = view.moe_layer(prefix.removesuffix(".experts"))
        stored.update({(prefix, key): tensors[key] for key in ("w13_weight", "w2_weight")})
    if spec.linear_nz:
        stored[(linear, "weight")] = view.tensor(f"{linear}.weight")
    assert len(casts) == len(stored)
    assert all(given.dtype == torch.int8 for given, _ in casts)
    for (prefix, key), words in stored.items():
        held = getattr(layers[prefix], key).data
        matches = [given for given, result in casts if torch.equal(result.view(torch.int32), held)]
        assert len(matches) == 1, f"{release} {prefix}.{key} is not the result of one cast"
        assert torch.equal(matches[0].view(torch.int32), words), f"{release} {prefix}.{key}: cast other bytes"
        assert torch.equal(held, torch.bitwise_not(words))
    if not spec.linear_nz:
        assert torch.equal(layers[linear].weight.data, view.tensor(f"{linear}.weight"))


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


@pytest.mark.parametrize("release", REGISTRY_RELEASES)
def test_registration_through_the_scheme_registry_is_idempotent(wheels, converted, release):
    """0.14+: the converted type goes into vllm-ascend's own `register_scheme` registry (which raises on a
    duplicate), once; the schemes are the module's mixins in front of the release's W4A8 classes."""
    _src, out = converted("moe-group-v1")
    with serving.ServingEnv(description(out), model_type=model_type(out), release=release):
        plugin.register()
        registry = importlib.import_module("vllm_ascend.quantization.methods.registry")
        w4a8 = importlib.import_module("vllm_ascend.quantization.methods.w4a8")
        adapters = importlib.import_module("vllm_ascend.quantization.method_adapters")
        schemes = {kind: registry.get_scheme_class(CONVERTED_TYPE, kind) for kind in ("moe", "linear")}
        assert schemes["moe"].__mro__[1:3] == (plugin._ConvertedMoE, w4a8.AscendW4A8DynamicFusedMoEMethod)
        assert schemes["linear"].__mro__[1:3] == (plugin._ConvertedLinear, w4a8.AscendW4A8DynamicLinearMethod)
        assert schemes["moe"].release is plugin.RELEASES[release_key(release)]
        hooks = (adapters.AscendFusedMoEMethod.create_weights, adapters.AscendLinearMethod.create_weights)
        plugin.register()
        assert {kind: registry.get_scheme_class(CONVERTED_TYPE, kind) for kind in ("moe", "linear")} == schemes
        assert (adapters.AscendFusedMoEMethod.create_weights, adapters.AscendLinearMethod.create_weights) == hooks
        assert hooks[0].__wrapped__.__code__.co_filename.endswith("vllm_ascend/quantization/method_adapters.py")


def test_a_foreign_scheme_under_the_converted_type_is_refused(wheels, converted):
    _src, out = converted("moe-group-v1")
    with serving.ServingEnv(description(out), model_type=model_type(out), release="0.18"):
        registry = importlib.import_module("vllm_ascend.quantization.methods.registry")
        registry.register_scheme(CONVERTED_TYPE, "moe")(type("Other", (), {}))
        with pytest.raises(ServingError, match="that are not w4a8conv's; remove the other plugin"):
            plugin.register()


def test_dynamic_eplb_is_refused_where_the_release_does_not_move_w4a8_experts(wheels, converted):
    """vllm-ascend 0.18's EPLB refuses W4A8 ("EPLB not support W4A8"); the plugin says so at construction."""
    _src, out = converted("moe-group-v1")
    with serving.ServingEnv(description(out), model_type=model_type(out), release="0.18", ep_size=2) as env:
        plugin.register()
        env.ascend_config.eplb_config.dynamic_eplb = True
        with pytest.raises(ServingError, match="dynamic EPLB: this vllm-ascend release does not move W4A8"):
            env.moe_layer(MOE, 8, 256, 128)


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


def test_the_stamp_names_the_serving_lines_and_the_plugin_decides_from_its_own_table(wheels, converted):
    """The stamp records the release lines of the writing w4a8conv, inspect shows them; at load the
    plugin's own table decides, so an output stamped before a line was added serves on it."""
    _src, out = converted("moe-group-v1")
    assert description(out)["w4a8conv"]["serving_releases"] == ["0.11", "0.13", "0.18", "0.23"]
    assert inspect(out)["serving_releases"] == ["0.11", "0.13", "0.18", "0.23"]
    older = copy.deepcopy(description(out))
    older["w4a8conv"]["serving_releases"] = ["0.11", "0.13"]
    layer = load_moe(out, {}, desc=older, release="0.18")[MOE]
    assert tuple(layer.w13_weight.shape) == (8, 256, 32)


def test_moe_tp_beyond_the_releases_bias_chunk_world_is_refused(wheels, converted):
    """vllm-ascend 0.23 shares the 16 down_proj bias chunks over the tensor-parallel world; with data
    parallelism and no EP, vLLM's MoE TP spans more ranks (here: DP 2 x TP 1 = MoE TP 2)."""
    _src, out = converted("moe-group-v1")
    with serving.ServingEnv(description(out), model_type=model_type(out), release="0.23", tp_size=2) as env:
        plugin.register()
        sys.modules["vllm_ascend.quantization.methods.w4a8"].get_tensor_model_parallel_world_size = lambda: 1
        with pytest.raises(UnsupportedSplitError, match=r"over 2 MoE tensor-parallel ranks, while this vllm-ascend "
                                                        r"release shares the 16 down_proj bias chunks over its "
                                                        r"tensor-parallel world \(1 ranks\)"):
            env.moe_layer(MOE, 8, 256, 128)
