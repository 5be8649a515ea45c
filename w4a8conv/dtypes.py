"""safetensors dtype strings: their sizes and torch dtypes (shared by the source readers and the runtime)."""
from __future__ import annotations

import math

import torch

__all__ = ["DTYPE_SIZES", "TORCH_DTYPES", "MODEL_DTYPES", "MAX_DIM", "torch_shape_problem"]

DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}
TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2, "I16": torch.int16, "U16": torch.uint16, "F16": torch.float16,
    "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32, "F32": torch.float32, "I64": torch.int64,
    "U64": torch.uint64, "F64": torch.float64,
}
# The model dtypes a conversion takes (config.json's torch_dtype, --model-dtype) and the stamp records.
MODEL_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
}
MAX_DIM = 2**63 - 1  # torch sizes are int64: a larger dimension (even next to a zero) cannot be loaded
MAX_STORAGE_PRODUCT = 2**64 - 1  # torch multiplies the sizes in uint64 when it sizes a tensor's storage


def torch_shape_problem(shape: object) -> str | None:
    """Why torch cannot make a tensor of this shape (completing "shape [...] ..."), or None when it can.

    torch sizes and contiguous strides are int64 (torch counts a zero size as 1 in a stride, so
    [0, 2, 2^63 - 1] is zero bytes but no tensor), and its storage size is the product of the sizes taken
    in order as unsigned 64-bit integers, an overflow before a zero is reached failing even when the
    tensor holds no bytes ([8, 2^63 - 1, 0])."""
    if not (isinstance(shape, list) and all(type(d) is int and 0 <= d <= MAX_DIM for d in shape)):
        return "is not a list of non-negative integers below 2^63 (torch's int64 sizes)"
    stride = math.prod(max(d, 1) for d in shape[1:])
    if stride > MAX_DIM:
        return f"has a contiguous stride of {stride}, past 2^63 - 1 (torch's int64 strides)"
    leading = math.prod(shape[:shape.index(0)] if 0 in shape else shape)
    if leading > MAX_STORAGE_PRODUCT:
        return (f"has sizes whose product before the first zero, {leading}, passes 2^64 - 1: torch's storage size "
                "computation overflows, although the tensor holds no bytes")
    return None
