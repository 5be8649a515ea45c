"""A standalone MoE layer over one rank's converted tensors, on the CPU reference or on torch_npu.

`MoELayer.from_checkpoint` reads a rank's tensors with `NpuReadyCheckpoint.moe_layer` and holds them
as buffers under vllm-ascend's names. The "reference" backend runs `reference.moe_forward` on CPU;
the "npu" backend runs the same routing around `npu_dynamic_quant`, `npu_grouped_matmul` (int64
scale, fp32 bias, per-token scale, counts group list, bf16 output) and `npu_swiglu`, after casting
the two weights to FRACTAL_NZ once at construction, the only device-side step the converted layout
leaves. torch_npu is imported only when the "npu" backend is asked for.

The reference always emulates the kernel's MSD path; on the device, per-channel layers with many
rows per expert may run another kernel (see `reference.grouped_matmul_a8w4`).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import UsageError
from ..layout import MOE_PARAMS
from ..stamp import MoeRecord
from .checkpoint import NpuReadyCheckpoint
from .split import RankSplit
from .reference import REFERENCE_OPS, KernelOps, moe_forward

__all__ = ["MoELayer", "BACKENDS", "TENSOR_NAMES", "load_torch_npu"]

BACKENDS = ("reference", "npu")
TENSOR_NAMES = tuple(MOE_PARAMS)
ACL_FORMAT_FRACTAL_NZ = 29
NPU_DEVICE = "npu"  # where the "npu" backend puts its tensors (tests substitute a stub torch_npu on "cpu")


def load_torch_npu():
    """torch_npu, imported now; a `UsageError` saying what is missing (CANN, or an NPU device)."""
    try:
        import torch_npu  # lazily: only hosts with CANN have it
    except Exception as exc:  # noqa: BLE001 - a broken CANN install fails in many ways, not only ImportError
        raise UsageError(f"torch_npu not importable (needs CANN): {type(exc).__name__}: {exc}") from None
    npu = getattr(torch, "npu", None)
    if npu is None or not npu.is_available():
        raise UsageError("torch_npu is importable but no NPU device is available")
    return torch_npu


def _npu_backend_torch_npu():
    try:
        return load_torch_npu()
    except UsageError as exc:
        raise UsageError(f"MoELayer backend 'npu' needs torch_npu and an Ascend NPU ({exc}); install torch_npu "
                         "with its CANN toolkit, or use backend='reference' for the CPU emulation") from None


def _npu_ops(torch_npu) -> KernelOps:
    """torch_npu's kernels, called as vllm-ascend's quant_apply_mlp calls them for W4A8 experts."""

    def grouped_matmul(x, weight, scale, bias, per_token_scale, group_list):
        return torch_npu.npu_grouped_matmul(
            x=[x], weight=[weight], scale=[scale], bias=[bias], per_token_scale=[per_token_scale],
            split_item=2, group_list_type=1, group_type=0, group_list=group_list,
            output_dtype=torch.bfloat16)[0]

    return KernelOps(dynamic_quant=torch_npu.npu_dynamic_quant, grouped_matmul=grouped_matmul,
                     swiglu=torch_npu.npu_swiglu)


class MoELayer(torch.nn.Module):
    """One rank's W4A8 MoE experts: `forward(hidden_states, topk_ids, topk_weights)` -> bf16 [T, H].

    Expert ids in `topk_ids` are global; the layer computes the copies routed to its experts
    [expert_start, expert_start + E_local) and returns zeros for the rest, so the outputs of all
    EP ranks (and of all TP ranks, each a partial sum over its intermediate slice) add up to the
    layer's output. The layer holds copies of the tensors it is given (on the device for "npu"),
    registered as buffers under vllm-ascend's names.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], *, num_experts: int, expert_start: int = 0,
                 backend: str = "reference", split: RankSplit | None = None, prefix: str = ""):
        super().__init__()
        if backend not in BACKENDS:
            raise UsageError(f"unknown MoELayer backend {backend!r} (choose from {', '.join(BACKENDS)})")
        missing = [n for n in TENSOR_NAMES if n not in tensors]
        if missing:
            raise UsageError(f"MoELayer needs tensors {', '.join(missing)}")
        local = tensors["w13_weight"].shape[0]
        if not 0 <= expert_start <= num_experts - local:
            raise UsageError(f"experts [{expert_start}, {expert_start + local}) are not within the layer's "
                             f"{num_experts} experts")
        self.backend = backend
        self.num_experts = num_experts
        self.expert_start = expert_start
        self.split = split or RankSplit()
        self.prefix = prefix
        if backend == "npu":
            torch_npu = _npu_backend_torch_npu()
            self._ops = _npu_ops(torch_npu)
            tensors = {name: t.to(NPU_DEVICE) for name, t in tensors.items()}
            # vllm-ascend casts the int8 bytes to NZ and then views them as int32; NZ blocks are 32
            # bytes wide for int8 (16 x 32) and int32 (16 x 8) alike, so casting the int32 words
            # should give the same bytes. Not yet checked on a device.
            for name in ("w13_weight", "w2_weight"):
                tensors[name] = torch_npu.npu_format_cast(tensors[name], ACL_FORMAT_FRACTAL_NZ)
        else:
            self._ops = REFERENCE_OPS
            # Own the memory: tensors read from a checkpoint may be views of its memory-mapped
            # shards, shared with later reads, so an in-place change here must not reach them.
            tensors = {name: t.clone() for name, t in tensors.items()}
        for name in TENSOR_NAMES:
            self.register_buffer(name, tensors[name])

    @classmethod
    def from_checkpoint(cls, ckpt: NpuReadyCheckpoint, prefix: str, tp_size: int = 1, tp_rank: int = 0,
                        ep_size: int = 1, ep_rank: int = 0, backend: str = "reference") -> "MoELayer":
        """The layer `prefix` (e.g. "model.layers.3.mlp") of a converted checkpoint, for one rank."""
        if backend not in BACKENDS:
            raise UsageError(f"unknown MoELayer backend {backend!r} (choose from {', '.join(BACKENDS)})")
        if backend == "npu":
            _npu_backend_torch_npu()  # fail before reading any tensor
        tensors = ckpt.moe_layer(prefix, tp_size=tp_size, tp_rank=tp_rank, ep_size=ep_size, ep_rank=ep_rank)
        experts = ckpt.stamp.records(MoeRecord)[prefix].num_experts  # moe_layer refused any other prefix
        return cls(tensors, num_experts=experts, expert_start=ep_rank * (experts // ep_size), backend=backend,
                   split=RankSplit(tp_size, tp_rank, ep_size, ep_rank), prefix=prefix)

    @property
    def local_experts(self) -> int:
        return int(self.w13_weight.shape[0])

    def forward(self, hidden_states: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        return moe_forward(hidden_states, topk_ids, topk_weights,
                           self.w13_weight, self.w13_weight_scale, self.w13_scale_bias,
                           self.w2_weight, self.w2_weight_scale, self.w2_scale_bias,
                           expert_start=self.expert_start, ops=self._ops)

    def extra_repr(self) -> str:
        s = self.split
        return (f"prefix={self.prefix!r}, backend={self.backend!r}, experts=[{self.expert_start}, "
                f"{self.expert_start + self.local_experts}) of {self.num_experts}, tp={s.tp_rank}/{s.tp_size}, "
                f"ep={s.ep_rank}/{s.ep_size}")
