"""Numerics of a converted MoE layer: the reference backend against an fp32 forward of the source.

For a sampled MoE layer, Gaussian hidden states are routed to a few of its experts and run twice:
through `MoELayer` (backend "reference", the CPU emulation of the A8W4 kernels) on the converted
tensors, and through an fp32 forward of the *source* checkpoint (int4 values times the per-group
and per-channel scales, fp32 matmuls, exact swiglu, no activation quantization). The relative error
‖y − y_fp32‖/‖y_fp32‖ must stay within the bound derived in docs/architecture.md ("Runtime reference
backend") and `tests/test_reference_backend.py` `test_bound_derivation`:

    bound = (γ·c1 + c2)/254 + fp_budget(G1 + G2)

with c1, c2 the rms crest factors of the two quantized activations (hidden states, swiglu output),
γ the gain of swiglu on a relative perturbation, all computed here on the actual inputs, and
G1 + G2 the scale groups of the two matmuls. A wrong bias, scale or nibble order gives errors of
24–240 % on the synthetic presets against bounds of 7–8 %.

W4A8 Linear layers (dense MLPs, shared experts, attention) run as A16W4 in vllm-ascend
(`npu_weight_quant_batchmatmul`: weight-only antiquant, the activations unquantized); `check_linear`
emulates that on the converted `weight` and antiquant scale and compares with the fp32 product of the
source, against a bound from the model dtype's unit roundoff u and the inputs' cancellation ratio
ρ = ‖|x|·|W|‖/‖x·W‖ (`linear_bound`).

Only the experts that the check routes to are read: a layer with more than `max_experts` experts
is read as one expert-parallel slice of at most that many (the same slicing a serving rank uses),
so a 256-expert layer costs a few experts' fp32 weights, not the layer's.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .constants import GroupSizeFrom
from .errors import InvalidCheckpointError, UsageError
from .plan import natural_key
from .runtime import MoELayer, NpuReadyCheckpoint
from .source import SourceCheckpoint, TensorReader, open_source
from .source.checkpoint import MODEL_DTYPES
from .stamp import LinearRecord, MoeRecord
from .transforms.int4 import unpack_int32_to_int4
from .transforms.linear import LINEAR_SPECS
from .transforms.moe import MOE_SPECS

__all__ = [
    "U16", "BF16", "fp_budget", "error_bound", "relative_error", "crest", "swiglu_gain", "make_inputs",
    "dequantized_experts", "Fp32Forward", "fp32_forward", "LayerNumerics", "check_layer", "check_numerics",
    "open_matching_source", "LinearNumerics", "a16w4_linear", "linear_bound", "linear_numerics", "check_linear",
    "UNIT_ROUNDOFF",
]

U16, BF16 = 2.0 ** -11, 2.0 ** -9   # unit roundoff of fp16 and bf16 (round to nearest)
_SCALE_ROUNDING = 2.0 ** -10         # fp16-rounded per-group scale, or the kernel's 19-bit per-channel scale
_BF16_SCALE_BIAS = 2.0 ** -8         # msModelSlim's "1.0.0" bias from bf16-cast scales (two roundings)
_QUANT_STEPS = 254                   # 2·127: an int8 rounding moves an element by at most amax/254
UNIT_ROUNDOFF = {torch.bfloat16: BF16, torch.float16: U16, torch.float32: 2.0 ** -24}


def fp_budget(groups: int) -> float:
    """Floating-point part of the bound, relative: per matmul the scale rounding and the bias's
    bf16 scales, one fp16 rounding per group partial and per add (`groups` = G1 + G2 over both
    matmuls, plus one each), and four bf16 roundings (gmm1, swiglu, gmm2, combine outputs)."""
    return 2 * _SCALE_ROUNDING + 2 * _BF16_SCALE_BIAS + (groups + 2) * U16 + 4 * BF16


def error_bound(c1: float, c2: float, gamma: float, groups: int) -> float:
    """First-order bound on ‖y_ref − y_fp32‖/‖y_fp32‖: the two int8 quantizations (c1 propagated
    through swiglu with gain γ, c2 directly) plus `fp_budget(groups)`."""
    return (gamma * c1 + c2) / _QUANT_STEPS + fp_budget(groups)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖/‖want‖ (Frobenius) in float64."""
    return float((got.double() - want.double()).norm() / want.double().norm())


def crest(z: torch.Tensor) -> float:
    """√(n·Σ_t amax_t²)/‖z‖ of z [T, n]: per-row int8 quantization moves z by at most crest/254 relatively."""
    return float((z.shape[1] * z.abs().amax(dim=1).pow(2).sum()).sqrt() / z.norm())


def swiglu_gain(a: torch.Tensor, b: torch.Tensor) -> float:
    """γ of silu(a)·b for a, b [M, I]: the relative error of the output for relative perturbations
    of a and b of size ρ spread like a and b, divided by ρ (first order)."""
    s = torch.sigmoid(a)
    silu, dsilu = a * s, s * (1 + a * (1 - s))
    num = (a.pow(2).mean(dim=1, keepdim=True) * dsilu.pow(2) * b.pow(2)
           + b.pow(2).mean(dim=1, keepdim=True) * silu.pow(2)).sum()
    return float((num / (silu * b).pow(2).sum()).sqrt())


def make_inputs(hidden: int, experts: int, *, tokens: int = 64, top_k: int = 2, seed: int = 0,
                expert_start: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bf16 N(0, 1) hidden states [T, H], `top_k` distinct random experts per token among
    [expert_start, expert_start + experts) as int64 [T, k], softmax routing weights fp32 [T, k]."""
    if not 1 <= top_k <= experts:
        raise UsageError(f"top_k {top_k} must be between 1 and the {experts} experts routed to")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16)
    ids = torch.rand(tokens, experts, generator=gen).argsort(dim=1)[:, :top_k] + expert_start
    weights = torch.softmax(torch.randn(tokens, top_k, generator=gen), dim=1)
    return x, ids, weights


def dequantized_experts(src: SourceCheckpoint, reader: TensorReader, prefix: str, record: MoeRecord,
                        experts: range) -> dict[str, torch.Tensor]:
    """proj -> fp32 [len(experts), out, in] from the source: int4 values × weight_scale_second
    (per group) × weight_scale, for the MoE layer `prefix` described by its stamp `record`."""
    spec = MOE_SPECS[record.variant]
    weights = {}
    for proj in record.projections:
        stacked = []
        for e in experts:
            base = f"{prefix}.experts.{e}.{proj}."
            parts = {s: reader.load(src.tensors[base + s]) for s in ("weight", *spec.scales.shapes(1, 1, 1))}
            w = spec.int4_values(parts["weight"]).to(torch.float32)
            channel, second = spec.scales.factors(parts)
            if second is not None:
                out, inp = w.shape
                groups = second.shape[1]
                w = (w.reshape(out, groups, inp // groups) * second[:, :, None]).reshape(out, inp)
            stacked.append(w * channel.reshape(-1, 1))
        weights[proj] = torch.stack(stacked)
    return weights


@dataclass
class Fp32Forward:
    """The fp32 source forward and the intermediates the bound needs."""

    y: torch.Tensor   # [T, H] output
    a: torch.Tensor   # [M, I] gate pre-activations of every routed copy (M = copies)
    b: torch.Tensor   # [M, I] up pre-activations
    z: torch.Tensor   # [M, I] swiglu output silu(a)·b


def fp32_forward(weights: dict[str, torch.Tensor], projections, x: torch.Tensor, ids: torch.Tensor,
                 topk_weights: torch.Tensor, *, expert_start: int = 0) -> Fp32Forward:
    """The MoE in fp32 without activation quantization: x [T, H], ids [T, k] global expert ids
    (each in [expert_start, expert_start + E)), topk_weights [T, k]; `weights` as
    `dequantized_experts` returns them (proj -> [E, out, in]), `projections` (gate, up, down)."""
    gate, up, down = (weights[p] for p in projections)
    xf = x.to(torch.float32)
    y = torch.zeros(xf.shape)
    a_all, b_all, z_all = [], [], []
    for e in range(gate.shape[0]):
        token, j = torch.nonzero(ids == expert_start + e, as_tuple=True)
        if not len(token):
            continue
        a, b = xf[token] @ gate[e].T, xf[token] @ up[e].T
        z = torch.nn.functional.silu(a) * b
        y.index_add_(0, token, (z @ down[e].T) * topk_weights[token, j, None].to(torch.float32))
        a_all.append(a), b_all.append(b), z_all.append(z)
    return Fp32Forward(y, torch.cat(a_all), torch.cat(b_all), torch.cat(z_all))


@dataclass(frozen=True)
class LayerNumerics:
    """One layer's check: the reference backend's relative error against the fp32 source forward."""

    prefix: str
    expert_start: int   # the experts routed to: [expert_start, expert_start + experts)
    experts: int
    tokens: int
    top_k: int
    c1: float           # crest factor of the hidden states
    c2: float           # crest factor of the swiglu output (fp32 reference)
    gamma: float        # swiglu gain (fp32 reference)
    groups: int         # scale groups of gmm1 + gmm2
    error: float
    bound: float

    @property
    def ok(self) -> bool:
        return self.error <= self.bound  # False for a NaN error as well

    def as_dict(self) -> dict:
        return {**asdict(self), "kind": "moe", "ok": self.ok}

    @property
    def inputs(self) -> str:
        return (f"experts [{self.expert_start}, {self.expert_start + self.experts}), {self.tokens} tokens, "
                f"top-{self.top_k}")

    def problem(self) -> str:
        return (f"{self.prefix}: the reference forward differs from the fp32 forward of the source by "
                f"{self.error:.2%}, above its bound {self.bound:.2%} (c1 {self.c1:.2f}, c2 {self.c2:.2f}, "
                f"γ {self.gamma:.2f}, {self.groups} scale groups; experts [{self.expert_start}, "
                f"{self.expert_start + self.experts}), {self.tokens} tokens, top-{self.top_k})")


def _expert_parallel_slice(num_experts: int, max_experts: int) -> int:
    """The smallest EP size whose ranks hold at most `max_experts` experts."""
    return next(ep for ep in range(1, num_experts + 1) if num_experts % ep == 0 and num_experts // ep <= max_experts)


def check_layer(ckpt: NpuReadyCheckpoint, src: SourceCheckpoint, reader: TensorReader, prefix: str, *,
                tokens: int = 64, top_k: int = 2, max_experts: int = 8, seed: int = 0,
                backend: str = "reference") -> LayerNumerics:
    """Run one MoE layer both ways and compute its error and bound (see the module docstring).

    `backend` is `MoELayer`'s: "npu" runs the same check on torch_npu's kernels (`selfcheck`)."""
    record = ckpt.stamp.records(MoeRecord)[prefix]
    num_experts = record.num_experts
    ep_size = _expert_parallel_slice(num_experts, max_experts)
    ep_rank = random.Random(f"{seed}:{prefix}").randrange(ep_size)
    local = num_experts // ep_size
    start = ep_rank * local
    x, ids, weights = make_inputs(record.hidden, local, tokens=tokens, top_k=top_k, seed=seed, expert_start=start)
    ref = fp32_forward(dequantized_experts(src, reader, prefix, record, range(start, start + local)),
                       record.projections, x, ids, weights, expert_start=start)
    layer = MoELayer.from_checkpoint(ckpt, prefix, ep_size=ep_size, ep_rank=ep_rank, backend=backend)
    device = layer.w13_weight.device
    error = relative_error(layer(x.to(device), ids.to(device), weights.to(device)).cpu(), ref.y)
    group = record.group_size
    hidden, intermediate = record.hidden, record.intermediate
    groups = hidden // (group or hidden) + intermediate // (group or intermediate)
    c1, c2, gamma = crest(x.to(torch.float32)), crest(ref.z), swiglu_gain(ref.a, ref.b)
    return LayerNumerics(prefix, start, local, tokens, top_k, c1, c2, gamma, groups, error,
                         error_bound(c1, c2, gamma, groups))


@dataclass(frozen=True)
class LinearNumerics:
    """One W4A8 Linear layer: the emulated A16W4 forward against the fp32 source product."""

    prefix: str
    tokens: int
    rho: float      # ‖|x|·|W|‖/‖x·W‖ of the fp32 source product: how much the rounding errors can add up
    error: float
    bound: float

    @property
    def ok(self) -> bool:
        return self.error <= self.bound  # False for a NaN error as well

    def as_dict(self) -> dict:
        return {**asdict(self), "kind": "linear", "ok": self.ok}

    @property
    def inputs(self) -> str:
        return f"A16W4 Linear, {self.tokens} tokens"

    def problem(self) -> str:
        return (f"{self.prefix}: the A16W4 forward of the converted layer differs from the fp32 product of the "
                f"source by {self.error:.2%}, above its bound {self.bound:.2%} (ρ {self.rho:.2f}, {self.tokens} "
                f"tokens)")


def a16w4_linear(x: torch.Tensor, weight: torch.Tensor, antiquant: torch.Tensor) -> torch.Tensor:
    """What `npu_weight_quant_batchmatmul(x, weight, antiquant_scale=antiquant.to(x.dtype),
    antiquant_group_size=G)` computes, emulated: x [T, K] in the model dtype, weight int32 [K, N/8],
    antiquant fp32 [K/G, N]; each weight becomes int4 · scale in x's dtype, products accumulate in fp32,
    the output is rounded to x's dtype."""
    values = unpack_int32_to_int4(weight).to(torch.float32)
    scale = antiquant.to(x.dtype).to(torch.float32).repeat_interleave(values.shape[0] // antiquant.shape[0], dim=0)
    return (x.to(torch.float32) @ (values * scale).to(x.dtype).to(torch.float32)).to(x.dtype)


def linear_bound(u: float, rho: float, inner: int) -> float:
    """First-order bound on the relative error: each weight carries four roundings to the model dtype
    (r(s1), r(s2), the antiquant cast, int4 · scale), weighted by ρ; then the output rounding and the
    fp32 accumulation over `inner` products."""
    return ((1 + u) ** 4 - 1) * rho + u + inner * 2.0 ** -24


def linear_numerics(prefix: str, converted: dict[str, torch.Tensor], source_weight: torch.Tensor,
                    model_dtype: torch.dtype, *, tokens: int = 64, seed: int = 0) -> LinearNumerics:
    """Compare `a16w4_linear` on the `converted` tensors (weight, weight_scale_second) with the fp32
    product of `source_weight` (fp32 [N, K], int4 × scales) on seeded Gaussian inputs."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, source_weight.shape[1], generator=gen).to(model_dtype)
    want = x.to(torch.float32) @ source_weight.t()
    rho = (torch.linalg.norm(x.to(torch.float32).abs() @ source_weight.abs().t()) / torch.linalg.norm(want)).item()
    error = relative_error(a16w4_linear(x, converted["weight"], converted["weight_scale_second"]), want)
    return LinearNumerics(prefix, tokens, rho, error, linear_bound(UNIT_ROUNDOFF[model_dtype], rho,
                                                                    source_weight.shape[1]))


def dequantized_linear(src: SourceCheckpoint, reader: TensorReader, prefix: str, record: LinearRecord) -> torch.Tensor:
    """fp32 [N, K] from the source: int4 values × weight_scale_second (per group) × weight_scale."""
    spec = LINEAR_SPECS[record.variant]
    load = lambda suffix: reader.load(src.tensors[f"{prefix}.{suffix}"]).to(torch.float32)  # noqa: E731
    w = spec.int4_values(reader.load(src.tensors[f"{prefix}.weight"])).to(torch.float32)
    second = load("weight_scale_second")
    out, inp = w.shape
    w = (w.reshape(out, second.shape[1], -1) * second[:, :, None]).reshape(out, inp)
    return w * load("weight_scale").reshape(-1, 1)


def check_linear(ckpt: NpuReadyCheckpoint, src: SourceCheckpoint, reader: TensorReader, prefix: str, *,
                 tokens: int = 64, seed: int = 0) -> LinearNumerics:
    """`linear_numerics` for the converted Linear layer `prefix` and its source."""
    record = ckpt.stamp.records(LinearRecord)[prefix]
    model_dtype = MODEL_DTYPES[ckpt.stamp.source.model_dtype]
    return linear_numerics(prefix, ckpt.linear(prefix), dequantized_linear(src, reader, prefix, record),
                           model_dtype, tokens=tokens, seed=seed)


def source_mismatch(ckpt: NpuReadyCheckpoint, src: SourceCheckpoint) -> str | None:
    """Why `src` is not the source `ckpt` was converted from, or None."""
    if src.fingerprint() != ckpt.stamp.source.fingerprint:
        return "is not the checkpoint this output was converted from (source fingerprint differs from the stamp's)"
    return None


def open_converted_source(ckpt: NpuReadyCheckpoint, source_dir: Path | str) -> SourceCheckpoint:
    """The source opened as the conversion read it: its model dtype, and a group size given as an option."""
    recorded = ckpt.stamp.source
    stated = recorded.group_size_from is GroupSizeFrom.OPTION  # --group-size: state it again
    return open_source(source_dir, model_dtype=recorded.model_dtype,
                       group_size=recorded.group_size if stated else None)


def open_matching_source(ckpt: NpuReadyCheckpoint, source_dir: Path | str) -> SourceCheckpoint:
    """The source `ckpt` was converted from, opened as the conversion read it; refuses any other."""
    src = open_converted_source(ckpt, source_dir)
    mismatch = source_mismatch(ckpt, src)
    if mismatch:
        raise InvalidCheckpointError(mismatch, file=source_dir)
    return src


def _sampled(prefixes: list[str], layers: int | None, seed: int) -> list[str]:
    prefixes = sorted(prefixes, key=natural_key)
    if layers is not None and layers < len(prefixes):
        prefixes = sorted(random.Random(seed).sample(prefixes, layers), key=natural_key)
    return prefixes


def check_numerics(ckpt: NpuReadyCheckpoint, source: Path | str | SourceCheckpoint, *, layers: int | None = None,
                   tokens: int = 64, top_k: int = 2, max_experts: int = 8,
                   seed: int = 0) -> list[LayerNumerics | LinearNumerics]:
    """Check `layers` seeded-random MoE layers and as many W4A8 Linear layers of a converted
    checkpoint (None: every one) against the source it was converted from; MoE layers first, each
    kind in layer order. An empty list means the checkpoint has nothing this check can run.

    A path is opened with `open_matching_source` (`InvalidCheckpointError` for another source); an
    already opened `SourceCheckpoint` is taken as that source.
    """
    src = source if isinstance(source, SourceCheckpoint) else open_matching_source(ckpt, source)
    moe = _sampled(list(ckpt.stamp.records(MoeRecord)), layers, seed)
    linear = _sampled(list(ckpt.stamp.records(LinearRecord)), layers, seed)
    with TensorReader() as reader:
        return ([check_layer(ckpt, src, reader, p, tokens=tokens, top_k=top_k, max_experts=max_experts, seed=seed)
                 for p in moe]
                + [check_linear(ckpt, src, reader, p, tokens=tokens, seed=seed) for p in linear])
