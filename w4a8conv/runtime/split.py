"""What one tensor/expert-parallel rank takes of a converted expert projection: slices only, plus a sum
over the rank's share of the 16 down_proj bias chunks. Shared by the checkpoint view and the vLLM
plugin's weight loaders, so both cut ranks the same way."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..constants import DOWN_BIAS_CHUNKS, INT4_PER_INT32
from ..errors import UnsupportedSplitError

__all__ = ["RankSplit", "check_tp", "expert_rank_part", "linear_output_axis", "linear_rank_part"]


@dataclass(frozen=True)
class RankSplit:
    """Which part of an MoE layer a rank holds: experts by EP rank, intermediate columns by TP rank."""

    tp_size: int = 1
    tp_rank: int = 0
    ep_size: int = 1
    ep_rank: int = 0

    def check(self, prefix: str, experts: int, intermediate: int, group_size: int) -> None:
        """Raise `UnsupportedSplitError` naming the rule a split breaks."""
        def refuse(rule: str) -> UnsupportedSplitError:
            return UnsupportedSplitError(f"{prefix}: tp_size={self.tp_size}, ep_size={self.ep_size}: {rule}")

        for size, rank, kind in ((self.tp_size, self.tp_rank, "tp"), (self.ep_size, self.ep_rank, "ep")):
            if size < 1 or not 0 <= rank < size:
                raise refuse(f"{kind}_rank {rank} is not in [0, {kind}_size)")
        check_tp(prefix, intermediate, group_size, self.tp_size)
        if experts % self.ep_size:
            raise refuse(f"{experts} experts do not split evenly over {self.ep_size} EP ranks")

    def experts(self, num_experts: int) -> range:
        """The global ids of the rank's experts: a contiguous block, as vLLM assigns them by default."""
        per_rank = num_experts // self.ep_size
        return range(self.ep_rank * per_rank, (self.ep_rank + 1) * per_rank)


def check_tp(prefix: str, intermediate: int, group_size: int, tp_size: int) -> None:
    """Raise `UnsupportedSplitError` unless every expert projection splits exactly over `tp_size` ranks."""
    def refuse(rule: str) -> UnsupportedSplitError:
        return UnsupportedSplitError(f"{prefix}: tp_size={tp_size}: {rule}")

    if tp_size < 1 or DOWN_BIAS_CHUNKS % tp_size:
        raise refuse(f"MoE TP size must divide {DOWN_BIAS_CHUNKS} (the down_proj bias chunks)")
    if intermediate % tp_size:
        raise refuse(f"intermediate size {intermediate} does not split over {tp_size} TP ranks")
    part = intermediate // tp_size
    if part % INT4_PER_INT32:
        raise refuse(f"intermediate part {part} is not a multiple of {INT4_PER_INT32} packed int4 values")
    if group_size and part % group_size:
        raise refuse(f"intermediate part {part} is not a multiple of group_size {group_size}")


def expert_rank_part(output: str, is_down: bool, stored: torch.Tensor, *, intermediate: int, group_size: int,
                     tp_size: int, tp_rank: int) -> torch.Tensor:
    """A rank's part of one stored expert tensor (layout v2, kernel orientation), as vllm-ascend holds it.

    gate/up are cut on their output (last) axis: weight words, scale columns, bias entries. down is cut
    on its input axis: weight rows, per-group scale rows (a per-channel scale row is shared), and its
    bias is the sum of the rank's 16/tp chunks. `check_tp` must have accepted the split.
    """
    part = intermediate // tp_size
    start, stop = tp_rank * part, (tp_rank + 1) * part
    if not is_down:
        unit = INT4_PER_INT32 if output == "weight" else 1
        return stored[..., start // unit:stop // unit]
    if output == "weight":
        return stored[start:stop]
    if output == "weight_scale":
        return stored[start // group_size:stop // group_size] if group_size else stored
    per_rank = DOWN_BIAS_CHUNKS // tp_size
    # Chunks first, as vllm-ascend's update_bias lays them out before summing (same fp32 order).
    return stored[:, tp_rank * per_rank:(tp_rank + 1) * per_rank].t().contiguous().sum(dim=0)


def linear_output_axis(param: str) -> int:
    """The output (N) axis of a stored Linear tensor: weight [K, N/8] and scales [K/G, N] last, bias first."""
    return 1 if param in ("weight", "weight_scale_second") else 0


def linear_rank_part(param: str, stored: torch.Tensor, *, row_parallel: bool, tp_size: int,
                     tp_rank: int) -> torch.Tensor:
    """A rank's part of one stored Linear tensor (or of one shard of a merged layer), as vllm-ascend
    holds it. Column-parallel ranks take an equal block of output columns (int32 words for the weight);
    row-parallel ranks take a block of input rows of the weight and its scales, and the whole bias
    (vLLM cuts a row-parallel parameter only along an input axis, and the bias has none)."""
    if row_parallel:
        if param not in ("weight", "weight_scale_second"):
            return stored
        rows = stored.shape[0] // tp_size
        return stored[tp_rank * rows:(tp_rank + 1) * rows]
    axis = linear_output_axis(param)
    width = stored.shape[axis] // tp_size
    return stored.narrow(axis, tp_rank * width, width)
