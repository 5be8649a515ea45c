"""Names, dtypes and shapes of the converted tensors (layout version 2), and of the parameters vLLM
builds from them: the one place the plan, the runtime, the plugin and `verify` take them from. See
docs/format.md."""
from __future__ import annotations

from dataclasses import dataclass

from .constants import DOWN_BIAS_CHUNKS, INT4_PER_INT32

__all__ = ["MOE_OUTPUTS", "LINEAR_BIAS_NAMES", "MOE_PARAMS", "MoeParam", "TensorSpec", "expert_tensor_specs",
           "moe_tensor_specs", "linear_tensor_specs", "moe_param_specs"]

MOE_OUTPUTS = ("weight", "weight_scale", "scale_bias")
# vllm-ascend names a W4A8 Linear layer's bias by the source's version: "0" and "1.0.0"
LINEAR_BIAS_NAMES = ("weight_scale_bias", "scale_bias")

TensorSpec = tuple[str, tuple[int, ...]]  # (safetensors dtype, shape)


def expert_tensor_specs(prefix: str, expert: int, proj: str, is_down: bool, hidden: int, intermediate: int,
                        group_size: int) -> dict[str, tuple[str, TensorSpec]]:
    """output -> (tensor name, (dtype, shape)) of one expert projection, in kernel orientation [in, out].

    Names are the source's, so a serving stack routes them as it routes the source's experts.
    """
    out, inp = (hidden, intermediate) if is_down else (intermediate, hidden)
    groups = inp // group_size if group_size else 1
    shapes = {
        "weight": ("I32", (inp, out // INT4_PER_INT32)),
        "weight_scale": ("I64", (groups, out)),
        "scale_bias": ("F32", (out, DOWN_BIAS_CHUNKS) if is_down else (out,)),
    }
    return {output: (f"{prefix}.experts.{expert}.{proj}.{output}", shapes[output]) for output in MOE_OUTPUTS}


def moe_tensor_specs(prefix: str, projections: tuple[str, str, str] | list[str], num_experts: int, hidden: int,
                     intermediate: int, group_size: int) -> dict[tuple[int, str, str], tuple[str, TensorSpec]]:
    """(expert, projection, output) -> (tensor name, (dtype, shape)) for one MoE layer."""
    return {(e, proj, output): spec
            for e in range(num_experts) for proj in projections
            for output, spec in expert_tensor_specs(prefix, e, proj, proj == projections[2], hidden, intermediate,
                                                    group_size).items()}


def linear_tensor_specs(prefix: str, out_features: int, in_features: int, group_size: int,
                        bias_name: str, bias_columns: int) -> dict[str, tuple[str, TensorSpec]]:
    """vllm-ascend parameter name -> (tensor name, (dtype, shape)) for one W4A8 Linear layer."""
    bias = (out_features,) if bias_columns == 1 else (out_features, bias_columns)
    return {
        "weight": (f"{prefix}.weight", ("I32", (in_features, out_features // INT4_PER_INT32))),
        "weight_scale_second": (f"{prefix}.weight_scale_second", ("F32", (in_features // group_size, out_features))),
        bias_name: (f"{prefix}.{bias_name}", ("F32", bias)),
    }


@dataclass(frozen=True)
class MoeParam:
    """One of vLLM's FusedMoE parameters: per expert, one stored output of the gate and up projections
    side by side (w13: gate's columns, then up's) or of the down projection (w2)."""

    output: str  # one of MOE_OUTPUTS
    down: bool


MOE_PARAMS: dict[str, MoeParam] = {
    "w13_weight": MoeParam("weight", False), "w2_weight": MoeParam("weight", True),
    "w13_weight_scale": MoeParam("weight_scale", False), "w2_weight_scale": MoeParam("weight_scale", True),
    "w13_scale_bias": MoeParam("scale_bias", False), "w2_scale_bias": MoeParam("scale_bias", True),
}


def moe_param_specs(experts: int, hidden: int, intermediate: int, group_size: int) -> dict[str, TensorSpec]:
    """vLLM parameter -> (dtype, shape) of one rank's MoE experts, as vllm-ascend 0.11 holds them after
    `process_weights_after_loading`: `experts` the rank's, `intermediate` its share Ip of the layer's;
    w2_scale_bias is the rank's partial sum of the down_proj bias chunks. A serving release that holds
    one differently says so in its own table (runtime/vllm_ascend.py `RELEASES`)."""
    e, h, ip = experts, hidden, intermediate
    return {
        "w13_weight": ("I32", (e, h, 2 * ip // INT4_PER_INT32)),
        "w2_weight": ("I32", (e, ip, h // INT4_PER_INT32)),
        "w13_weight_scale": ("I64", (e, h // group_size if group_size else 1, 2 * ip)),
        "w2_weight_scale": ("I64", (e, ip // group_size if group_size else 1, h)),
        "w13_scale_bias": ("F32", (e, 2 * ip)),
        "w2_scale_bias": ("F32", (e, h)),
    }
