"""The MoE and Linear cases every vllm-ascend comparison runs: presets and the TP/EP splits they allow."""
from __future__ import annotations

import pytest

from w4a8conv.synthetic import PRESETS

TP_SIZES = (1, 2, 4)
EP_SIZES = (2,)   # with MoE TP 1; EP 1 is the TP 1 case


def split_allowed(intermediate: int, experts: int, group_size: int, tp: int, ep: int) -> bool:
    """TP: I/tp a multiple of 8 (int4 words) and of group_size when per-group; EP: experts divide."""
    if intermediate % tp or experts % ep:
        return False
    part = intermediate // tp
    return part % 8 == 0 and (group_size == 0 or part % group_size == 0)


def splits(spec) -> list[tuple[int, int]]:
    """(tp, ep) pairs a preset's shapes allow."""
    candidates = [(tp, 1) for tp in TP_SIZES] + [(1, ep) for ep in EP_SIZES]
    return [(tp, ep) for tp, ep in candidates
            if split_allowed(spec.intermediate, spec.num_experts, spec.effective_group_size, tp, ep)]


MOE_CASES = [pytest.param(name, tp, ep, id=f"{name}-tp{tp}-ep{ep}")
             for name, spec in PRESETS.items() if spec.moe_layers for tp, ep in splits(spec)]
LINEAR_CASES = [name for name, spec in PRESETS.items() if spec.w4a8_linear]
