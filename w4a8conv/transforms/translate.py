"""Re-expressing a non-W4A8 module in the format of the description type vLLM will serve it with.

A compressed-tensors int8 Linear layer (weights per channel, activations dynamic per token) stores
`weight` int8 [out, in] and a `weight_scale` [out, 1] in the model dtype, and no offset; vllm-ascend's
msModelSlim `W8A8_DYNAMIC` scheme loads `weight`, `weight_scale` and `weight_offset` [out, 1]. The
weight is copied as it is; the scale is written in fp32 (exact: it widens the stored value), the offset
as zeros (symmetric quantization).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from .moe import Parts

__all__ = ["Translation", "TRANSLATIONS"]


@dataclass(frozen=True)
class Translation:
    """One written tensor: the source suffix it reads (its shape is the output's) and the pure function."""

    needs: str
    dtype: str  # safetensors dtype of the output
    make: Callable[[Parts], torch.Tensor]


TRANSLATIONS: dict[str, Mapping[str, Translation]] = {
    "W8A8_DYNAMIC": {
        "weight_scale": Translation("weight_scale", "F32", lambda p: p["weight_scale"].to(torch.float32)),
        "weight_offset": Translation("weight_scale", "F32",
                                     lambda p: torch.zeros(p["weight_scale"].shape, dtype=torch.float32)),
    },
}
