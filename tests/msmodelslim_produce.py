"""Quantize tiny random models with msModelSlim 26.1.0 itself, on CPU. Runs inside the producer environment
(tests/msmodelslim_producer.py builds it), never in the project's: `python msmodelslim_produce.py OUT NAME...`
writes OUT/NAME for every export named in RECIPES.

Models are built with transformers from a config and fixed seeds (random weights, no download); shapes are
non-square (hidden != intermediate) so that a transpose cannot hide, and small enough for every split the
project tests (I / 4 a multiple of the group size for group 32).

DeepSeek-V4 has no transformers model: msModelSlim's adapter builds its own (`msmodelslim.model.deepseek_v4.
model.Transformer`) from ten config.json keys, every other hyperparameter at the adapter's default (a
129280-token vocabulary, 512-wide heads, four hyper-connection streams, the first three layers hash-routed),
so the tiny model is that class with small values for those ten keys, and is quantized by the modelslim_v1
CLI with msModelSlim's own DeepSeek-V4-Pro W4A8 practice (QuaRot, flex AWQ-SSZ, flex smooth quant, experts
W4A8, attention and shared experts W8A8), its calibration set swapped for two short prompts of the tiny
tokenizer's words (the shipped 48 long prompts take 10 minutes on 2 cores and are all <unk> to it). What
cannot run on CPU, and so is not in the model:
- MTP layers: the adapter's MTP calibration (`mtp_preprocess`) moves the norm, head and embedding modules
  with `module.to('npu')`; the model has `n_mtp_layers` 0 and no `mtp.*` weights, so it has none.
- compress ratios 4 and 128: they add the Compressor (and at 4 the Indexer), whose Linear weights the model
  keeps in fp32; the practice's flex smooth quant search multiplies the bf16 activations by them and fails
  ("expected m1 and m2 to have the same dtype, but got: c10::BFloat16 != float"). Both layers use ratio 0,
  which the adapter reads as 1 (sliding-window attention only).
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
# DeepSeek-V4: the config.json keys msModelSlim's adapter reads (its _get_args_mapping: ModelArgs field ->
# key); hidden 256 != moe_intermediate 128; 8 experts, since the adapter's default activates 6 per token.
DEEPSEEK_V4_CONFIG = {"hidden_size": 256, "moe_intermediate_size": 128, "index_topk": 16, "n_routed_experts": 8,
                      "num_attention_heads": 2, "num_hidden_layers": 2, "o_groups": 2, "q_lora_rank": 64,
                      "routed_scaling_factor": 1.5, "compress_ratios": [0, 0]}
DEEPSEEK_V4_ARGS = {"dim": "hidden_size", "moe_inter_dim": "moe_intermediate_size", "index_topk": "index_topk",
                    "n_routed_experts": "n_routed_experts", "n_heads": "num_attention_heads",
                    "num_hidden_layers": "num_hidden_layers", "o_groups": "o_groups", "q_lora_rank": "q_lora_rank",
                    "route_scale": "routed_scaling_factor", "compress_ratios": "compress_ratios"}
# llm_ptq quantizes a DeepSeek model by a per-layer table: routed experts W4A8, the rest (MLA attention,
# the dense and shared-expert MLPs) W8A8_DYNAMIC, as DeepSeek W4A8 deployments are quantized.
MIX = {"deepseek_v3": {"*.mlp.experts.*": "w4a8_dynamic", "*": "w8a8_dynamic"}}
# msModelSlim's model adapter for each family (its `--model_type`)
MODEL_TYPES = {"qwen3_moe": "Qwen3-30B", "qwen2": "Qwen2-7B", "deepseek_v3": "DeepSeek-V3",
               "deepseek_v4": "DeepSeek-V4-Pro"}

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
    # fails on transformers 4.57 (EXPECTED_FAILURES)
    "deepseekv3-modelslimv1": ("deepseek_v3", "modelslim_v1", {"w4a8": "*mlp.experts*", "w8a8": "*self_attn*",
                                                               "index": True}),
    # msModelSlim's own practice file (lab_practice/), as `--quant_type w4a8` picks it for DeepSeek-V4-Pro
    "deepseekv4-modelslimv1-practice-w4a8": ("deepseek_v4", "practice",
                                             {"practice": "deepseek_v4/deepseek_v4_pro_w4a8.yaml"}),
}


def _model(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = MODELS[family]()
    return transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16).eval()


def _save_deepseek_v4(_family: str, root: Path, seed: int = 0) -> None:
    """msModelSlim's DeepSeek-V4 model with random weights, saved as its adapter loads one: the parameters
    under their own names in model.safetensors with an index, and the config keys the adapter reads."""
    from safetensors.torch import save_file
    from msmodelslim.model.deepseek_v4.model import ModelArgs, Transformer

    args = ModelArgs()
    for field, key in DEEPSEEK_V4_ARGS.items():
        setattr(args, field, DEEPSEEK_V4_CONFIG[key])
    args.compress_ratios = [1 if r == 0 else r for r in args.compress_ratios]  # as the adapter reads them
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # as the adapter builds it
    try:
        model = Transformer(args)
    finally:
        torch.set_default_dtype(default)
    tensors = {}
    for name, p in model.state_dict().items():  # torch.empty in the model: fill every parameter
        if not p.is_floating_point():  # the hash layers' token -> expert table
            tensors[name] = torch.randint(0, args.n_routed_experts, p.shape, dtype=p.dtype)
        elif name.endswith(("norm.weight", "_scale")):
            tensors[name] = torch.ones(p.shape, dtype=p.dtype)
        elif name.endswith(("_base", "attn_sink", ".bias")):
            tensors[name] = torch.zeros(p.shape, dtype=p.dtype)
        else:
            tensors[name] = (torch.randn(p.shape) * 0.02).to(p.dtype)
    root.mkdir(parents=True)
    save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})
    (root / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {name: "model.safetensors" for name in tensors}}))
    (root / "config.json").write_text(json.dumps({"model_type": "deepseek_v4", "torch_dtype": "bfloat16",
                                                  "vocab_size": args.vocab_size, **DEEPSEEK_V4_CONFIG}))
    _save_tokenizer(root)


def _save_transformers_model(family: str, root: Path) -> None:
    _model(family).save_pretrained(root)
    _save_tokenizer(root)


def _save_model(family: str, root: Path) -> None:
    """The float model as a user has it on disk: weights, config and a tokenizer (a word-level one, built here)."""
    SAVERS.get(family, _save_transformers_model)(family, root)


def _save_tokenizer(root: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

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


def _modelslim_v1(family: str, out: Path, w4a8: str, w8a8: str, work: Path, index: bool = False) -> None:
    model_dir = work / f"{family}-float"
    if not model_dir.exists():
        _save_model(family, model_dir)
    if index:  # the DeepSeek-V3 adapter reads model.safetensors.index.json, which save_pretrained writes only for shards
        from safetensors import safe_open

        with safe_open(str(model_dir / "model.safetensors"), framework="pt") as handle:
            names = list(handle.keys())
        (model_dir / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {name: "model.safetensors" for name in names}}))
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
    _quant(family, model_dir, out, config_path)


def _practice(family: str, out: Path, practice: str, work: Path) -> None:
    """The modelslim_v1 CLI with one of msModelSlim's own practice files, read from the installed package;
    only its calibration set is replaced (two prompts of the tiny tokenizer's words)."""
    import msmodelslim
    import yaml

    model_dir = work / f"{family}-float"
    if not model_dir.exists():
        _save_model(family, model_dir)
    recipe = yaml.safe_load((Path(msmodelslim.__file__).parent / "lab_practice" / practice).read_text())
    generator = torch.Generator().manual_seed(1)
    calibration = work / f"{out.name}-calibration.jsonl"
    calibration.write_text("".join(json.dumps({"inputs_pretokenized": " ".join(
        f"t{int(i)}" for i in torch.randint(0, VOCAB - 3, (CALIBRATION_TOKENS,), generator=generator))}) + "\n"
        for _ in range(2)))
    recipe["spec"]["dataset"] = str(calibration)
    config_path = work / f"{out.name}.yaml"
    config_path.write_text(json.dumps(recipe))
    _quant(family, model_dir, out, config_path)


def _quant(family: str, model_dir: Path, out: Path, config_path: Path) -> None:
    cli = Path(sys.executable).with_name("msmodelslim")
    done = subprocess.run([str(cli), "quant", "--model_type", MODEL_TYPES[family], "--model_path", str(model_dir),
                           "--save_path", str(out), "--device", "cpu", "--config_path", str(config_path),
                           "--trust_remote_code", "False"], capture_output=True, text=True, check=False)
    if done.returncode:
        raise QuantFailed(done.stdout + done.stderr)


class QuantFailed(RuntimeError):
    """`msmodelslim quant` exited non-zero; the argument is its output."""


SAVERS = {"deepseek_v4": _save_deepseek_v4}  # families that are no transformers model
EXPORTERS = {"llm_ptq": lambda family, out, work, **options: _llm_ptq(family, out, **options),
             "modelslim_v1": lambda family, out, work, **options: _modelslim_v1(family, out, work=work, **options),
             "practice": lambda family, out, work, **options: _practice(family, out, work=work, **options)}


# Recipes msModelSlim 26.1.0 cannot carry out here: their output is FAILURE_LOG, msModelSlim's own output,
# which the tier checks for the known cause.
EXPECTED_FAILURES = {"deepseekv3-modelslimv1"}
FAILURE_LOG = "msmodelslim-failure.log"


def main(argv: list[str]) -> None:
    root, names = Path(argv[0]), argv[1:]
    work = root / ".work"
    work.mkdir(parents=True, exist_ok=True)
    for name in names:
        family, exporter, options = RECIPES[name]
        out = root / name
        shutil.rmtree(out, ignore_errors=True)
        try:
            EXPORTERS[exporter](family, out, work, **options)
        except QuantFailed as exc:
            if name not in EXPECTED_FAILURES:
                raise SystemExit(f"msmodelslim quant failed for {name}:\n{str(exc)[-4000:]}") from None
            out.mkdir(parents=True, exist_ok=True)
            (out / FAILURE_LOG).write_text(str(exc))
    shutil.rmtree(work)


if __name__ == "__main__":
    main(sys.argv[1:])
