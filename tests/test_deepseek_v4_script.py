"""vllm-ascend's own DeepSeek-V4 offline script as a source (`examples/quantization/deepseek_v4/quantize.py`,
W4A8 config): native names (`layers.L.ffn.experts.E.w1|w3|w2`, `mtp.0.ffn...`), per-channel "1.0.0" experts,
`model_quant_type` W8A8_DYNAMIC, and a w2 `scale_bias` of shape [out, 1] holding the total 8·Σ q·s where
msModelSlim writes 16 chunk sums. The fixtures follow what the script's source says it writes
(`w4a8conv.synthetic.DEEPSEEK_V4_SCRIPT`); vllm-ascend cannot load the [out, 1] form, so the reference is its
processing of the msModelSlim-equivalent file (same integers and scales, w2 bias 16-way), at every split.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cases import EP_SIZES, TP_SIZES, split_allowed
from robustness_support import assert_clean_failure, assert_nothing_complete, rewrite_tensors, run_main
from test_vllm_ascend_equivalence import MoeWhere, assert_bias_close, assert_ints_equal
from w4a8conv.api import ConvertOptions, convert
from w4a8conv.constants import DOWN_BIAS_CHUNKS
from w4a8conv.runtime import NpuReadyCheckpoint
from w4a8conv.synthetic import DEEPSEEK_V4_SCRIPT, write_checkpoint
from w4a8conv.verify import verify

try:
    import vllm_ascend_harness as harness
except ImportError:  # tests/ imported as a package
    from tests import vllm_ascend_harness as harness

BLOCKS = ["layers.0.ffn", "layers.1.ffn", "mtp.0.ffn"]


def _int4_pairs(packed: torch.Tensor) -> torch.Tensor:
    """msModelSlim's pair packing along the output dimension, undone: row 2j in the low nibble of row j."""
    low = (packed.to(torch.int16) << 12 >> 12)
    high = packed.to(torch.int16) >> 4
    return torch.stack([low, high], dim=1).reshape(2 * packed.shape[0], packed.shape[1])


def _chunk_sums(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float64 8·Σ q·s over the 16 contiguous input chunks: [out, 16]."""
    values = _int4_pairs(weight).double() * scale.double()
    return 8 * values.reshape(values.shape[0], DOWN_BIAS_CHUNKS, -1).sum(dim=2)


@pytest.fixture(scope="module")
def script_source(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("v4") / "src", DEEPSEEK_V4_SCRIPT)


@pytest.fixture(scope="module")
def msmodelslim_form(script_source, tmp_path_factory) -> Path:
    """The same checkpoint with every w2 scale_bias as msModelSlim writes it, [out, 16]."""
    root = tmp_path_factory.mktemp("v4-equivalent") / "src"
    root.mkdir()
    for path in script_source.iterdir():
        if not path.name.endswith(".safetensors"):
            shutil.copy(path, root / path.name)
            continue
        tensors = load_file(str(path))
        for name in [n for n in tensors if n.endswith(".w2.scale_bias")]:
            head = name[: -len("scale_bias")]
            chunks = _chunk_sums(tensors[head + "weight"], tensors[head + "weight_scale"])
            total = tensors[name].double()
            assert torch.allclose(chunks.sum(dim=1, keepdim=True), total, rtol=0, atol=1e-5 * total.abs().max()), name
            tensors[name] = chunks.float()
        save_file(tensors, str(root / path.name), metadata={"format": "pt"})
    return root


@pytest.fixture(scope="module")
def script_converted(script_source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("v4-out") / "npu"
    convert(script_source, out, options=ConvertOptions(workers=1))
    return out


def test_the_fixture_is_in_the_script_format(script_source):
    description = json.loads((script_source / "quant_model_description.json").read_text())
    assert (description["version"], description["group_size"], description["model_quant_type"]) == (
        "1.0.0", 0, "W8A8_DYNAMIC")
    assert (script_source / "quant_model_weights.safetensors.index.json").is_file()
    w2 = [n for n, t in description.items() if n.endswith(".w2.scale_bias")]
    assert {n.split(".ffn.")[0] for n in w2} == {"layers.0", "layers.1", "mtp.0"}
    assert description["layers.0.ffn.shared_experts.w2.weight"] == "W8A8_DYNAMIC"


def test_converts_keeping_the_source_names(script_converted):
    ck = NpuReadyCheckpoint.open(script_converted)
    modules = ck.stamp.modules
    assert sorted(modules) == sorted(BLOCKS)
    assert {m.variant for m in modules.values()} == {"moe-channel-v1-bias-total"}
    assert {tuple(m.projections) for m in modules.values()} == {("w1", "w3", "w2")}
    assert "mtp.0.ffn.experts.3.w2.scale_bias" in ck.tensor_names
    assert ck.tensor("mtp.0.ffn.experts.3.w2.scale_bias").shape == (DEEPSEEK_V4_SCRIPT.hidden, DOWN_BIAS_CHUNKS)


@pytest.mark.parametrize("prefix", BLOCKS)
def test_every_split_equals_vllm_ascend_on_the_msmodelslim_form(vllm_ascend_wheel, script_converted,
                                                                msmodelslim_form, prefix):
    ck = NpuReadyCheckpoint.open(script_converted)
    m = ck.stamp.modules[prefix]
    splits = [(tp, 1) for tp in TP_SIZES] + [(1, ep) for ep in EP_SIZES]
    allowed = [s for s in splits if split_allowed(m.intermediate, m.num_experts, 0, *s)]
    assert len(allowed) == len(splits)
    for tp, ep in allowed:
        for rank in range(max(tp, ep)):
            split = {"tp_size": tp, "tp_rank": rank if tp > 1 else 0, "ep_size": ep, "ep_rank": rank if ep > 1 else 0}
            got = ck.moe_layer(prefix, **split)
            want = harness.moe_rank_tensors(msmodelslim_form, prefix, **split)
            where = MoeWhere(("w1", "w3", "w2"), split["tp_rank"], m.intermediate // tp,
                             split["ep_rank"] * (m.num_experts // ep), 0)
            label = f"{prefix} tp {split['tp_rank']}/{tp} ep {split['ep_rank']}/{ep}"
            for key in ("w13_weight", "w2_weight", "w13_weight_scale", "w2_weight_scale"):
                assert_ints_equal(got[key], want[key], f"{label} {key}", lambda i, k=key, w=where: w(k, i))
            for key in ("w13_scale_bias", "w2_scale_bias"):
                assert_bias_close(got[key], want[key], f"{label} {key}", lambda i, k=key, w=where: w(k, i))


def test_verify_source_all_and_numerics_pass(script_converted, script_source):
    report = verify(script_converted, source=script_source, sample=None, numerics=True)
    assert report.ok, report.problems
    assert {layer.prefix for layer in report.numerics} == set(BLOCKS)


def test_a_total_that_is_not_the_sum_of_the_chunks_is_refused(script_source, tmp_path):
    source = tmp_path / "src"
    shutil.copytree(script_source, source)
    index = json.loads((source / "quant_model_weights.safetensors.index.json").read_text())["weight_map"]
    name = "layers.1.ffn.experts.2.w2.scale_bias"

    def change(tensors):
        tensors[name] = tensors[name].clone()
        tensors[name][5, 0] *= 1.01
    rewrite_tensors(source / index[name], change)
    run = run_main("convert", source, tmp_path / "out", "--workers", "1")
    assert_clean_failure(run, 3, [index[name], name, "scale_bias total", "at [5, 0] is not the sum",
                                  "of the 16 chunk biases recomputed from the weight and weight_scale"])
    if (tmp_path / "out").exists():
        assert_nothing_complete(tmp_path / "out")
