"""Compiled byte kernels for the two transforms every expert weight byte goes through: the byte
transpose and version "0"'s row pair-packing.

They are compiled by numba (the optional extra `fast`: wheels for Linux x86-64 and aarch64, no
compiler needed at install time) on first use and cached beside this file (numba's own cache, or its
per-user one where that is read-only). Without numba, `AVAILABLE` is False and the callers keep their
numpy/torch paths, which give the same bytes (tests/test_fast_transforms.py compares both).
Set W4A8CONV_KERNELS=numpy to use those paths with numba installed.

The transpose works on 8x8-byte blocks held in eight 64-bit words: three rounds of masked swaps
(32-, 16-, then 8-bit halves) move byte c of row r to byte r of row c, so each source and output
cache line is touched once per block instead of once per byte.
"""
from __future__ import annotations

import os

import numpy as np

__all__ = ["AVAILABLE", "NAME", "transpose_words", "pack_row_pairs"]

try:
    if os.environ.get("W4A8CONV_KERNELS", "") == "numpy":
        raise ImportError("W4A8CONV_KERNELS=numpy")
    import numba
except ImportError:
    numba = None

AVAILABLE = numba is not None
NAME = f"numba {numba.__version__}" if AVAILABLE else "numpy"
_BLOCK_WORDS = 8  # 8x8 blocks of words (64 x 64 bytes) per tile: one tile's lines stay in L1


def _swap(a, b, shift, mask):  # pragma: no cover - compiled
    """Exchange the `mask` bits of b with the bits of a `shift` above them (one round of the 8x8 transpose)."""
    t = ((a >> shift) ^ b) & mask
    return a ^ (t << shift), b ^ t


def _transpose_words(src, dst):  # pragma: no cover - compiled; the numpy path is tested against it
    """src uint64 [R, C/8] (an int8 [R, C] matrix's rows as words), dst uint64 [C, R/8]; R % 8 == 0."""
    rows8 = src.shape[0] // 8
    cols8 = src.shape[1]
    m32 = np.uint64(0x00000000FFFFFFFF)
    m16 = np.uint64(0x0000FFFF0000FFFF)
    m8 = np.uint64(0x00FF00FF00FF00FF)
    s32, s16, s8 = np.uint64(32), np.uint64(16), np.uint64(8)
    for j0 in range(0, cols8, _BLOCK_WORDS):
        j1 = min(j0 + _BLOCK_WORDS, cols8)
        for i0 in range(0, rows8, _BLOCK_WORDS):
            i1 = min(i0 + _BLOCK_WORDS, rows8)
            for j in range(j0, j1):
                for i in range(i0, i1):
                    r = 8 * i
                    x0, x1, x2, x3 = src[r, j], src[r + 1, j], src[r + 2, j], src[r + 3, j]
                    x4, x5, x6, x7 = src[r + 4, j], src[r + 5, j], src[r + 6, j], src[r + 7, j]
                    x0, x4 = _swap(x0, x4, s32, m32)
                    x1, x5 = _swap(x1, x5, s32, m32)
                    x2, x6 = _swap(x2, x6, s32, m32)
                    x3, x7 = _swap(x3, x7, s32, m32)
                    x0, x2 = _swap(x0, x2, s16, m16)
                    x1, x3 = _swap(x1, x3, s16, m16)
                    x4, x6 = _swap(x4, x6, s16, m16)
                    x5, x7 = _swap(x5, x7, s16, m16)
                    x0, x1 = _swap(x0, x1, s8, m8)
                    x2, x3 = _swap(x2, x3, s8, m8)
                    x4, x5 = _swap(x4, x5, s8, m8)
                    x6, x7 = _swap(x6, x7, s8, m8)
                    c = 8 * j
                    dst[c, i], dst[c + 1, i], dst[c + 2, i], dst[c + 3, i] = x0, x1, x2, x3
                    dst[c + 4, i], dst[c + 5, i], dst[c + 6, i], dst[c + 7, i] = x4, x5, x6, x7


def _pack_row_pairs(values, out):  # pragma: no cover - compiled
    """values uint8 [R, C] of int4 values -> out uint8 [R/2, C]: row 2j's nibble low, row 2j+1's high."""
    for j in range(out.shape[0]):
        for c in range(values.shape[1]):
            out[j, c] = (values[2 * j, c] & 0x0F) | ((values[2 * j + 1, c] << 4) & 0xF0)


if AVAILABLE:
    _jit = numba.njit(cache=True, nogil=True)
    _swap = numba.njit(inline="always")(_swap)
    _transpose_words = _jit(_transpose_words)
    _pack_row_pairs = _jit(_pack_row_pairs)


def transpose_words(matrix: np.ndarray, out: np.ndarray) -> bool:
    """Write the transpose of uint8/int8 [R, C] `matrix` into contiguous [C, R] `out` with the compiled
    kernel; False (nothing written) where it does not apply: no numba, R or C not a multiple of 8, or a
    buffer not 8-byte aligned."""
    rows, cols = matrix.shape
    if (not AVAILABLE or rows % 8 or cols % 8 or not matrix.flags.c_contiguous or not out.flags.c_contiguous
            or matrix.ctypes.data % 8 or out.ctypes.data % 8 or not matrix.size):
        return False
    _transpose_words(matrix.view(np.uint64), out.view(np.uint64))
    return True


def pack_row_pairs(values: np.ndarray, out: np.ndarray) -> bool:
    """Pair-pack the rows of uint8 [R, C] `values` into [R/2, C] `out` with the compiled kernel; False
    (nothing written) without numba."""
    if not AVAILABLE or not values.size:
        return False
    _pack_row_pairs(values, out)
    return True
