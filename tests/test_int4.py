"""int4 packing: golden words and bytes computed by hand, an independent reference packer, and
round-trip / route-agreement properties over random shapes and values."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from w4a8conv.transforms.int4 import (INT4_MAX, INT4_MIN, int8_pairs_to_int32, int32_to_int8_pairs,
                                      pack_int4_to_int8_pairs, pack_int4_to_int32, unpack_int8_pairs_to_int4,
                                      unpack_int32_to_int4)

SETTINGS = settings(max_examples=40, deadline=None)


def signed32(word: int) -> int:
    """An unsigned 32-bit pattern as the int32 torch stores."""
    return word - 2**32 if word >= 2**31 else word


def signed8(byte: int) -> int:
    return byte - 256 if byte >= 128 else byte


def reference_pack_int32(values: np.ndarray) -> np.ndarray:
    """Element 8j+t of the last axis in bits 4t..4t+3 of word j, built with Python ints."""
    flat = values.reshape(-1, values.shape[-1])
    words = np.empty((flat.shape[0], flat.shape[1] // 8), dtype=np.int64)
    for r, row in enumerate(flat):
        for j in range(flat.shape[1] // 8):
            word = 0
            for t in range(8):
                word |= (int(row[8 * j + t]) & 0xF) << (4 * t)
            words[r, j] = signed32(word)
    return words.reshape(*values.shape[:-1], values.shape[-1] // 8).astype(np.int32)


# ---------------------------------------------------------------------------------------------
# golden values


def test_int4_range_constants():
    assert (INT4_MIN, INT4_MAX) == (-8, 7)


@pytest.mark.parametrize("values, word", [
    # nibbles low->high: 1 2 3 4 5 6 7 8(-8 = 0b1000); read high->low: 0x87654321, top bit set -> negative
    ([1, 2, 3, 4, 5, 6, 7, -8], 0x87654321 - 2**32),
    # every nibble 0xF -> 0xFFFFFFFF -> int32 -1
    ([-1] * 8, -1),
    # nibbles low->high: 0 F 7 8 3 D B 2 (-1=F, -8=8, -3=D, -5=B); word 0x2BD387F0 (positive)
    ([0, -1, 7, -8, 3, -3, -5, 2], 0x2BD387F0),
    # nibbles low->high: 7 0 0 0 0 0 0 0 -> 0x00000007
    ([7, 0, 0, 0, 0, 0, 0, 0], 7),
    # only the top nibble: -8 -> 0x80000000 = int32 min
    ([0, 0, 0, 0, 0, 0, 0, -8], -(2**31)),
    # top nibble 7, rest 0 -> 0x70000000 (int32 positive 1879048192)
    ([0, 0, 0, 0, 0, 0, 0, 7], 0x70000000),
    # nibbles low->high: 8 7 8 7 8 7 8 7 -> 0x78787878
    ([-8, 7] * 4, 0x78787878),
])
def test_pack_int4_to_int32_golden_words(values, word):
    packed = pack_int4_to_int32(torch.tensor([values], dtype=torch.int8))
    assert packed.dtype == torch.int32
    assert packed.shape == (1, 1)
    assert int(packed[0, 0]) == word
    assert unpack_int32_to_int4(packed).tolist() == [values]


def test_pack_int4_to_int32_golden_two_words_two_rows():
    values = torch.tensor([
        [1, 2, 3, 4, 5, 6, 7, -8, -1, -1, -1, -1, -1, -1, -1, -1],
        [0, -1, 7, -8, 3, -3, -5, 2, 0, 0, 0, 0, 0, 0, 0, 1],  # second word: 0x10000000
    ], dtype=torch.int8)
    packed = pack_int4_to_int32(values)
    assert packed.tolist() == [[0x87654321 - 2**32, -1], [0x2BD387F0, 0x10000000]]
    # int64 / int32 inputs give the same words as int8
    assert torch.equal(pack_int4_to_int32(values.to(torch.int64)), packed)
    assert torch.equal(pack_int4_to_int32(values.to(torch.int32)), packed)


@pytest.mark.parametrize("values, byte", [
    ([1, 2], 0x21),            # low nibble = element 0 (1), high nibble = element 1 (2)
    ([3, 4], 0x43),
    ([-8, 7], 0x78),           # low 8 (=-8), high 7
    ([7, -8], signed8(0x87)),  # low 7, high 8 -> 0x87 = int8 -121
    ([-1, -1], -1),            # 0xFF
    ([0, -1], signed8(0xF0)),  # -16
    ([-1, 0], 0x0F),           # 15
    ([0, 0], 0),
    ([-3, 5], 0x5D),           # -3 = 0xD low, 5 high
])
def test_pack_int4_to_int8_pairs_golden_bytes(values, byte):
    packed = pack_int4_to_int8_pairs(torch.tensor(values, dtype=torch.int8))
    assert packed.dtype == torch.int8
    assert packed.tolist() == [byte]
    assert unpack_int8_pairs_to_int4(packed).tolist() == values


def test_pack_int4_to_int8_pairs_golden_row_and_dim0():
    row = torch.tensor([1, 2, 3, 4, -8, 7, -1, 0], dtype=torch.int8)
    assert pack_int4_to_int8_pairs(row).tolist() == [0x21, 0x43, 0x78, 0x0F]
    # along dim 0 (msModelSlim "1.0.0" packs the output dimension): column-wise pairs
    column = row.reshape(8, 1).repeat(1, 3)
    column[:, 2] = -column[:, 2].clamp(min=-7)  # a different third column
    packed = pack_int4_to_int8_pairs(column, dim=0)
    assert packed.shape == (4, 3)
    assert packed[:, 0].tolist() == [0x21, 0x43, 0x78, 0x0F]
    assert packed[:, 1].tolist() == [0x21, 0x43, 0x78, 0x0F]
    # third column values: -1 -2 -3 -4 7 -7 1 0 -> bytes 0xEF 0xCD 0x97 0x01
    assert column[:, 2].tolist() == [-1, -2, -3, -4, 7, -7, 1, 0]
    assert packed[:, 2].tolist() == [signed8(0xEF), signed8(0xCD), signed8(0x97), 0x01]
    assert torch.equal(unpack_int8_pairs_to_int4(packed, dim=0), column)


def test_pair_bytes_viewed_as_int32_are_the_kernel_word():
    # [1..7,-8] as pairs: 0x21 0x43 0x65 0x87 -> little-endian int32 0x87654321
    pairs = pack_int4_to_int8_pairs(torch.tensor([[1, 2, 3, 4, 5, 6, 7, -8]], dtype=torch.int8))
    assert pairs.tolist() == [[0x21, 0x43, 0x65, signed8(0x87)]]
    assert int8_pairs_to_int32(pairs).tolist() == [[0x87654321 - 2**32]]
    assert int32_to_int8_pairs(torch.tensor([[0x2BD387F0]], dtype=torch.int32)).tolist() == [
        [signed8(0xF0), signed8(0x87), signed8(0xD3), signed8(0x2B)]]


def test_unpack_sign_extends_every_nibble():
    every = torch.arange(-8, 8, dtype=torch.int8)  # 16 values = two words
    words = pack_int4_to_int32(every.reshape(1, 16))
    # -8..-1 -> nibbles 8..F: 0xFEDCBA98; 0..7 -> 0x76543210
    assert words.tolist() == [[0xFEDCBA98 - 2**32, 0x76543210]]
    assert unpack_int32_to_int4(words).tolist() == [every.tolist()]
    assert unpack_int32_to_int4(words).dtype == torch.int8


# ---------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("last", [1, 4, 7, 9, 12, 20])
def test_pack_int4_to_int32_rejects_last_dim_not_multiple_of_8(last):
    with pytest.raises(ValueError, match=rf"last dimension {last} is not a multiple of 8"):
        pack_int4_to_int32(torch.zeros(3, last, dtype=torch.int8))


@pytest.mark.parametrize("last", [1, 2, 3, 6, 10])
def test_int8_pairs_to_int32_rejects_last_dim_not_multiple_of_4(last):
    with pytest.raises(ValueError, match=rf"last dimension {last} .* not a multiple of 4"):
        int8_pairs_to_int32(torch.zeros(2, last, dtype=torch.int8))


def test_pair_pack_rejects_odd_dimension():
    with pytest.raises(ValueError, match="odd dimension of 5"):
        pack_int4_to_int8_pairs(torch.zeros(4, 5, dtype=torch.int8))
    with pytest.raises(ValueError, match="odd dimension of 3"):
        pack_int4_to_int8_pairs(torch.zeros(3, 4, dtype=torch.int8), dim=0)


# ---------------------------------------------------------------------------------------------
# properties


def int4_arrays(shape_strategy):
    return shape_strategy.flatmap(lambda shape: hnp.arrays(np.int8, shape, elements=st.integers(-8, 7)))


def shapes_ending_in_multiple_of(m: int):
    """1-D to 4-D shapes (leading dims of 1..5, odd and non-square) whose last dim is a multiple of m."""
    return st.tuples(st.lists(st.integers(1, 5), min_size=0, max_size=3),
                     st.integers(1, 6)).map(lambda t: (*t[0], t[1] * m))


@SETTINGS
@given(int4_arrays(shapes_ending_in_multiple_of(8)))
def test_pack_int32_matches_reference_and_round_trips(values):
    t = torch.from_numpy(values)
    words = pack_int4_to_int32(t)
    assert words.dtype == torch.int32
    assert words.shape == (*values.shape[:-1], values.shape[-1] // 8)
    assert np.array_equal(words.numpy(), reference_pack_int32(values))
    back = unpack_int32_to_int4(words)
    assert back.dtype == torch.int8
    assert torch.equal(back, t)


@SETTINGS
@given(st.data())
def test_pair_pack_round_trips_along_any_dim(data):
    ndim = data.draw(st.integers(1, 4))
    dim = data.draw(st.integers(-ndim, ndim - 1))
    shape = [data.draw(st.integers(1, 5)) for _ in range(ndim)]
    shape[dim] = 2 * data.draw(st.integers(1, 5))
    values = data.draw(hnp.arrays(np.int8, tuple(shape), elements=st.integers(-8, 7)))
    t = torch.from_numpy(values)
    pairs = pack_int4_to_int8_pairs(t, dim=dim)
    expected_shape = list(shape)
    expected_shape[dim] //= 2
    assert list(pairs.shape) == expected_shape
    assert pairs.dtype == torch.int8
    # byte j = element 2j in the low nibble, 2j+1 in the high nibble, along dim
    moved = np.moveaxis(values.astype(np.int64), dim, -1)
    ref = ((moved[..., 0::2] & 0xF) | ((moved[..., 1::2] & 0xF) << 4))
    ref = np.where(ref >= 128, ref - 256, ref).astype(np.int8)
    assert np.array_equal(np.moveaxis(pairs.numpy(), dim, -1), ref)
    assert torch.equal(unpack_int8_pairs_to_int4(pairs, dim=dim), t)


@SETTINGS
@given(st.tuples(st.lists(st.integers(1, 4), max_size=2), st.integers(1, 5)).flatmap(
    lambda t: hnp.arrays(np.int8, (*t[0], 4 * t[1]), elements=st.integers(-128, 127))))
def test_both_packing_routes_agree(pairs):
    """Any pair-packed byte row viewed as int32 is exactly pack_int4_to_int32 of its values."""
    p = torch.from_numpy(pairs)
    values = unpack_int8_pairs_to_int4(p)
    assert int(values.min()) >= -8 and int(values.max()) <= 7
    words = int8_pairs_to_int32(p)
    assert torch.equal(words, pack_int4_to_int32(values))
    assert torch.equal(int32_to_int8_pairs(words), p)
    assert torch.equal(unpack_int32_to_int4(words), values)


@SETTINGS
@given(int4_arrays(st.tuples(st.integers(1, 6).map(lambda n: 8 * n), st.integers(1, 7))))
def test_pack_of_transposed_view_equals_pack_of_contiguous(values):
    """The converters pack `weight.t()` (a non-contiguous view) directly."""
    t = torch.from_numpy(values)
    assert not t.t().is_contiguous() or 1 in t.shape
    assert torch.equal(pack_int4_to_int32(t.t()), pack_int4_to_int32(t.t().contiguous()))
    pairs = pack_int4_to_int8_pairs(t, dim=0)  # [out/2, in], as "1.0.0" stores it
    assert torch.equal(int8_pairs_to_int32(pairs.t().contiguous()), pack_int4_to_int32(t.t()))
