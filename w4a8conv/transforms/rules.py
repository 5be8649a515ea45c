"""Content rules checked on source values; each returns a message naming the rule, or None."""
from __future__ import annotations

import torch

from .int4 import INT4_MAX, INT4_MIN

__all__ = ["int4_range_violation", "scale_violation", "zero_violation", "fp16_overflow_violation"]


def _first(mask: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in torch.nonzero(mask)[0])


def int4_range_violation(values: torch.Tensor) -> str | None:
    """A version "0" weight stores one int4 value per int8; anything outside [-8, 7] is corrupt."""
    bad = (values < INT4_MIN) | (values > INT4_MAX)
    if not bool(bad.any()):
        return None
    at = _first(bad)
    return f"int4 value {int(values[at])} at {list(at)} outside [{INT4_MIN}, {INT4_MAX}]"


def scale_violation(scale: torch.Tensor) -> str | None:
    """Scales must be finite and non-negative (msModelSlim's symmetric quantization never writes others)."""
    scale = scale.to(torch.float32)
    bad = ~torch.isfinite(scale) | (scale < 0)
    if not bool(bad.any()):
        return None
    at = _first(bad)
    return f"scale {float(scale[at])} at {list(at)} is not finite and non-negative"


def zero_violation(offset: torch.Tensor) -> str | None:
    """Offsets must be zero: the NPU kernels are symmetric and ignore them."""
    bad = offset != 0
    if not bool(bad.any()):
        return None
    at = _first(bad)
    return (f"non-zero offset {float(offset[at])} at {list(at)}: asymmetric quantization is "
            "not served by the A8W4 kernel")


def fp16_overflow_violation(fused: torch.Tensor) -> str | None:
    """A fused per-group scale above fp16's range turns into inf in vllm-ascend's fp16 rounding."""
    bad = torch.isinf(fused)
    if not bool(bad.any()):
        return None
    at = _first(bad)
    return f"fused scale at {list(at)} overflows fp16 (|scale x scale_second| > 65504)"
