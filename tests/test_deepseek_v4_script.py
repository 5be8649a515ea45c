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
from w4a8conv.api import ConvertOptions, convert, inspect
from w4a8conv.constants import DOWN_BIAS_CHUNKS
from w4a8conv.runtime import NpuReadyCheckpoint
from w4a8conv.synthetic import DEEPSEEK_V4_SCRIPT, write_checkpoint
from w4a8conv.verify import verify

from w4a8conv.layout import MOE_PARAMS
from w4a8conv.runtime import vllm_ascend as plugin

try:
    import test_vllm_plugin as plugin_tests
    import test_vllm_serving_harness as checks
    import vllm_ascend_harness as harness
    import vllm_serving_harness as serving
except ImportError:  # tests/ imported as a package
    from tests import test_vllm_plugin as plugin_tests
    from tests import test_vllm_serving_harness as checks
    from tests import vllm_ascend_harness as harness
    from tests import vllm_serving_harness as serving

wheels = plugin_tests.wheels
no_leftover_modules = checks.no_leftover_modules

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
        if path.is_dir():
            shutil.copytree(path, root / path.name)
            continue
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


def test_converts_keeping_the_source_names(script_source, script_converted):
    ck = NpuReadyCheckpoint.open(script_converted)
    # the sub-directories the script copies from its input (inference/ code) are copied too
    assert (script_converted / "inference" / "model.py").read_bytes() == (script_source / "inference" /
                                                                           "model.py").read_bytes()
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


# --------------------------------------------------------------------------------------------
# Serving the converted output on vllm-ascend 0.23 (tests/vllm_serving_harness.py)

# vLLM builds the model's experts under `model.layers.L.mlp.experts` and the MTP draft model's under its
# own prefix, `mtp.0.mlp.experts`; DeepSeekV4MTP.load_weights loads `mtp.0.` weights into the module at
# `model.layers.0.mtp_block.` of that model.
MTP_LAYER = {"mtp.0.mlp.experts": "model.layers.0.mtp_block.mlp.experts"}  # vLLM prefix -> place in the model
SERVING_SPLITS = [(1, 1), (2, 1), (4, 1), (1, 2)]


def _experts_of(root: Path):
    return ((name, tensor) for name, tensor in serving.weights_from_dir(root) if ".ffn.experts." in name)


def serve_on_0_23(root: Path, split: dict, *, plugin_on: bool, spec=DEEPSEEK_V4_SCRIPT) -> dict[str, torch.nn.Module]:
    """One rank of vllm-ascend 0.23 + vLLM 0.23.0 loading `root` (native names, shapes of `spec`: experts,
    hidden, intermediate, MoE and MTP layers, model dtype) through DeepSeek-V4's own loops,
    AscendDeepseekV4ForCausalLM.load_weights for the model and DeepSeekV4MTP.load_weights for an MTP layer;
    with `plugin_on`, the converted checkpoint through the plugin, else the source through the release's own
    W4A8_DYNAMIC path. Returns the MoE layers by vLLM prefix, post-processed."""
    description = json.loads((root / "quant_model_description.json").read_text())
    main_layers = {f"model.layers.{i}.mlp.experts": f"model.layers.{i}.mlp.experts" for i in range(spec.moe_layers)}
    mtp_layers = MTP_LAYER if spec.mtp_layers else {}
    with serving.ServingEnv(description, model_type="deepseek_v4", release="0.23",
                            params_dtype=getattr(torch, spec.model_dtype), **split) as env:
        if plugin_on:
            plugin.register()
        layers = {prefix: env.moe_layer(prefix, spec.num_experts, spec.hidden, spec.intermediate)
                  for prefix in (*main_layers, *mtp_layers)}
        for prefix, layer in layers.items():
            assert getattr(layer.quant_method.quant_method, "_w4a8conv_scheme", False) is plugin_on, prefix
            checks._scramble(layer)
        models = [env.model({path: layers[prefix] for prefix, path in main_layers.items()})]
        assert models[0].load_weights.__code__.co_filename.endswith("vllm_ascend/models/deepseek_v4.py")
        if mtp_layers:
            models.append(env.model({path: layers[prefix] for prefix, path in mtp_layers.items()}, mtp=True))
            assert models[1].load_weights.__code__.co_filename.endswith("vllm_ascend/models/deepseek_v4_mtp.py")
        loaded = set().union(*(env.load_weights(model, _experts_of(root)) for model in models))
        assert {name.rsplit(".experts.", 1)[0] + ".experts" for name in loaded} == {*main_layers.values(),
                                                                                    *mtp_layers.values()}
        for model in models:
            env.process_weights_after_loading(model)
    return layers


def test_the_stamp_lists_only_the_lines_with_a_deepseek_v4_model(script_converted):
    """vllm-ascend has its own DeepSeek-V4 model from 0.20.2 (0.23 in the plugin's table); 0.11-0.18 have
    none, so the output names 0.23 only, and inspect shows it."""
    assert NpuReadyCheckpoint.open(script_converted).stamp.serving_releases == ("0.23",)
    assert inspect(script_converted)["serving_releases"] == ["0.23"]


@pytest.mark.parametrize("tp, ep", SERVING_SPLITS, ids=[f"tp{tp}-ep{ep}" for tp, ep in SERVING_SPLITS])
def test_the_converted_output_serves_on_0_23_as_the_msmodelslim_form(wheels, script_converted, msmodelslim_form,
                                                                      tp, ep):
    """The output w4a8conv wrote from the script-format source, native names and all (its stamp records
    `layers.L.ffn` and `mtp.0.ffn`), loads through 0.23's DeepSeek-V4 loops on every rank, the MTP layer
    included, and each layer ends with the six tensors vllm-ascend 0.23 holds after loading and
    post-processing the msModelSlim-equivalent source (w2 bias 16-way) through the same loops."""
    assert set(NpuReadyCheckpoint.open(script_converted).stamp.modules) == set(BLOCKS)
    for split in checks._rank_splits(tp, ep):
        ours = serve_on_0_23(script_converted, split, plugin_on=True)
        theirs = serve_on_0_23(msmodelslim_form, split, plugin_on=False)
        for prefix, layer in ours.items():
            for key in MOE_PARAMS:
                checks.assert_same(getattr(layer, key).data, getattr(theirs[prefix], key).data,
                                   f"{prefix} {split} {key}", bias=key.endswith("scale_bias"))
