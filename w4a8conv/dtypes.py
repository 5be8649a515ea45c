"""safetensors dtype strings: their sizes and torch dtypes (shared by the source readers and the runtime)."""
from __future__ import annotations

import math

import torch

__all__ = ["DTYPE_SIZES", "TORCH_DTYPES", "MODEL_DTYPES", "MAX_DIM", "torch_can_hold"]

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


def torch_can_hold(shape: object) -> bool:
    """A list of sizes a torch tensor can have: each in [0, 2^63 - 1], and the contiguous strides too
    (torch counts a zero size as 1 there, so [0, 2, 2^63 - 1] is zero bytes but no tensor)."""
    return (isinstance(shape, list) and all(type(d) is int and 0 <= d <= MAX_DIM for d in shape)
            and math.prod(max(d, 1) for d in shape[1:]) <= MAX_DIM)
