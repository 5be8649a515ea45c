"""Run in the transformers 4.57 environment: save a tiny random model as a hub checkpoint would be saved.

usage: make_hub_model.py FAMILY OUT_DIR SEED   (FAMILY: qwen3_moe | mixtral)
Prints the config as JSON. Shapes are chosen so every TP split the tests use (1, 2, 4) and EP 2 load with
group size 128: hidden 256, expert intermediate 512 (non-square experts), 4 experts.
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen3MoeConfig

COMMON = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
              max_position_embeddings=256, tie_word_embeddings=False, torch_dtype="bfloat16")
CONFIGS = {
    "qwen3_moe": lambda: Qwen3MoeConfig(**COMMON, head_dim=64, intermediate_size=768, moe_intermediate_size=512,
                                        num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
                                        mlp_only_layers=[], norm_topk_prob=True),
    "mixtral": lambda: MixtralConfig(**COMMON, intermediate_size=512, num_local_experts=4, num_experts_per_tok=2),
}


def main(family: str, out: str, seed: str) -> None:
    torch.manual_seed(int(seed))
    config = CONFIGS[family]()
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
    with torch.no_grad():  # a checkpoint's spread of magnitudes, not the init's near-constant scales
        for name, param in model.named_parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.02).mul_(torch.rand(param.shape[0], 1, dtype=param.dtype) + 0.5)
    model.save_pretrained(out, safe_serialization=True)
    print(json.dumps(config.to_dict(), default=str))


if __name__ == "__main__":
    main(*sys.argv[1:])
