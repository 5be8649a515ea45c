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
from .kernels import pack_row_pairs, transpose_words
from .workspace import Workspace

__all__ = [
    "INT4_MIN", "INT4_MAX", "pack_int4_to_int8_pairs", "unpack_int8_pairs_to_int4",
    "int8_pairs_to_int32", "int32_to_int8_pairs", "pack_int4_to_int32", "unpack_int32_to_int4",
    "transpose_bytes", "pack_int4_rows_to_pairs", "kernel_words_from_pairs", "kernel_words_from_values",
]

INT4_MIN, INT4_MAX = -8, 7
_WORD = 8  # bytes per word of the two-step transpose
_PACK_BLOCK_BYTES = 256 * 2**10  # rows packed at once: the temporary stays in the L2 cache

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


def transpose_bytes(matrix: torch.Tensor, out: torch.Tensor | None = None,
                    workspace: Workspace | None = None) -> torch.Tensor:
    """int8 [R, C] -> contiguous int8 [C, R] (equal to `matrix.t().contiguous()`).

    With the compiled kernel (`kernels.py`; 2.5-3 times as fast as `.t().contiguous()`) where it
    applies; otherwise in two steps (about 2 times as fast). A byte-wise transpose gathers one byte
    per cache line. Instead, transpose 8-byte words (each holds
    8 consecutive columns of one row) with torch's cache-blocked 2-D transpose copy (numpy's strided
    copy is 2-5 times slower on these shapes), then split every word's bytes onto 8 output rows, one
    contiguous [R, 8] -> [8, R] block after another (numpy's strided copy, ~3.5 GB/s). The words are
    int64, not a wider float type, so no value semantics can touch the bytes.

    `out` (int8 [C, R], contiguous) receives the result, for example a staging buffer's slice;
    `workspace` holds the word temporary between calls.
    """
    rows, cols = matrix.shape
    if out is None:
        out = torch.empty((cols, rows), dtype=torch.int8)
    if tuple(out.shape) != (cols, rows) or out.dtype != torch.int8 or not out.is_contiguous():
        raise ValueError(f"transpose of int8 {[rows, cols]} needs a contiguous int8 {[cols, rows]} output, "
                         f"got {out.dtype} {list(out.shape)}")
    source = matrix.contiguous()
    if transpose_words(source.numpy(), out.numpy()):
        return out
    if cols % _WORD or not source.numel() or source.data_ptr() % _WORD:
        out.copy_(source.t())
        return out
    words_shape = (cols // _WORD, rows)
    words = torch.from_numpy(workspace.array("transpose-words", words_shape, np.int64) if workspace
                             else np.empty(words_shape, np.int64))
    words.copy_(source.view(torch.int64).t())
    np.copyto(out.numpy().reshape(cols // _WORD, _WORD, rows),
              words.numpy().view(np.int8).reshape(cols // _WORD, rows, _WORD).transpose(0, 2, 1))
    return out


def pack_int4_rows_to_pairs(values: torch.Tensor, out: torch.Tensor | None = None,
                            workspace: Workspace | None = None) -> torch.Tensor:
    """`pack_int4_to_int8_pairs(values, dim=0)` for int8 [R, C] -> int8 [R/2, C], without temporaries
    the size of the matrix: the nibbles of row pairs are combined a block of rows at a time on uint8
    views (a left shift of uint8 drops the high bits, as the int8 formula's wrap-around does)."""
    rows, cols = values.shape
    if rows % 2:
        raise ValueError(f"cannot pair-pack an odd dimension of {rows}")
    if out is None:
        out = torch.empty((rows // 2, cols), dtype=torch.int8)
    source = values.to(torch.int8).contiguous().numpy().view(np.uint8)
    packed = out.numpy().view(np.uint8)
    if pack_row_pairs(source, packed):
        return out
    low, high = source[0::2], source[1::2]
    step = max(1, _PACK_BLOCK_BYTES // max(cols, 1))
    tmp = (workspace.array("pack-low", (step, cols), np.uint8) if workspace else np.empty((step, cols), np.uint8))
    for start in range(0, rows // 2, step):
        stop = min(start + step, rows // 2)
        part = tmp[:stop - start]
        np.bitwise_and(low[start:stop], 0x0F, out=part)
        np.left_shift(high[start:stop], 4, out=packed[start:stop])
        np.bitwise_or(packed[start:stop], part, out=packed[start:stop])
    return out


def kernel_words_from_pairs(pairs: torch.Tensor, out: torch.Tensor | None = None,
                            workspace: Workspace | None = None) -> torch.Tensor:
    """msModelSlim "1.0.0" weight int8 [out/2, in] -> kernel int32 [in, out/8].

    `out` is an int8 [in, out/2] destination (the returned words are a view of it)."""
    return int8_pairs_to_int32(transpose_bytes(pairs, out, workspace))


def kernel_words_from_values(values: torch.Tensor, out: torch.Tensor | None = None,
                             workspace: Workspace | None = None) -> torch.Tensor:
    """Version "0" weight int8 [out, in] of int4 values -> kernel int32 [in, out/8].

    Pair-packing the rows first halves the bytes the transpose moves. `out` as for pairs."""
    rows, cols = values.shape
    pairs = pack_int4_rows_to_pairs(
        values, torch.from_numpy(workspace.array("pairs", (rows // 2, cols), np.int8)) if workspace else None,
        workspace)
    return kernel_words_from_pairs(pairs, out, workspace)
