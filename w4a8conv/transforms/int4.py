"""int4 packing in the A8W4 kernel's nibble order.

The kernel (and torch_npu's `npu_convert_weight_to_int4pack` / `npu_quantize(..., quint4x2)`) keeps
eight two's-complement int4 values per int32, element 8j+t in bits 4t..4t+3. msModelSlim's
version "1.0.0" stores two values per int8 byte, element 2j in the low nibble. Both orders agree
byte for byte on a little-endian host, so a pair-packed byte row viewed as int32 is the kernel word.
"""
from __future__ import annotations

import sys

import numpy as np
import torch

from ..constants import INT4_PER_INT32

__all__ = [
    "INT4_MIN", "INT4_MAX", "pack_int4_to_int8_pairs", "unpack_int8_pairs_to_int4",
    "int8_pairs_to_int32", "int32_to_int8_pairs", "pack_int4_to_int32", "unpack_int32_to_int4",
    "transpose_bytes", "kernel_words_from_pairs", "kernel_words_from_values",
]

INT4_MIN, INT4_MAX = -8, 7

if sys.byteorder != "little":  # pragma: no cover - every Ascend host is little-endian
    raise ImportError("w4a8conv's int4 packing assumes a little-endian host")


def pack_int4_to_int8_pairs(values: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """int8 [..., n, ...] with values in [-8, 7] -> int8 [..., n/2, ...] along `dim`.

    Byte j holds element 2j in the low nibble and 2j+1 in the high nibble (msModelSlim "1.0.0").
    """
    values = values.movedim(dim, -1)
    if values.shape[-1] % 2:
        raise ValueError(f"cannot pair-pack an odd dimension of {values.shape[-1]}")
    low = values[..., 0::2].to(torch.int8)
    high = values[..., 1::2].to(torch.int8)
    return ((low & 0xF) | (high << 4)).movedim(-1, dim).contiguous()


def unpack_int8_pairs_to_int4(pairs: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Inverse of `pack_int4_to_int8_pairs`: int8 [..., n/2, ...] -> int8 [..., n, ...], sign-extended."""
    pairs = pairs.movedim(dim, -1).to(torch.int8)
    low = (pairs << 4) >> 4  # arithmetic shift sign-extends the low nibble
    high = pairs >> 4
    values = torch.stack((low, high), dim=-1).reshape(*pairs.shape[:-1], pairs.shape[-1] * 2)
    return values.movedim(-1, dim).contiguous()


def int8_pairs_to_int32(pairs: torch.Tensor) -> torch.Tensor:
    """int8 [..., n/2] pair-packed bytes -> int32 [..., n/8] kernel words (a byte view)."""
    if pairs.shape[-1] % 4:
        raise ValueError(f"last dimension {pairs.shape[-1]} of pair-packed bytes is not a multiple of 4")
    return pairs.contiguous().view(torch.int32)


def int32_to_int8_pairs(words: torch.Tensor) -> torch.Tensor:
    """int32 [..., n/8] kernel words -> int8 [..., n/2] pair-packed bytes."""
    return words.contiguous().view(torch.int8)


def pack_int4_to_int32(values: torch.Tensor) -> torch.Tensor:
    """int [..., n] with values in [-8, 7] -> int32 [..., n/8], element 0 in the lowest nibble."""
    if values.shape[-1] % INT4_PER_INT32:
        raise ValueError(f"last dimension {values.shape[-1]} is not a multiple of {INT4_PER_INT32}")
    return int8_pairs_to_int32(pack_int4_to_int8_pairs(values, dim=-1))


def unpack_int32_to_int4(words: torch.Tensor) -> torch.Tensor:
    """int32 [..., n/8] -> int8 [..., n] in [-8, 7]."""
    return unpack_int8_pairs_to_int4(int32_to_int8_pairs(words), dim=-1)


def transpose_bytes(matrix: torch.Tensor) -> torch.Tensor:
    """int8 [R, C] -> contiguous int8 [C, R] (equal to `matrix.t().contiguous()`, about twice as fast).

    A byte-wise transpose gathers one byte per cache line; instead, transpose 8-byte words (each holds
    8 consecutive columns of one row), then split every word's bytes onto 8 output rows.
    """
    rows, cols = matrix.shape
    for width, word in ((8, np.int64), (4, np.int32)):
        if cols % width == 0 and rows:
            words = np.ascontiguousarray(matrix.contiguous().numpy().view(word).T)  # [C/width, R]
            split = words.view(np.int8).reshape(cols // width, rows, width).transpose(0, 2, 1)
            return torch.from_numpy(np.ascontiguousarray(split).reshape(cols, rows))
    return matrix.t().contiguous()


def kernel_words_from_pairs(pairs: torch.Tensor) -> torch.Tensor:
    """msModelSlim "1.0.0" weight int8 [out/2, in] -> kernel int32 [in, out/8]."""
    return int8_pairs_to_int32(transpose_bytes(pairs))


def kernel_words_from_values(values: torch.Tensor) -> torch.Tensor:
    """Version "0" weight int8 [out, in] of int4 values -> kernel int32 [in, out/8].

    Pair-packing the rows first halves the bytes the transpose moves.
    """
    return kernel_words_from_pairs(pack_int4_to_int8_pairs(values, dim=0))
