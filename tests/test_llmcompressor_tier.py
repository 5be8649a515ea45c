"""Real llm-compressor checkpoints: quantized on CPU at test time, converted, compared with vllm-ascend 0.23.0.

The source models are tiny random hub-style checkpoints written by transformers 4.57 (as a hub model is);
llm-compressor 0.14.0.1 (compressed-tensors 0.19.0, transformers 5.x) quantizes them data-free with the
facts of vllm-ascend's example recipe (`tests/producers/llmcompressor_quantize.py`); the compressed-tensors
0.20.0 variant installs that release with --no-deps over llmcompressor's pin. Each producer lives in its
own cached environment (`tests/producer_envs.py`); the quantized checkpoints are cached too, keyed by
the scripts and the environments, so a warm run quantizes nothing.

Marker `llmcompressor`; `pytest -m "not llmcompressor"` leaves the tier out.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import compressed_tensors_harness as harness
from producer_envs import ProducerEnv, ProducerUnavailable, cache_root, ensure_env, locked, run_python
from robustness_support import run_cli
from w4a8conv.api import convert
from w4a8conv.constants import ExitCode
from w4a8conv.layout import MOE_PARAMS
from w4a8conv.runtime import NpuReadyCheckpoint

import test_vllm_plugin as plugin_tests
import test_vllm_serving_harness as checks
import vllm_serving_harness as serving

pytestmark = pytest.mark.llmcompressor
wheels = plugin_tests.wheels

HUB = ProducerEnv("transformers-4.57", ("transformers>=4.57,<4.58",))
LLMCOMPRESSOR = ProducerEnv("llmcompressor-0.14.0.1", ("llmcompressor==0.14.0.1",))
LLMCOMPRESSOR_CT020 = ProducerEnv("llmcompressor-0.14.0.1-ct-0.20.0", (), ("compressed-tensors==0.20.0",),
                                  layered_on=LLMCOMPRESSOR)
SCRIPTS = Path(__file__).parent / "producers"
MAKE_MODEL, QUANTIZE = SCRIPTS / "make_hub_model.py", SCRIPTS / "llmcompressor_quantize.py"

# (family, strategy, environment) of every quantized checkpoint the tier uses.
CHECKPOINTS = {
    "qwen3-group": ("qwen3_moe", "group", LLMCOMPRESSOR),
    "qwen3-channel": ("qwen3_moe", "channel", LLMCOMPRESSOR),
    "qwen3-group-ct020": ("qwen3_moe", "group", LLMCOMPRESSOR_CT020),
    "mixtral-group": ("mixtral", "group", LLMCOMPRESSOR),
}
QWEN3 = ("qwen3-group", "qwen3-channel", "qwen3-group-ct020")
LAYERS = ("model.layers.0.mlp", "model.layers.1.mlp")
SPLITS = [(1, 1), (2, 1), (4, 1), (1, 2)]  # (tp, ep); every rank of each
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def _key(*parts: object) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.read_bytes() if isinstance(part, Path) else json.dumps(part).encode())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def producers() -> dict:
    """name -> python of each producer environment (installed on first use)."""
    try:
        return {spec.name: ensure_env(spec)[0] for spec in (HUB, LLMCOMPRESSOR, LLMCOMPRESSOR_CT020)}
    except ProducerUnavailable as exc:
        pytest.fail(f"the producer environments could not be installed: {exc}")


def _cached_dir(key: str, build) -> Path:
    """A cached fixture directory, built into a temporary sibling and renamed when complete."""
    folder = cache_root() / "fixtures" / key
    with locked(folder.with_name(f".{key}.lock")):
        if not (folder / "config.json").is_file():
            partial = folder.with_name(folder.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            build(partial)
            shutil.rmtree(folder, ignore_errors=True)
            partial.rename(folder)
    return folder


@pytest.fixture(scope="session")
def quantized(producers):
    """name -> a cached llm-compressor checkpoint of CHECKPOINTS[name] (read-only by convention)."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            family, strategy, env = CHECKPOINTS[name]
            hub_key = _key(MAKE_MODEL, HUB.record, family)
            hub = _cached_dir(f"hub-{family}-{hub_key}", lambda out: run_python(
                producers[HUB.name], MAKE_MODEL, family, str(out), "0"))
            made[name] = _cached_dir(f"{name}-{_key(QUANTIZE, env.record, hub_key, strategy)}", lambda out: run_python(
                producers[env.name], QUANTIZE, str(hub), str(out), strategy))
        return made[name]

    return get


@pytest.fixture(scope="session")
def converted_ct(quantized, tmp_path_factory):
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = tmp_path_factory.mktemp(f"ct-{name}") / "npu"
            convert(quantized(name), made[name])
        return made[name]

    return get


def _tensors(root: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(root.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            out.update({name: handle.get_tensor(name) for name in handle.keys()})  # noqa: SIM118
    return out


def test_the_producer_writes_what_the_reader_expects(quantized):
    """The facts the reader relies on, from llm-compressor itself: int-quantized int8 values covering the
    int4 range, bf16 scales, no zero point, attention int8 per channel, the config's two groups."""
    for name in QWEN3:
        root = quantized(name)
        config = json.loads((root / "config.json").read_text())["quantization_config"]
        assert config["quant_method"] == "compressed-tensors" and config["format"] == "int-quantized"
        assert config["version"] == ("0.20.0" if name.endswith("ct020") else "0.19.0")
        assert ("moe_sparsity_config" in config) is name.endswith("ct020")
        tensors = _tensors(root)
        assert not [n for n in tensors if "zero_point" in n or n.endswith("input_scale")]
        expert = tensors["model.layers.0.mlp.experts.0.down_proj.weight"]
        assert expert.dtype == torch.int8 and list(expert.shape) == [256, 512]  # [hidden, intermediate]
        assert expert.min() == -8 and expert.max() == 7
        scale = tensors["model.layers.0.mlp.experts.0.down_proj.weight_scale"]
        assert scale.dtype == torch.bfloat16 and list(scale.shape) == ([256, 4] if "group" in name else [256, 1])
        q = tensors["model.layers.0.self_attn.q_proj.weight"]
        assert q.dtype == torch.int8 and int(q.abs().max()) > 7  # int8, not int4
        assert tensors["model.layers.0.self_attn.q_proj.weight_scale"].shape == (256, 1)


@pytest.mark.parametrize("name", QWEN3)
def test_bit_identical_to_vllm_ascend_0_23_on_every_rank(name, quantized, converted_ct):
    source, ckpt = quantized(name), NpuReadyCheckpoint.open(converted_ct(name))
    compared = 0
    for prefix in LAYERS:
        for tp, ep in SPLITS:
            for rank in range(max(tp, ep)):
                split = dict(tp_size=tp, tp_rank=rank if tp > 1 else 0, ep_size=ep, ep_rank=rank if ep > 1 else 0)
                want = harness.moe_rank_tensors(source, prefix, **split)
                got = ckpt.moe_layer(prefix, **split)
                for key, value in want.items():
                    # 0.23 squeezes the per-channel w13 scale to [E, 2·Ip]; the layout keeps [E, 1, 2·Ip]
                    mine = got[key].reshape(value.shape) if key == "w13_weight_scale" else got[key]
                    assert mine.dtype == value.dtype and mine.shape == value.shape, (key, split)
                    assert torch.equal(mine, value), f"{name} {prefix} {split}: {key} differs from vllm-ascend 0.23.0"
                    compared += 1
    assert compared == len(LAYERS) * sum(max(tp, ep) for tp, ep in SPLITS) * 6


@pytest.mark.parametrize("name", ("qwen3-group", "qwen3-channel"))
def test_attention_through_the_msmodelslim_path_equals_the_compressed_tensors_path(name, quantized, converted_ct):
    """vllm-ascend 0.23.0 serves the int8 attention with one W8A8_DYNAMIC scheme either way: from the
    source through its compressed-tensors config, and from the output through the msModelSlim types."""
    source, output = quantized(name), converted_ct(name)
    description = json.loads((output / "quant_model_description.json").read_text())
    src, out = _tensors(source), _tensors(output)
    for layer in (0, 1):
        for proj in ATTENTION:
            prefix = f"model.layers.{layer}.self_attn.{proj}"
            assert {description[f"{prefix}.{s}"] for s in ("weight", "weight_scale", "weight_offset")} == \
                {"W8A8_DYNAMIC"}
            assert out[f"{prefix}.weight_scale"].dtype == torch.float32
            assert torch.equal(out[f"{prefix}.weight_offset"], torch.zeros(out[f"{prefix}.weight_scale"].shape))
            via_ct = harness.w8a8_linear_tensors({s: src[f"{prefix}.{s}"] for s in ("weight", "weight_scale")},
                                                 source, prefix)
            via_modelslim = harness.w8a8_linear_tensors(
                {s: out[f"{prefix}.{s}"] for s in ("weight", "weight_scale", "weight_offset")})
            assert via_ct["weight_offset"] is None  # never loaded on the compressed-tensors path
            assert torch.equal(via_modelslim["weight_offset"], torch.zeros(via_modelslim["weight_offset"].shape))
            for key in ("weight", "weight_scale", "weight_scale_fp32"):
                assert via_ct[key].dtype == via_modelslim[key].dtype
                assert torch.equal(via_ct[key], via_modelslim[key]), f"{prefix}: {key}"


@pytest.mark.parametrize("name", QWEN3)
def test_config_no_longer_selects_compressed_tensors(name, quantized, converted_ct):
    """The output's config.json has no quantization_config (nor the older compression_config), so vLLM
    takes the method from `--quantization ascend` and the modelslim description; the rest is unchanged."""
    source = json.loads((quantized(name) / "config.json").read_text())
    output = json.loads((converted_ct(name) / "config.json").read_text())
    assert harness.quant_method_for_config(quantized(name), "moe", "model.layers.0.mlp.experts") is not None
    assert "quantization_config" not in output and "compression_config" not in output
    assert output == {k: v for k, v in source.items() if k != "quantization_config"}
    assert harness.quant_method_for_config(converted_ct(name), "moe", "model.layers.0.mlp.experts") is None


@pytest.mark.parametrize("name", QWEN3)
def test_verify_source_numerics_cli(name, quantized, converted_ct):
    result = run_cli("verify", str(converted_ct(name)), "--source", str(quantized(name)), "--all", "--numerics",
                     "--json")
    assert result.returncode == ExitCode.OK, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] and report["worst_relative_error"]["scale"] == 0
    assert report["worst_relative_error"]["bias"] < 1e-5
    assert len(report["numerics"]) == len(LAYERS) and all(layer["ok"] for layer in report["numerics"])


def test_no_release_serves_a_compressed_tensors_w4a8_linear(quantized):
    """The example's regexes make a DeepSeek shared expert / dense MLP W4A8 as a Linear layer. vllm-ascend
    0.23.0's config gives it the msModelSlim W4A8_DYNAMIC Linear scheme, whose parameters have no place for
    llm-compressor's per-group weight_scale: what w4a8conv refuses (tests/test_compressed_tensors.py)."""
    prefix = "model.layers.0.mlp.shared_expert.gate_proj"  # matched by the recipe's re:.*gate_proj.*
    scheme, params = harness.linear_parameters(quantized("qwen3-group"), prefix, 512, 256)
    assert scheme == "AscendW4A8DynamicLinearMethod"
    assert params["weight_scale"][1] == (512, 1) != (512, 256 // 128)  # llm-compressor's [out, in/G]
    assert "weight_scale_second" in params and "weight_offset" in params


def test_mixtral_experts_are_refused_naming_the_loader(quantized, tmp_path):
    """llm-compressor keeps Hugging Face's gate/up/down names for Mixtral; vLLM's Mixtral loader maps w1/w3/w2."""
    source = quantized("mixtral-group")
    assert "model.layers.0.block_sparse_moe.experts.0.gate_proj.weight" in _tensors(source)
    result = run_cli("convert", str(source), str(tmp_path / "out"))
    assert result.returncode == ExitCode.INVALID_INPUT
    assert "vLLM's mixtral loader maps experts named w1/w3/w2" in result.stderr
    assert "model.layers.0.block_sparse_moe.experts.0." in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("release", list(serving.RELEASES))
@pytest.mark.parametrize("name", ("qwen3-group", "qwen3-channel"))
def test_the_plugin_serves_the_output_as_vllm_ascend_0_23_serves_the_source(wheels, name, release, quantized,
                                                                             converted_ct):
    """The same plugin serves a converted compressed-tensors checkpoint on every release line: loaded through
    vLLM's qwen3_moe loop and the release's own modelslim config and W4A8_DYNAMIC scheme
    (tests/vllm_serving_harness.py), every rank at TP 1/2/4 and EP 2 holds what vllm-ascend 0.23.0 builds
    from the llm-compressor source on its compressed-tensors path (docs/serving.md says how the device
    steps differ from each release's own compressed-tensors path, and why the result is the same)."""
    source, output = quantized(name), converted_ct(name)
    for tp, ep in SPLITS:
        for split in checks._rank_splits(tp, ep):
            for prefix, layer in plugin_tests.load_moe(output, split, release=release).items():
                assert prefix.removesuffix(".experts") in LAYERS
                want = harness.moe_rank_tensors(source, prefix.removesuffix(".experts"), **split)
                assert set(want) == set(MOE_PARAMS)
                for key, value in want.items():
                    got = getattr(layer, key).data
                    # the per-channel w13 scale: [E, 1, 2·Ip] up to 0.18, [E, 2·Ip] from 0.20 (each release's)
                    got = got.reshape(value.shape) if key == "w13_weight_scale" else got
                    checks.assert_same(got, value, f"{name} {release} {prefix} {split}: {key}",
                                       bias=key.endswith("scale_bias"))
