"""Content rules checked on source values; each returns a message naming the rule, or None.

They run on every scale of a checkpoint (hundreds of thousands of small tensors), so each is a
single vectorised pass in numpy, and the location is computed only on failure.
"""
from __future__ import annotations

import numpy as np
import torch

from .int4 import INT4_MAX, INT4_MIN

__all__ = ["int4_range_violation", "scale_violation", "zero_violation", "fp16_overflow_violation",
           "finite_violation", "bias_total_violation", "BIAS_TOTAL_TOLERANCE"]

BIAS_TOTAL_TOLERANCE = 1e-5  # of max |total|: fp32 sums of the same terms in another order


def _first(bad: np.ndarray) -> list[int]:
    return [int(i) for i in np.unravel_index(int(np.argmax(bad)), bad.shape)]


def _floats(tensor: torch.Tensor) -> np.ndarray:
    return tensor.to(torch.float32).numpy()


def int4_range_violation(values: torch.Tensor) -> str | None:
    """A version "0" weight stores one int4 value per int8; anything outside [-8, 7] is corrupt."""
    array = values.numpy()
    if not array.size or (array.min() >= INT4_MIN and array.max() <= INT4_MAX):  # two SIMD reductions, no temporary
        return None
    shifted = array + np.int8(-INT4_MIN)  # [-8, 7] -> [0, 15]; int8 wrap-around sends the rest above 15
    bad = shifted.view(np.uint8) > INT4_MAX - INT4_MIN
    at = _first(bad)
    return f"int4 value {int(values[tuple(at)])} at {at} outside [{INT4_MIN}, {INT4_MAX}]"


def scale_violation(scale: torch.Tensor) -> str | None:
    """Scales must be finite and non-negative (msModelSlim's symmetric quantization never writes others)."""
    values = _floats(scale)
    with np.errstate(invalid="ignore"):
        bad = ~((values >= 0) & (values < np.inf))  # NaN fails both comparisons
    if not bad.any():
        return None
    at = _first(bad)
    return f"scale {float(values[tuple(at)])} at {at} is not finite and non-negative"


def zero_violation(offset: torch.Tensor) -> str | None:
    """Offsets must be zero, whatever their dtype (compared by value): the NPU kernels are symmetric and
    ignore them."""
    bad = (offset != 0).numpy()
    if not bad.any():
        return None
    at = _first(bad)
    return (f"non-zero offset {offset[tuple(at)].item()} at {at}: asymmetric quantization is "
            "not served by the A8W4 kernel")


def finite_violation(tensor: torch.Tensor) -> str | None:
    values = _floats(tensor)
    bad = ~np.isfinite(values)
    if not bad.any():
        return None
    return f"value {float(values[tuple(_first(bad))])} at {_first(bad)} is not finite"


def fp16_overflow_violation(fused: torch.Tensor) -> str | None:
    """A fused per-group scale above fp16's range turns into inf in vllm-ascend's fp16 rounding."""
    bad = np.isinf(_floats(fused))
    if not bad.any():
        return None
    return f"fused scale at {_first(bad)} overflows fp16 (|scale x scale_second| > 65504)"


def bias_total_violation(chunks: torch.Tensor, total: torch.Tensor) -> str | None:
    """Recomputed chunk sums [N, 16] must add up to the checkpoint's total [N, 1] (same integers, same scales)."""
    got = chunks.double().sum(dim=1).numpy()
    want = total.double().reshape(-1).numpy()
    error = np.abs(got - want)
    limit = BIAS_TOTAL_TOLERANCE * float(np.abs(want).max(initial=0.0))
    bad = ~(error <= limit)  # NaN is bad too
    if not bad.any():
        return None
    row = int(np.argmax(bad))
    return (f"scale_bias total {want[row]:.9g} at [{row}, 0] is not the sum {got[row]:.9g} of the 16 chunk biases "
            f"recomputed from the weight and weight_scale (tolerance {limit:.3g})")
