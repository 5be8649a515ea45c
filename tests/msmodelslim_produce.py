"""Quantize tiny random models with msModelSlim 26.1.0 itself, on CPU. Runs inside the producer environment
(tests/msmodelslim_producer.py builds it), never in the project's: `python msmodelslim_produce.py OUT NAME...`
writes OUT/NAME for every export named in RECIPES.

Models are built with transformers from a config and fixed seeds (random weights, no download); shapes are
non-square (hidden != intermediate) so that a transpose cannot hide, and small enough for every split the
project tests (I / 4 a multiple of the group size for group 32).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import transformers

VOCAB = 256
CALIBRATION_TOKENS = 16


def _qwen3_moe() -> transformers.PretrainedConfig:
    return transformers.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=384, moe_intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=4, num_experts_per_tok=2,
        decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=256, torch_dtype="bfloat16")


def _qwen2() -> transformers.PretrainedConfig:
    return transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, torch_dtype="bfloat16")


def _deepseek_v3() -> transformers.PretrainedConfig:
    # DeepSeek-V3 style: MLA attention, one dense layer, then routed experts plus a shared expert.
    return transformers.DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=384, moe_intermediate_size=128, num_hidden_layers=2,
        first_k_dense_replace=1, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=1,
        topk_group=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=64,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, max_position_embeddings=256,
        rope_scaling=None, torch_dtype="bfloat16")


MODELS = {"qwen3_moe": _qwen3_moe, "qwen2": _qwen2, "deepseek_v3": _deepseek_v3}
# llm_ptq quantizes a DeepSeek model by a per-layer table: routed experts W4A8, the rest (MLA attention,
# the dense and shared-expert MLPs) W8A8_DYNAMIC, as DeepSeek W4A8 deployments are quantized.
MIX = {"deepseek_v3": {"*.mlp.experts.*": "w4a8_dynamic", "*": "w8a8_dynamic"}}
# msModelSlim's model adapter for each family (its `--model_type`)
MODEL_TYPES = {"qwen3_moe": "Qwen3-30B", "qwen2": "Qwen2-7B", "deepseek_v3": "DeepSeek-V3"}

# name -> (model, exporter, options). llm_ptq: (group size, save_type); modelslim_v1: the YAML's W4A8 scope.
RECIPES: dict[str, tuple[str, str, dict]] = {
    "qwen3moe-llmptq-safetensor-g64": ("qwen3_moe", "llm_ptq", {"group_size": 64, "save_type": "safe_tensor"}),
    "qwen3moe-llmptq-safetensor-g32": ("qwen3_moe", "llm_ptq", {"group_size": 32, "save_type": "safe_tensor"}),
    "qwen3moe-llmptq-ascendv1-g64": ("qwen3_moe", "llm_ptq", {"group_size": 64, "save_type": "ascendV1"}),
    "qwen3moe-llmptq-ascendv1-g32": ("qwen3_moe", "llm_ptq", {"group_size": 32, "save_type": "ascendV1"}),
    "qwen2-llmptq-safetensor-g64": ("qwen2", "llm_ptq", {"group_size": 64, "save_type": "safe_tensor"}),
    "qwen2-llmptq-ascendv1-g32": ("qwen2", "llm_ptq", {"group_size": 32, "save_type": "ascendV1"}),
    "deepseekv3-llmptq-ascendv1-g32": ("deepseek_v3", "llm_ptq", {"group_size": 32, "save_type": "ascendV1"}),
    "qwen3moe-modelslimv1": ("qwen3_moe", "modelslim_v1", {"w4a8": "*mlp.experts*", "w8a8": "*self_attn*"}),
    "qwen2-modelslimv1": ("qwen2", "modelslim_v1", {"w4a8": "*mlp*", "w8a8": "*self_attn*"}),
}


def _model(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = MODELS[family]()
    return transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16).eval()


def _save_model(family: str, root: Path) -> None:
    """The float model as a user has it on disk: weights, config and a tokenizer (a word-level one, built here)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    _model(family).save_pretrained(root)
    vocab = {f"t{i}": i for i in range(VOCAB - 3)}
    vocab.update({"<unk>": VOCAB - 3, "<s>": VOCAB - 2, "</s>": VOCAB - 1})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                                         eos_token="</s>", pad_token="</s>").save_pretrained(root)


def _llm_ptq(family: str, out: Path, group_size: int, save_type: str) -> None:
    from msmodelslim.pytorch.llm_ptq.llm_ptq_tools import Calibrator, QuantConfig

    model = _model(family)
    # The router stays float, as msModelSlim's W4A8 examples keep it; everything else Linear is W4A8.
    routers = [name for name, module in model.named_modules()
               if name.endswith("mlp.gate") and isinstance(module, torch.nn.Linear)]
    config = QuantConfig(w_bit=4, a_bit=8, is_dynamic=True, open_outlier=False, is_lowbit=True, group_size=group_size,
                         w_sym=True, dev_type="cpu", mm_tensor=False, disable_names=routers)
    generator = torch.Generator().manual_seed(1)
    calibration = [[torch.randint(0, VOCAB - 3, (1, CALIBRATION_TOKENS), generator=generator)]]
    calibrator = Calibrator(model, config, calib_data=calibration, disable_level="L0", mix_cfg=MIX.get(family))
    calibrator.run()
    calibrator.save(str(out), save_type=[save_type])
    # llm_ptq writes no config.json; a user copies the model's next to the weights (vLLM needs it).
    model.config.to_json_file(out / "config.json")


_QCONFIG = {
    "w8a8": {"act": {"scope": "per_token", "dtype": "int8", "symmetric": True, "method": "minmax"},
             "weight": {"scope": "per_channel", "dtype": "int8", "symmetric": True, "method": "minmax"}},
    # msModelSlim's own W4A8 practice configs ask for group_size 64; its ascendv1_saver writes per-channel
    "w4a8": {"act": {"scope": "per_token", "dtype": "int8", "symmetric": True, "method": "minmax"},
             "weight": {"scope": "per_channel", "dtype": "int4", "symmetric": True, "method": "minmax",
                        "ext": {"group_size": 64}}},
}


def _modelslim_v1(family: str, out: Path, w4a8: str, w8a8: str, work: Path) -> None:
    model_dir = work / f"{family}-float"
    if not model_dir.exists():
        _save_model(family, model_dir)
    recipe = {
        "apiversion": "modelslim_v1",
        "spec": {
            "process": [{"type": "group", "configs": [
                {"type": "linear_quant", "qconfig": _QCONFIG["w8a8"], "include": [w8a8]},
                {"type": "linear_quant", "qconfig": _QCONFIG["w4a8"], "include": [w4a8], "exclude": ["*mlp.gate"]},
            ]}],
            "save": [{"type": "ascendv1_saver", "part_file_size": 4}],
        },
    }
    config_path = work / f"{out.name}.yaml"  # JSON is YAML; msModelSlim wants the .yaml name
    config_path.write_text(json.dumps(recipe))
    cli = Path(sys.executable).with_name("msmodelslim")
    subprocess.run([str(cli), "quant", "--model_type", MODEL_TYPES[family], "--model_path", str(model_dir),
                    "--save_path", str(out), "--device", "cpu", "--config_path", str(config_path),
                    "--trust_remote_code", "False"], check=True)


def main(argv: list[str]) -> None:
    root, names = Path(argv[0]), argv[1:]
    work = root / ".work"
    work.mkdir(parents=True, exist_ok=True)
    for name in names:
        family, exporter, options = RECIPES[name]
        out = root / name
        shutil.rmtree(out, ignore_errors=True)
        if exporter == "llm_ptq":
            _llm_ptq(family, out, **options)
        else:
            _modelslim_v1(family, out, work=work, **options)
    shutil.rmtree(work)


if __name__ == "__main__":
    main(sys.argv[1:])
