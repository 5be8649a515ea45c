"""The producer in the loop: msModelSlim 26.1.0 itself quantizes tiny random models on CPU (every exporter
path: `llm_ptq` with `safe_tensor` and `ascendV1` at group sizes 32 and 64, `msmodelslim quant` with
`ascendv1_saver`, and its DeepSeek-V4 adapter with its own DeepSeek-V4-Pro W4A8 practice), and every export
goes through `convert`, vllm-ascend's own post-processing at every split the shapes allow, `verify --source
--all` and `verify --numerics` — or, where no vllm-ascend release can serve it, is refused with one line and
exit 3. The DeepSeek-V4 output is also served on vllm-ascend 0.23's DeepSeek-V4 model (native names).

What msModelSlim cannot do on CPU, and so is not here (tests/msmodelslim_produce.py has the details):
- the DeepSeek-V4 adapter's MTP layer: its calibration calls `module.to('npu')`, so the tiny DeepSeek-V4 model
  has no MTP layer (`n_mtp_layers` 0, no `mtp.*` weights); compress ratios 4 and 128: the practice's flex
  smooth quant multiplies bf16 activations by the fp32 Compressor/Indexer weights ("expected m1 and m2 to
  have the same dtype"), so both layers use ratio 0 (read as 1);
- a DeepSeek-V2/V3-style MoE through `msmodelslim quant` (the DeepSeek-V3 adapter): on transformers 4.57 the
  router's `e_score_correction_bias` is a buffer, the adapter loads each layer from `named_parameters()`
  only, and `load_state_dict` stops with `Missing key(s) in state_dict: "mlp.gate.e_score_correction_bias"`
  (the adapter names transformers 4.48.2, which predates transformers' own DeepSeek-V3 model: hub checkpoints
  bring theirs as remote code, which no test can download). The DeepSeek-V3 model goes through `llm_ptq`.

Marker `msmodelslim` (`pytest -m msmodelslim` runs this tier alone). The first run installs msModelSlim into
~/.cache/w4a8conv/producers/ and caches the exports (tests/msmodelslim_producer.py); without the package
index these tests skip, or fail when $CI is set.
"""
from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from cases import TP_SIZES, EP_SIZES, split_allowed
from conftest import running_in_ci
from msmodelslim_producer import ProducerUnavailable, exports
from robustness_support import assert_clean_failure, run_main
from test_vllm_ascend_equivalence import (MoeWhere, assert_bias_close, assert_floats_identical, assert_ints_equal,
                                          linear_where)
from w4a8conv.api import ConvertOptions, convert
from w4a8conv.layout import MOE_PARAMS
from w4a8conv.runtime import NpuReadyCheckpoint
from w4a8conv.synthetic import DEEPSEEK_V4_SCRIPT
from w4a8conv.verify import verify

try:
    import test_deepseek_v4_script as v4_serving
    import test_vllm_serving_harness as checks
    import vllm_ascend_harness as harness
except ImportError:  # tests/ imported as a package
    from tests import test_deepseek_v4_script as v4_serving
    from tests import test_vllm_serving_harness as checks
    from tests import vllm_ascend_harness as harness

v4_wheels = v4_serving.wheels
no_leftover_modules = checks.no_leftover_modules

pytestmark = pytest.mark.msmodelslim

SOURCE_TYPE = "W4A8_DYNAMIC"
# export -> what convert must do with it: ("converts", expected warning or None) or ("refused", message pieces)
EXPECTED: dict[str, tuple] = {
    "qwen3moe-llmptq-safetensor-g64": ("converts", 64),
    "qwen3moe-llmptq-safetensor-g32": ("converts", 32),
    "qwen3moe-llmptq-ascendv1-g64": ("converts", None),
    "qwen3moe-llmptq-ascendv1-g32": ("converts", None),
    "qwen2-llmptq-safetensor-g64": ("converts", 64),
    "qwen2-llmptq-ascendv1-g32": ("converts", None),
    "deepseekv3-llmptq-ascendv1-g32": ("converts", None),
    "qwen3moe-modelslimv1": ("converts", None),
    "qwen2-modelslimv1": ("refused", ["per-channel (group_size 0) W4A8_DYNAMIC Linear layer",
                                      "no vllm-ascend release serves one", "nothing was written"]),
    # msModelSlim's DeepSeek-V4 adapter and its DeepSeek-V4-Pro W4A8 practice (no MTP layer, compress ratio
    # 1: what cannot run on CPU, tests/msmodelslim_produce.py)
    "deepseekv4-modelslimv1-practice-w4a8": ("converts", None),
}
CONVERTING = [name for name, (outcome, _) in EXPECTED.items() if outcome == "converts"]
MOE_EXPORTS = [name for name in CONVERTING if not name.startswith("qwen2")]  # Qwen2 is dense
V4 = "deepseekv4-modelslimv1-practice-w4a8"


# what msModelSlim itself cannot produce here (tests/msmodelslim_produce.py EXPECTED_FAILURES)
V3_MODELSLIM_V1 = "deepseekv3-modelslimv1"


@pytest.fixture(scope="session")
def produced(vllm_ascend_wheel) -> dict[str, Path]:
    try:
        made, _seconds = exports(sorted([*EXPECTED, V3_MODELSLIM_V1]))
    except ProducerUnavailable as exc:
        if running_in_ci():
            pytest.fail(f"msModelSlim tier unavailable with $CI set: {exc}")
        pytest.skip(f"msModelSlim tier unavailable: {exc}")
    return made


@pytest.fixture(scope="session")
def converted_exports(produced, tmp_path_factory) -> dict[str, tuple[Path, Path, Path, list[str]]]:
    """name -> (export, converted output, the export as vllm-ascend must read it, convert's warnings)."""
    results = {}
    for name in CONVERTING:
        source = produced[name]
        out = tmp_path_factory.mktemp(name) / "npu"
        report = convert(source, out, options=ConvertOptions(workers=1))
        stamp = NpuReadyCheckpoint.open(out).stamp
        reference = source
        if stamp.source.group_size_from == "shapes":  # vllm-ascend would read 256: give it the value
            reference = harness.with_description_keys(source, out.parent / "described",
                                                      group_size=stamp.source.group_size)
        results[name] = (source, out, reference, report.warnings)
    return results


def _w4a8_modules(source: Path) -> tuple[set[str], set[str]]:
    description = json.loads(next(source.glob("quant_model_description*.json")).read_text())
    moe, linear = set(), set()
    for name, kind in description.items():
        if kind == SOURCE_TYPE and name.endswith(".weight"):
            match = re.match(r"(.*)\.experts\.\d+\.[^.]+\.weight$", name)
            (moe.add(match.group(1)) if match else linear.add(name[: -len(".weight")]))
    return moe, linear


@pytest.mark.parametrize("name", CONVERTING)
def test_export_converts_every_w4a8_module(converted_exports, name):
    source, out, _reference, warnings = converted_exports[name]
    stamp = NpuReadyCheckpoint.open(out).stamp
    moe, linear = _w4a8_modules(source)
    assert bool(moe) == (name in MOE_EXPORTS), f"{name}: W4A8 experts {sorted(moe)}"
    assert moe or linear, f"{name}: msModelSlim wrote no W4A8 module"
    modules = stamp.modules
    assert {p for p, m in modules.items() if m.kind == "moe"} == moe
    assert {p for p, m in modules.items() if m.kind == "linear"} == linear
    inferred = EXPECTED[name][1]
    if inferred:
        assert (stamp.source.group_size, stamp.source.group_size_from) == (inferred, "shapes")
        assert len(warnings) == 1 and f"group size {inferred} inferred" in warnings[0], warnings
        assert "vllm-ascend would have used 256" in warnings[0]
    else:
        assert stamp.source.group_size_from == "description"


@pytest.mark.parametrize("name", MOE_EXPORTS)
def test_moe_ranks_equal_vllm_ascend_at_every_split(converted_exports, name):
    _source, out, reference, _warnings = converted_exports[name]
    ck = NpuReadyCheckpoint.open(out)
    compared = 0
    for prefix, m in ck.stamp.modules.items():
        if m.kind != "moe":
            continue
        group, intermediate, experts = m.group_size, m.intermediate, m.num_experts
        splits = [(tp, 1) for tp in TP_SIZES] + [(1, ep) for ep in EP_SIZES]
        for tp, ep in [s for s in splits if split_allowed(intermediate, experts, group, *s)]:
            part, local = intermediate // tp, experts // ep
            for rank in range(max(tp, ep)):
                split = {"tp_size": tp, "tp_rank": rank if tp > 1 else 0, "ep_size": ep,
                         "ep_rank": rank if ep > 1 else 0}
                got, want = ck.moe_layer(prefix, **split), harness.moe_rank_tensors(reference, prefix, **split)
                where = MoeWhere(tuple(m.projections), split["tp_rank"], part, split["ep_rank"] * local, group)
                label = f"{name} {prefix} tp {split['tp_rank']}/{tp} ep {split['ep_rank']}/{ep}"
                for key in ("w13_weight", "w2_weight", "w13_weight_scale", "w2_weight_scale"):
                    assert_ints_equal(got[key], want[key], f"{label} {key}", lambda i, k=key, w=where: w(k, i))
                for key in ("w13_scale_bias", "w2_scale_bias"):
                    assert_bias_close(got[key], want[key], f"{label} {key}", lambda i, k=key, w=where: w(k, i))
                compared += 1
    assert compared >= 3, f"{name}: only {compared} ranks compared"


@pytest.mark.parametrize("name", [n for n in CONVERTING if "llmptq" in n and not n.startswith("deepseek")])
def test_linear_layers_equal_vllm_ascend(converted_exports, name):
    _source, out, reference, _warnings = converted_exports[name]
    ck = NpuReadyCheckpoint.open(out)
    layers = [p for p, m in ck.stamp.modules.items() if m.kind == "linear"]
    assert layers, f"{name}: llm_ptq quantizes attention and dense MLPs W4A8, none converted"
    for prefix in layers:
        got, want = ck.linear(prefix), harness.linear_tensors(reference, prefix)
        float_bias = got.pop("bias", None)  # the layer's own (Qwen2's q/k/v), passed through
        if float_bias is not None:
            assert torch.equal(float_bias, harness.SourceCheckpoint(reference).tensor(f"{prefix}.bias"))
        assert set(got) <= set(want), f"{name} {prefix}: {sorted(set(got) - set(want))}"
        for key, tensor in got.items():
            def where(i, k=key):
                return linear_where(k, i)

            label = f"{name} {prefix} {key}"
            if not tensor.is_floating_point():
                assert_ints_equal(tensor, want[key], label, where)
            elif key.endswith("bias"):
                assert_bias_close(tensor, want[key], label, where)
            else:
                assert_floats_identical(tensor, want[key], label, where)


@pytest.mark.parametrize("name", CONVERTING)
def test_verify_source_all_and_numerics_pass(converted_exports, name):
    source, out, _reference, _warnings = converted_exports[name]
    report = verify(out, source=source, sample=None, numerics=True)
    assert report.ok, report.problems
    assert report.numerics, f"{name}: no layer went through the numerics check"


def test_modelslim_v1_writes_what_the_issue_describes(produced):
    """The facts the converter relies on, on msModelSlim's own output (a change of producer shows here)."""
    moe = produced["qwen3moe-modelslimv1"]
    description = json.loads((moe / "quant_model_description.json").read_text())
    assert (description["version"], description["group_size"]) == ("1.0.0", 0)  # per-channel despite the YAML
    assert description["model_quant_type"] != SOURCE_TYPE                       # though the experts are W4A8
    assert (moe / "quant_model_weights.safetensors.index.json").is_file() and (moe / "config.json").is_file()
    old = json.loads((produced["qwen3moe-llmptq-safetensor-g64"] /
                      "quant_model_description_w4a8_dynamic.json").read_text())
    assert "version" not in old and "group_size" not in old


def test_per_channel_w4a8_linear_export_is_refused(produced, tmp_path):
    source = produced["qwen2-modelslimv1"]
    _moe, linear = _w4a8_modules(source)
    assert linear, "msModelSlim wrote no W4A8 Linear layer"
    run = run_main("convert", source, tmp_path / "out")
    assert_clean_failure(run, 3, EXPECTED["qwen2-modelslimv1"][1])
    assert not (tmp_path / "out").exists()
    for version in harness.VLLM_ASCEND_VERSIONS:  # and vllm-ascend itself cannot create the layer
        with pytest.raises(ZeroDivisionError):
            harness.linear_tensors(source, sorted(linear)[0], version=version)


def test_deepseek_v4_adapter_writes_the_16_chunk_w2_bias_and_converts_as_per_channel_v1(produced, converted_exports):
    """msModelSlim itself, on DeepSeek-V4: native names (layers.L.ffn.experts.E.w1|w3|w2), routed experts W4A8
    per channel with w2's scale_bias [out, 16] (the 16 chunk sums, where vllm-ascend's DeepSeek-V4 script writes
    the [out, 1] total), shared experts W8A8; the export converts as the per-channel v1 MoE variant, keeps the
    native names and serves on 0.23 only; QuaRot's optional/quarot.safetensors is copied byte for byte."""
    from safetensors import safe_open

    source, out, _reference, warnings = converted_exports[V4]
    description = json.loads((source / "quant_model_description.json").read_text())
    assert (description["version"], description["group_size"], description["model_quant_type"]) == (
        "1.0.0", 0, "W8A8_DYNAMIC")
    assert description["layers.0.ffn.shared_experts.w2.weight"] == "W8A8_DYNAMIC"
    assert not [name for name in description if name.startswith("mtp.")]
    index = json.loads((source / "quant_model_weights.safetensors.index.json").read_text())["weight_map"]
    config = json.loads((source / "config.json").read_text())
    hidden, inter = config["hidden_size"], config["moe_intermediate_size"]
    assert hidden != inter
    for layer in range(config["num_hidden_layers"]):
        w2 = f"layers.{layer}.ffn.experts.3.w2.scale_bias"
        with safe_open(str(source / index[w2]), framework="pt") as handle:
            assert handle.get_slice(w2).get_shape() == [hidden, 16]
            assert handle.get_slice(w2.replace("w2", "w1")).get_shape() == [inter, 1]
    stamp = NpuReadyCheckpoint.open(out).stamp
    assert {p: (m.variant, tuple(m.projections), m.num_experts, m.hidden, m.intermediate)
            for p, m in stamp.modules.items()} == {
        f"layers.{i}.ffn": ("moe-channel-v1", ("w1", "w3", "w2"), config["n_routed_experts"], hidden, inter)
        for i in range(config["num_hidden_layers"])}
    assert stamp.serving_releases == ("0.23",)
    assert warnings == []
    named = description["optional"]["quarot"]["rotation_map"]["global_rotation"]
    assert named == "optional/quarot.safetensors"
    assert (out / named).read_bytes() == (source / named).read_bytes()
    assert json.loads((out / "quant_model_description.json").read_text())["optional"] == description["optional"]


V4_SERVING_SPLITS = [(1, 1), (2, 1), (4, 1), (1, 2), (1, 4)]


@pytest.mark.parametrize("tp, ep", V4_SERVING_SPLITS, ids=[f"tp{tp}-ep{ep}" for tp, ep in V4_SERVING_SPLITS])
def test_deepseek_v4_output_serves_on_0_23_as_msmodelslim_s_own_export(v4_wheels, converted_exports, tp, ep):
    """On vllm-ascend 0.23's DeepSeek-V4 model (native names, renamed by its own load_weights loop), every rank
    of the converted output loaded through the plugin holds the six tensors the release itself builds from
    msModelSlim's export through its own W4A8_DYNAMIC path."""
    source, out, _reference, _warnings = converted_exports[V4]
    config = json.loads((source / "config.json").read_text())
    spec = replace(DEEPSEEK_V4_SCRIPT, num_experts=config["n_routed_experts"], hidden=config["hidden_size"],
                   intermediate=config["moe_intermediate_size"], moe_layers=config["num_hidden_layers"],
                   mtp_layers=0, model_dtype=config["torch_dtype"])
    for split in checks._rank_splits(tp, ep):
        ours = v4_serving.serve_on_0_23(out, split, plugin_on=True, spec=spec)
        theirs = v4_serving.serve_on_0_23(source, split, plugin_on=False, spec=spec)
        assert len(ours) == spec.moe_layers
        for prefix, layer in ours.items():
            for key in MOE_PARAMS:
                checks.assert_same(getattr(layer, key).data, getattr(theirs[prefix], key).data,
                                   f"{prefix} {split} {key}", bias=key.endswith("scale_bias"))


def test_deepseek_v3_through_the_modelslim_v1_cli_fails_on_transformers_4_57(produced):
    """msModelSlim's DeepSeek-V3 adapter under `msmodelslim quant` stops before quantizing: transformers 4.57's
    DeepSeek-V3 router holds e_score_correction_bias as a buffer, the adapter loads the layer from its
    named_parameters() only, and load_state_dict refuses it. Should a release fix this, this test fails:
    put the export in EXPECTED then."""
    export = produced[V3_MODELSLIM_V1]
    log = export / "msmodelslim-failure.log"
    assert log.is_file(), f"msModelSlim now quantizes DeepSeek-V3 through modelslim_v1: {sorted(export.iterdir())}"
    assert 'Missing key(s) in state_dict: "mlp.gate.e_score_correction_bias"' in log.read_text()
    assert not list(export.glob("*.safetensors"))
