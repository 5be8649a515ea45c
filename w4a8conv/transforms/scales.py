"""Scale fusion and the int64 scale encoding of the A8W4 grouped matmul.

vllm-ascend 0.11.0 `AscendW4A8DynamicFusedMoEMethod.process_scale` keeps, per group, the fp32 product
of the per-channel and per-group scales rounded through fp16, and hands the kernel its fp32 bits in
the low 32 bits of an int64 whose high word is zero. Per-channel checkpoints (group_size 0) keep the
raw fp32 bits, unrounded. The encoding is a zero extension: a negative scale keeps its sign bit in
bit 31 and never reaches the high word.
"""
from __future__ import annotations

import torch

__all__ = [
    "fuse_group_scales_fp16", "encode_fp32_bits_as_int64", "decode_int64_to_fp32",
    "high_words_are_zero", "round_to_dtype",
]

_LOW_WORD = 0xFFFFFFFF


def fuse_group_scales_fp16(channel_scale: torch.Tensor, group_scale: torch.Tensor) -> torch.Tensor:
    """fp32 [N, 1] x fp32 [N, K/G] -> fp32 [K/G, N]: the product in fp32, rounded to fp16 and back."""
    product = channel_scale.to(torch.float32).reshape(1, -1) * group_scale.to(torch.float32).t()
    return product.to(torch.float16).to(torch.float32)


def encode_fp32_bits_as_int64(scale: torch.Tensor) -> torch.Tensor:
    """fp32 tensor -> int64 of the same shape: fp32 bit pattern in the low word, zero high word."""
    return scale.to(torch.float32).contiguous().view(torch.int32).to(torch.int64) & _LOW_WORD


def decode_int64_to_fp32(encoded: torch.Tensor) -> torch.Tensor:
    """Inverse of `encode_fp32_bits_as_int64` (the high word is ignored; check it separately)."""
    low = encoded & _LOW_WORD
    return torch.where(low >= 2**31, low - 2**32, low).to(torch.int32).view(torch.float32)


def high_words_are_zero(encoded: torch.Tensor) -> bool:
    """True when every int64 scale carries nothing above bit 31."""
    return bool(((encoded >> 32) == 0).all())


def round_to_dtype(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The fp32 value a parameter created in `dtype` holds after loading `scale` (RNE), back in fp32."""
    return scale.to(dtype).to(torch.float32)
