"""CPU emulation of vllm-ascend's A8W4 MoE path (dynamic quant, grouped matmul, swiglu), pure torch.

What it models is the per-group "MSD" kernel of `npu_grouped_matmul` with int4 weights, int8
activations, int64 scales, an fp32 bias and a per-token scale, as vllm-ascend 0.11-0.13 calls it
for W4A8_DYNAMIC experts (`quant_apply_mlp`, the branch taken when a scale bias is present).
Nothing here was checked against an NPU. Each step is tagged in the code:

- EXACT: the integer arithmetic and the identities it rests on (int4 x int4 products summed in
  int32, the split x = 16*xh + xl + 8, adding the fp32 bias);
- ASSUMED: kernel behaviour inferred from source and documentation but not observed (how the
  fixpipe rounds int32*scale to fp16, fp16 accumulation over groups in ascending order, the
  truncation of fp32 scales to their top 19 bits, experts without tokens being skipped, the
  handling of an all-zero token, the precision of the hardware exp in swiglu).

Routing (`route` / `combine`) is device-agnostic torch; `moe_forward` takes the three kernels as
`KernelOps`, so the "npu" backend of `MoELayer` runs the same routing around torch_npu's ops.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..transforms.int4 import unpack_int32_to_int4
from ..transforms.scales import decode_int64_to_fp32

__all__ = [
    "dynamic_quant", "msd_split", "kernel_scale", "grouped_matmul_a8w4", "swiglu", "Routing", "route",
    "combine", "KernelOps", "REFERENCE_OPS", "moe_forward",
]

_QMAX = 127
_FP19_MASK = -(1 << 13)  # 0xFFFFE000 as int32: sign, 8 exponent bits, top 10 mantissa bits


# ---------------------------------------------------------------------------------------------
# the kernels


def dynamic_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric int8 quantization, as `npu_dynamic_quant`: (int8 [M, K], fp32 [M]).

    amax = max |x| per row, q = 127 / amax in fp32, y = int8(rint(x * q)) (half to even),
    scale = amax * fp32(1/127). ASSUMED: a row of zeros (amax 0) gives y = 0 and scale 0 (127/0
    would make 0 * inf = NaN; what the device does there is not documented).
    """
    if x.dim() != 2:
        raise ValueError(f"dynamic_quant expects [M, K], got {tuple(x.shape)}")
    xf = x.to(torch.float32)
    amax = xf.abs().amax(dim=1) if xf.shape[1] else torch.zeros(xf.shape[0])
    nonzero = amax > 0
    q = torch.where(nonzero, torch.tensor(_QMAX, dtype=torch.float32) / torch.where(nonzero, amax, 1.0),
                    torch.zeros((), dtype=torch.float32))
    y = torch.round(xf * q[:, None]).clamp_(-128, 127).to(torch.int8)
    scale = amax * torch.tensor(1.0 / _QMAX, dtype=torch.float32)
    return y, scale


def msd_split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 -> (xh, xl), both int8 in [-8, 7], with x = 16*xh + xl + 8 (EXACT, for all 256 values).

    xh = x >> 4 (arithmetic shift, floor(x / 16)); xl = (x & 0xF) - 8, so x & 0xF = x - 16*xh.
    """
    if x.dtype != torch.int8:
        raise ValueError(f"msd_split expects int8, got {x.dtype}")
    xh = x >> 4
    xl = (x & 0xF) - 8
    return xh, xl.to(torch.int8)


def kernel_scale(scale: torch.Tensor) -> torch.Tensor:
    """int64 encoded scale -> the fp32 value the kernel is assumed to multiply with.

    The low word holds fp32 bits (decoded exactly). ASSUMED: the kernel keeps only the top 19 bits
    (sign, exponent, 10 mantissa bits), truncating. That is a no-op for per-group scales, which
    are fp16-rounded already; a raw per-channel fp32 scale loses up to 2^-10 of its value.
    ASSUMED as well: the high word is ignored (w4a8conv writes it as zero).
    """
    bits = decode_int64_to_fp32(scale).view(torch.int32) & _FP19_MASK
    return bits.view(torch.float32)


def grouped_matmul_a8w4(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                        per_token_scale: torch.Tensor, group_list: torch.Tensor) -> torch.Tensor:
    """Emulate `npu_grouped_matmul` A8W4 (MSD path): bf16 [M, N].

    x int8 [M, K] sorted by expert; weight int32 [E, K, N/8] (int4 packed along N); scale int64
    [E, G, N] (G = K / group_size; per-channel G = 1, the row broadcast over all of K); bias fp32
    [E, N]; per_token_scale fp32 [M]; group_list int [E], the number of rows of each expert (the
    "counts" form, group_list_type=1). Rows past sum(group_list) come out as zeros (on the device
    they are left unwritten).

    Per expert e and per part P in (H: xh, L: xl) of `msd_split`:
        acc_P = sum over groups g, ascending, of fp16( int32(P[:, g] @ W[e, g]) * s[e, g] )   (fp16 adds)
        t = fp32(acc_L) + 16 * fp32(acc_H) + bias[e];  t *= per_token_scale;  y = bf16(t)  (RNE)
    which equals ((x - 8) @ W * s + bias) * per_token_scale up to the roundings, and x @ W * s * pts
    when bias = 8 * sum_k W * s.

    The kernel choice is not modelled: for per-channel weights (G = 1) with many rows per expert
    the device may run a "fake A8W8" kernel (int4 widened to int8, scale cast to bf16) that does
    not add the bias at all. This function always emulates the MSD path.
    """
    if x.dtype != torch.int8 or x.dim() != 2:
        raise ValueError(f"x must be int8 [M, K], got {x.dtype} {tuple(x.shape)}")
    if weight.dtype != torch.int32 or weight.dim() != 3:
        raise ValueError(f"weight must be int32 [E, K, N/8], got {weight.dtype} {tuple(weight.shape)}")
    m, k = x.shape
    experts, k_w, words = weight.shape
    n = words * 8
    if k_w != k:
        raise ValueError(f"x has K={k} but weight has K={k_w}")
    if scale.dtype != torch.int64 or scale.dim() != 3 or scale.shape[0] != experts or scale.shape[2] != n:
        raise ValueError(f"scale must be int64 [{experts}, G, {n}], got {scale.dtype} {tuple(scale.shape)}")
    groups = scale.shape[1]
    if groups < 1 or k % groups:
        raise ValueError(f"K={k} does not split into {groups} scale groups")
    if tuple(bias.shape) != (experts, n):
        raise ValueError(f"bias must be [{experts}, {n}], got {tuple(bias.shape)}")
    if tuple(per_token_scale.shape) != (m,):
        raise ValueError(f"per_token_scale must be [{m}], got {tuple(per_token_scale.shape)}")
    counts = [int(c) for c in group_list.reshape(-1).tolist()]
    if len(counts) != experts:
        raise ValueError(f"group_list has {len(counts)} entries for {experts} experts")
    if any(c < 0 for c in counts) or sum(counts) > m:
        raise ValueError(f"group_list {counts} does not describe the {m} rows of x")

    width = k // groups
    values = unpack_int32_to_int4(weight)            # int8 [E, K, N], EXACT
    s = kernel_scale(scale)                          # fp32 [E, G, N], ASSUMED truncation
    pts = per_token_scale.to(torch.float32)
    bias = bias.to(torch.float32)
    xh, xl = msd_split(x)                            # EXACT: x = 16*xh + xl + 8
    out = torch.zeros(m, n, dtype=torch.bfloat16)
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue  # ASSUMED: an expert without rows is skipped (m <= 0 in the tiling)
        rows = slice(start, start + count)
        w = values[e].to(torch.float64).reshape(groups, width, n)
        acc = []
        for part in (xh[rows], xl[rows]):
            # EXACT: every partial is an integer with |p| <= 64 * K / G < 2^24, so the float64
            # matmul is the int32 matmul and the conversion to fp32 loses nothing.
            partial = torch.matmul(part.to(torch.float64).reshape(count, groups, width).transpose(0, 1), w)
            partial = partial.to(torch.float32)      # [G, count, N]
            # ASSUMED (fixpipe): int32 -> fp32, times the fp32 scale (rounded to fp32), then to fp16 (RNE).
            terms = (partial * s[e].unsqueeze(1)).to(torch.float16)
            # ASSUMED: fp16 accumulation, one rounding per add, groups in ascending order.
            total = terms[0]
            for g in range(1, groups):
                total = total + terms[g]
            acc.append(total)
        high, low = acc
        # EXACT: scaling by 16 is exact; the bias addition is the +8 of the split (8 * sum W * s).
        t = low.to(torch.float32) + 16 * high.to(torch.float32)
        t = t + bias[e]
        t = t * pts[rows, None]
        out[rows] = t.to(torch.bfloat16)             # round to nearest even
        start += count
    return out


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """`npu_swiglu`: a * sigmoid(a) * b with a the first half of the last dimension, b the second.

    Computed in fp32 and returned in x's dtype. The device's exp is not bit-exact, so results can
    differ from this in the last bit of the output dtype.
    """
    if x.shape[-1] % 2:
        raise ValueError(f"swiglu needs an even last dimension, got {x.shape[-1]}")
    a, b = x.to(torch.float32).chunk(2, dim=-1)
    return (a * torch.sigmoid(a) * b).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# routing and the MoE forward


@dataclass(frozen=True)
class Routing:
    """Where a rank's token copies go: sorted by local expert, as the grouped matmul wants them."""

    token: torch.Tensor     # int64 [M]: the token of each sorted copy
    slot: torch.Tensor      # int64 [M]: its index into topk_ids.reshape(-1) (token * k + j)
    counts: torch.Tensor    # int64 [E_local]: copies per local expert, in expert order


def route(topk_ids: torch.Tensor, expert_start: int, local_experts: int) -> Routing:
    """Select the copies routed to experts [expert_start, expert_start + local_experts), sorted by
    expert (stable: token order within an expert). Expert ids are global."""
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be [T, k], got {tuple(topk_ids.shape)}")
    k = topk_ids.shape[1]
    flat = topk_ids.reshape(-1).to(torch.int64)
    local = flat - expert_start
    slot = torch.nonzero((local >= 0) & (local < local_experts), as_tuple=False).reshape(-1)
    expert = local[slot]
    order = torch.sort(expert, stable=True).indices
    slot, expert = slot[order], expert[order]
    counts = torch.zeros(local_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, expert, torch.ones_like(expert))
    return Routing(token=torch.div(slot, k, rounding_mode="floor"), slot=slot, counts=counts)


def combine(expert_out: torch.Tensor, routing: Routing, topk_weights: torch.Tensor, tokens: int) -> torch.Tensor:
    """Weight each copy's output by its routing weight and sum per token in fp32; bf16 [T, H].

    Tokens with no copy on this rank stay zero, so summing the outputs of all EP ranks gives the
    full output. ASSUMED: the serving stack's combine rounds to bf16 once, after the fp32 sum.
    """
    weights = topk_weights.reshape(-1)[routing.slot].to(torch.float32)
    out = torch.zeros(tokens, expert_out.shape[1], dtype=torch.float32, device=expert_out.device)
    out.index_add_(0, routing.token, expert_out.to(torch.float32) * weights[:, None])
    return out.to(torch.bfloat16)


@dataclass(frozen=True)
class KernelOps:
    """The three kernels of the MoE path; `REFERENCE_OPS` are this module's emulations."""

    dynamic_quant: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    grouped_matmul: Callable[..., torch.Tensor]  # (x, weight, scale, bias, per_token_scale, group_list)
    swiglu: Callable[[torch.Tensor], torch.Tensor]


REFERENCE_OPS = KernelOps(dynamic_quant, grouped_matmul_a8w4, swiglu)


def moe_forward(hidden_states: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                w13_weight: torch.Tensor, w13_weight_scale: torch.Tensor, w13_scale_bias: torch.Tensor,
                w2_weight: torch.Tensor, w2_weight_scale: torch.Tensor, w2_scale_bias: torch.Tensor,
                *, expert_start: int = 0, ops: KernelOps = REFERENCE_OPS) -> torch.Tensor:
    """One rank's MoE output, bf16 [T, H], from its tensors as `NpuReadyCheckpoint.moe_layer` returns them.

    hidden_states [T, H]; topk_ids [T, k] global expert ids; topk_weights [T, k]. The rank holds
    experts [expert_start, expert_start + E_local) and, under TP, a slice of the intermediate
    columns with its share of the down_proj bias: its output is a partial sum, and the outputs of
    all ranks add up to the full output (what the all-reduce of the serving stack does).

    route -> dynamic_quant -> gmm(w13, + w13_scale_bias) -> swiglu -> dynamic_quant ->
    gmm(w2, + w2_scale_bias) -> weight by topk_weights, sum over k.
    """
    if hidden_states.dim() != 2 or topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != hidden_states.shape[0]:
        raise ValueError(f"hidden_states [T, H], topk_ids and topk_weights [T, k] expected, got "
                         f"{tuple(hidden_states.shape)}, {tuple(topk_ids.shape)}, {tuple(topk_weights.shape)}")
    tokens = hidden_states.shape[0]
    routing = route(topk_ids, expert_start, w13_weight.shape[0])
    if routing.token.numel() == 0:
        return torch.zeros(tokens, hidden_states.shape[1], dtype=torch.bfloat16, device=hidden_states.device)
    x, pts = ops.dynamic_quant(hidden_states[routing.token])
    h = ops.grouped_matmul(x, w13_weight, w13_weight_scale, w13_scale_bias, pts, routing.counts)
    x2, pts2 = ops.dynamic_quant(ops.swiglu(h))
    y = ops.grouped_matmul(x2, w2_weight, w2_weight_scale, w2_scale_bias, pts2, routing.counts)
    return combine(y, routing, topk_weights, tokens)
