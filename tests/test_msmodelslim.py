"""The producer in the loop: msModelSlim 26.1.0 itself quantizes tiny random models on CPU (every exporter
path: `llm_ptq` with `safe_tensor` and `ascendV1` at group sizes 32 and 64, `msmodelslim quant` with
`ascendv1_saver`), and every export goes through `convert`, vllm-ascend's own post-processing at every split
the shapes allow, `verify --source --all` and `verify --numerics` — or, where no vllm-ascend release can
serve it, is refused with one line and exit 3.

Marker `msmodelslim` (`pytest -m msmodelslim` runs this tier alone). The first run installs msModelSlim into
~/.cache/w4a8conv/producers/ and caches the exports (tests/msmodelslim_producer.py); without the package
index these tests skip, or fail when $CI is set.
"""
from __future__ import annotations

import json
import re
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
from w4a8conv.runtime import NpuReadyCheckpoint
from w4a8conv.verify import verify

try:
    import vllm_ascend_harness as harness
except ImportError:  # tests/ imported as a package
    from tests import vllm_ascend_harness as harness

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
}
CONVERTING = [name for name, (outcome, _) in EXPECTED.items() if outcome == "converts"]
MOE_EXPORTS = [name for name in CONVERTING if not name.startswith("qwen2")]  # Qwen2 is dense


@pytest.fixture(scope="session")
def produced(vllm_ascend_wheel) -> dict[str, Path]:
    try:
        made, _seconds = exports(sorted(EXPECTED))
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
