"""compressed-tensors (llm-compressor) sources: reading, converting, and every refusal, on small synthetic
checkpoints written in the format llm-compressor 0.14 writes (tests/test_llmcompressor_tier.py runs the real
producer and compares with vllm-ascend 0.23.0; these tests cover the rules one at a time, fast)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from robustness_support import assert_clean_failure, run_main
from w4a8conv.api import convert, inspect
from w4a8conv.constants import ExitCode
from w4a8conv.runtime import NpuReadyCheckpoint
from w4a8conv.transforms.int4 import unpack_int32_to_int4
from w4a8conv.transforms.scales import decode_int64_to_fp32
from w4a8conv.verify import verify

HIDDEN, INTERMEDIATE, EXPERTS, GROUP = 64, 32, 4, 32
MOE = "model.layers.0.mlp"
ATTENTION = "model.layers.0.self_attn.q_proj"
TOKEN_INT8 = {"dynamic": True, "num_bits": 8, "strategy": "token", "symmetric": True, "type": "int",
              "group_size": None, "actorder": None, "observer": None}


def _weights(bits: int, strategy: str, group_size: int | None) -> dict:
    return {"dynamic": False, "num_bits": bits, "strategy": strategy, "symmetric": True, "type": "int",
            "group_size": group_size, "actorder": None, "observer": "memoryless_minmax"}


def quantization_config(strategy: str = "group") -> dict:
    """What llm-compressor 0.14.0.1 writes for vllm-ascend's example recipe (compressed-tensors 0.19.0)."""
    return {
        "config_groups": {
            "group_0": {"format": "int-quantized", "input_activations": dict(TOKEN_INT8), "output_activations": None,
                        "targets": ["re:.*self_attn.q_proj.*"], "weights": _weights(8, "channel", None)},
            "group_1": {"format": "int-quantized", "input_activations": dict(TOKEN_INT8), "output_activations": None,
                        "targets": ["re:.*down_proj.*", "re:.*gate_proj.*", "re:.*up_proj.*"],
                        "weights": _weights(4, strategy, GROUP if strategy == "group" else None)},
        },
        "format": "int-quantized", "global_compression_ratio": None, "ignore": [f"{MOE}.gate", "lm_head"],
        "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed",
        "sparsity_config": {}, "transform_config": {}, "version": "0.19.0",
    }


def write_source(root: Path, strategy: str = "group", seed: int = 0) -> Path:
    """One MoE layer (4 experts, H 64, I 32) and an int8 q_proj, as llm-compressor stores them."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}

    def quantized(prefix: str, out: int, inp: int, bits: int, per_group: bool) -> None:
        limit = 2 ** (bits - 1)
        values = torch.randint(-limit, limit, (out, inp), generator=gen, dtype=torch.int8)
        values[0, :2] = torch.tensor([-limit, limit - 1], dtype=torch.int8)  # the full range occurs
        columns = inp // GROUP if per_group else 1
        tensors[f"{prefix}.weight"] = values
        tensors[f"{prefix}.weight_scale"] = (torch.rand(out, columns, generator=gen) * 0.01 + 1e-4).bfloat16()

    for e in range(EXPERTS):
        for proj, out, inp in (("gate_proj", INTERMEDIATE, HIDDEN), ("up_proj", INTERMEDIATE, HIDDEN),
                               ("down_proj", HIDDEN, INTERMEDIATE)):
            quantized(f"{MOE}.experts.{e}.{proj}", out, inp, 4, strategy == "group")
    quantized(ATTENTION, HIDDEN, HIDDEN, 8, False)
    tensors[f"{MOE}.gate.weight"] = torch.randn(EXPERTS, HIDDEN, generator=gen).bfloat16()
    tensors["lm_head.weight"] = torch.randn(32, HIDDEN, generator=gen).bfloat16()
    tensors["model.norm.weight"] = torch.ones(HIDDEN).bfloat16()
    root.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "dtype": "bfloat16",
              "hidden_size": HIDDEN, "moe_intermediate_size": INTERMEDIATE, "num_experts": EXPERTS,
              "quantization_config": quantization_config(strategy)}
    (root / "config.json").write_text(json.dumps(config, indent=2))
    return root


def edit_config(root: Path, change) -> None:
    config = json.loads((root / "config.json").read_text())
    change(config["quantization_config"], config)
    (root / "config.json").write_text(json.dumps(config))


def edit_tensors(root: Path, change) -> None:
    tensors = load_file(str(root / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("strategy", ["group", "channel"])
def test_converts_into_the_npu_layout(strategy, tmp_path):
    source = write_source(tmp_path / "src", strategy)
    output = tmp_path / "out"
    convert(source, output)
    info = inspect(source)
    assert info["variants"] == {f"moe-{strategy}-ct": 1} and info["group_size"] == (GROUP if strategy == "group" else 0)
    description = json.loads((output / "quant_model_description.json").read_text())
    stamp = description.pop("w4a8conv")
    assert stamp["source"]["producer"] == "compressed-tensors"
    assert stamp["modules"][MOE]["variant"] == f"moe-{strategy}-ct"
    assert description[f"{MOE}.experts.0.down_proj.weight"] == "W4A8_DYNAMIC_NPU"
    assert description[f"{ATTENTION}.weight_offset"] == "W8A8_DYNAMIC"
    assert description[f"{MOE}.gate.weight"] == description["lm_head.weight"] == "FLOAT"
    assert "quantization_config" not in json.loads((output / "config.json").read_text())
    src = load_file(str(source / "model.safetensors"))
    ckpt = NpuReadyCheckpoint.open(output)
    for e in range(EXPERTS):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            name = f"{MOE}.experts.{e}.{proj}"
            values, scale = src[f"{name}.weight"], src[f"{name}.weight_scale"]
            assert torch.equal(unpack_int32_to_int4(ckpt.tensor(f"{name}.weight")), values.t())
            # the kernel scale is the checkpoint's own bf16 value, widened: no fp16 product
            assert torch.equal(decode_int64_to_fp32(ckpt.tensor(f"{name}.weight_scale")), scale.float().t())
            per_element = scale.float().repeat_interleave(values.shape[1] // scale.shape[1], dim=1)
            expected = 8 * (values.double() * per_element.double()).sum(dim=1)
            got = ckpt.tensor(f"{name}.scale_bias").double()
            got = got.sum(dim=1) if got.dim() == 2 else got
            assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
    translated = ckpt.tensor(f"{ATTENTION}.weight_scale")
    assert translated.dtype == torch.float32 and torch.equal(translated, src[f"{ATTENTION}.weight_scale"].float())
    assert torch.equal(ckpt.tensor(f"{ATTENTION}.weight_offset"), torch.zeros(HIDDEN, 1))
    assert torch.equal(ckpt.tensor(f"{ATTENTION}.weight"), src[f"{ATTENTION}.weight"])
    assert verify(output, source=source, sample=None, numerics=True).ok


def test_a_scale_fp16_cannot_hold_is_kept_exactly(tmp_path):
    """msModelSlim per-group scales are rounded through fp16; compressed-tensors ones are not (vllm-ascend
    0.23 widens the bf16 scale): a bf16 value below fp16's normal range survives unchanged."""
    source = write_source(tmp_path / "src")
    tiny = torch.tensor(2.0 ** -23 * (1 + 2.0 ** -7)).bfloat16()  # exact in bf16, not in fp16 (subnormal there)
    edit_tensors(source, lambda t: t[f"{MOE}.experts.1.up_proj.weight_scale"].__setitem__((3, 1), tiny))
    convert(source, tmp_path / "out")
    scale = NpuReadyCheckpoint.open(tmp_path / "out").tensor(f"{MOE}.experts.1.up_proj.weight_scale")
    assert decode_int64_to_fp32(scale)[1, 3] == tiny.float() != tiny.float().half().float()


def _refused(tmp_path: Path, pieces, *, config=None, tensors=None) -> None:
    source = write_source(tmp_path / "src")
    if config:
        edit_config(source, config)
    if tensors:
        edit_tensors(source, tensors)
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    run = run_main("convert", source, tmp_path / "out")
    assert_clean_failure(run, ExitCode.INVALID_INPUT, pieces)
    assert not (tmp_path / "out" / "quant_model_description.json").exists()
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before


def _experts(args: dict):
    return lambda q, _c: q["config_groups"]["group_1"]["weights"].update(args)


def _expert_acts(args: dict):
    return lambda q, _c: q["config_groups"]["group_1"]["input_activations"].update(args)


CONFIG_REFUSALS = {
    "asymmetric": (_experts({"symmetric": False}), ["group_1.weights.symmetric", "asymmetric"]),
    "static-activations": (_expert_acts({"dynamic": False}), ["input_activations.dynamic", "static activation"]),
    "int2-weights": (_experts({"num_bits": 2}), ["int2 weights", "int4 per channel or per group"]),
    "fp8-weights": (_experts({"type": "float", "num_bits": 8}), ["weights.type", "only integer"]),
    "tensor-strategy": (_experts({"strategy": "tensor"}), ["int4 weights with strategy 'tensor'"]),
    "per-tensor-activations": (_expert_acts({"strategy": "tensor"}), ["strategy 'tensor', expected 'token'"]),
    "int4-activations": (_expert_acts({"num_bits": 4}), ["4-bit activations, expected 8"]),
    "asymmetric-activations": (_expert_acts({"symmetric": False}), ["input_activations.symmetric"]),
    "weight-only": (lambda q, _c: q["config_groups"]["group_1"].update(input_activations=None), ["weight-only"]),
    "actorder": (_experts({"actorder": "group"}), ["activation ordering"]),
    "group-size-missing": (_experts({"group_size": None}), ["group strategy with group_size None"]),
    "pack-quantized": (lambda q, _c: q["config_groups"]["group_1"].update(format="pack-quantized"),
                       ["format 'pack-quantized'"]),
    "kv-cache": (lambda q, _c: q.update(kv_cache_scheme={"num_bits": 8}), ["kv_cache_scheme is set"]),
    "frozen": (lambda q, _c: q.update(quantization_status="frozen"), ["status 'frozen'"]),
    "two-group-sizes": (lambda q, _c: q["config_groups"].update(group_2={
        **q["config_groups"]["group_1"], "targets": ["Linear"], "weights": _weights(4, "group", 16)}),
        ["one group_size per model"]),
    "ignored-but-quantized": (lambda q, _c: q["ignore"].append(ATTENTION), [ATTENTION, "ignore"]),
    "untargeted": (lambda q, _c: q["config_groups"]["group_0"].update(targets=["re:.*k_proj.*"]),
                   [ATTENTION, "no config group targets it"]),
    "mixtral-names": (lambda _q, c: c.update(model_type="mixtral"), ["mixtral loader maps experts named w1/w3/w2"]),
}


@pytest.mark.parametrize("case", sorted(CONFIG_REFUSALS))
def test_config_refusals_name_the_rule(case, tmp_path):
    change, pieces = CONFIG_REFUSALS[case]
    _refused(tmp_path, ["config.json", *pieces], config=change)


def _add(name: str, tensor: torch.Tensor):
    return lambda t: t.__setitem__(name, tensor)


def _set(name: str, index: tuple, value: float):
    def change(tensors):
        tensors[name][index] = value
    return change


EXPERT = f"{MOE}.experts.2.down_proj"
TENSOR_REFUSALS = {
    "zero-point": (_add(f"{EXPERT}.weight_zero_point", torch.zeros(HIDDEN, 1, dtype=torch.int8)),
                   [f"{EXPERT}.weight_zero_point", "asymmetric"]),
    "input-scale": (_add(f"{EXPERT}.input_scale", torch.ones(1)), ["static activation scale"]),
    "fp32-scale": (lambda t: t.__setitem__(f"{EXPERT}.weight_scale", t[f"{EXPERT}.weight_scale"].float()),
                   [f"{EXPERT}.weight_scale", "expected BF16 [64, 1]"]),
    "scale-columns": (_add(f"{EXPERT}.weight_scale", torch.ones(HIDDEN, 2).bfloat16()), ["dtype BF16 shape [64, 2]"]),
    "missing-weight": (lambda t: t.pop(f"{EXPERT}.weight"), [f"{EXPERT}.weight", "missing"]),
    "int4-range": (_set(f"{EXPERT}.weight", (5, 7), 9), [f"{EXPERT}.weight", "int4 value 9"]),
    "negative-scale": (_set(f"{EXPERT}.weight_scale", (1, 0), -0.5), [f"{EXPERT}.weight_scale", "non-negative"]),
    "nan-attention-scale": (_set(f"{ATTENTION}.weight_scale", (3, 0), float("nan")),
                            [f"{ATTENTION}.weight_scale", "not finite"]),
    "missing-expert-scale": (lambda t: t.pop(f"{EXPERT}.weight_scale"), ["down_proj.weight_scale"]),
}


@pytest.mark.parametrize("case", sorted(TENSOR_REFUSALS))
def test_tensor_refusals_name_the_tensor(case, tmp_path):
    change, pieces = TENSOR_REFUSALS[case]
    _refused(tmp_path, pieces, tensors=change)


def test_a_w4a8_linear_layer_is_refused_naming_it(tmp_path):
    """The example's regexes also make a DeepSeek dense MLP / shared expert W4A8, as Linear layers; no release
    serves compressed-tensors W4A8 Linear, so the layer is named and the conversion refused."""
    dense = "model.layers.0.mlp.shared_expert.gate_proj"
    _refused(tmp_path, [dense, "W4A8 Linear layer", "no vllm-ascend release serves"],
             tensors=lambda t: t.update({f"{dense}.weight": torch.zeros(INTERMEDIATE, HIDDEN, dtype=torch.int8),
                                         f"{dense}.weight_scale": torch.ones(INTERMEDIATE, 2).bfloat16()}))
