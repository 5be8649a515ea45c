"""Run in the llm-compressor environment: quantize a saved model data-free and save it compressed.

usage: llmcompressor_quantize.py SRC_DIR OUT_DIR STRATEGY   (STRATEGY: group | channel)

The recipe has the facts of vllm-ascend's example `examples/quantization/llm-compressor/w4a8_dynamic_moe.py`
(v0.23.0): attention int8 weights per channel, experts int4 symmetric (group 128, or per channel as on
vllm-ascend main), both with dynamic per-token int8 activations; lm_head and the router ignored.
"""
import sys

import torch
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
from transformers import AutoModelForCausalLM


def weights(bits: int, strategy: str) -> dict:
    args = {"num_bits": bits, "type": "int", "strategy": strategy, "dynamic": False, "symmetric": True}
    return {**args, "group_size": 128} if strategy == "group" else args


TOKEN_INT8 = {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True, "symmetric": True}


def main(src: str, out: str, strategy: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    modifier = QuantizationModifier(
        ignore=["lm_head", "re:.*mlp.gate$"],
        config_groups={
            "group_0": {"weights": weights(8, "channel"), "input_activations": TOKEN_INT8,
                        "targets": ["re:.*self_attn.k_proj.*", "re:.*self_attn.o_proj.*",
                                    "re:.*self_attn.q_proj.*", "re:.*self_attn.v_proj.*"]},
            "group_1": {"weights": weights(4, strategy), "input_activations": TOKEN_INT8,
                        "targets": ["re:.*down_proj.*", "re:.*gate_proj.*", "re:.*up_proj.*"]},
        })
    oneshot(model=model, recipe=[modifier])
    model.save_pretrained(out, save_compressed=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
