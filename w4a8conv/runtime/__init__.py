"""The runtime side: read converted checkpoints for a serving stack (no vLLM needed).

`NpuReadyCheckpoint` slices any TP/EP rank out of a converted directory; `MoELayer` runs one rank's
MoE experts, on the CPU emulation of the A8W4 kernels (`reference`) or on torch_npu, which is
imported only when that backend is asked for.
"""
from .checkpoint import NpuReadyCheckpoint
from .split import RankSplit
from .moe import MoELayer
from .reference import (KernelOps, dynamic_quant, grouped_matmul_a8w4, moe_forward, msd_split, swiglu)

__all__ = ["NpuReadyCheckpoint", "RankSplit", "MoELayer", "KernelOps", "dynamic_quant", "grouped_matmul_a8w4",
           "moe_forward", "msd_split", "swiglu"]
