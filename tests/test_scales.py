"""int64 scale encoding (fp32 bits in the low word, zero high word) and the fp16-rounded fusion of
per-channel and per-group scales, against golden values and an independent numpy computation."""
from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from w4a8conv.transforms.scales import (decode_int64_to_fp32, encode_fp32_bits_as_int64, fuse_group_scales_fp16,
                                        high_words_are_zero, round_to_dtype)

SETTINGS = settings(max_examples=60, deadline=None)


def fp32_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def bits_of(t: torch.Tensor) -> np.ndarray:
    """fp32 tensor -> its bit patterns as uint32 (so NaNs compare by payload)."""
    return t.to(torch.float32).contiguous().numpy().view(np.uint32)


# ---------------------------------------------------------------------------------------------
# golden encodings


@pytest.mark.parametrize("value, encoded", [
    (1.0, 0x3F800000),                 # 1065353216
    (-2.0, 0xC0000000),                # sign bit stays in bit 31: positive int64 3221225472
    (0.0, 0),
    (-0.0, 0x80000000),                # 2147483648
    (0.5, 0x3F000000),
    (65504.0, 0x477FE000),             # fp16 max
    (float("inf"), 0x7F800000),
    (float("-inf"), 0xFF800000),
    (2.0 ** -149, 0x00000001),         # smallest fp32 subnormal
    (-(2.0 ** -149), 0x80000001),
])
def test_encode_golden(value, encoded):
    out = encode_fp32_bits_as_int64(torch.tensor([value], dtype=torch.float32))
    assert out.dtype == torch.int64
    assert out.tolist() == [encoded]
    assert int(out[0]) >> 32 == 0
    assert bits_of(decode_int64_to_fp32(out)).tolist() == [fp32_bits(value)]


def test_encode_minus_two_is_positive_3221225472():
    out = encode_fp32_bits_as_int64(torch.tensor([[-2.0, 1.0]]))
    assert out.tolist() == [[3221225472, 1065353216]]
    assert out.shape == (1, 2)
    assert bool((out > 0).all())


def test_encode_takes_fp16_and_bf16_inputs_as_their_fp32_value():
    half = torch.tensor([1.0, -2.0, 0.1], dtype=torch.float16)
    expected = [fp32_bits(float(v)) for v in half.to(torch.float32).tolist()]
    assert encode_fp32_bits_as_int64(half).tolist() == expected
    bf = torch.tensor([3.0, -0.375], dtype=torch.bfloat16)
    assert encode_fp32_bits_as_int64(bf).tolist() == [0x40400000, 0xBEC00000]


def test_encode_keeps_shape_of_3d_non_contiguous_input():
    x = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4).transpose(1, 2) - 7.5
    out = encode_fp32_bits_as_int64(x)
    assert out.shape == (2, 4, 3)
    expected = np.vectorize(fp32_bits, otypes=[np.int64])(x.numpy().astype(np.float64))
    assert np.array_equal(out.numpy(), expected)


def test_high_words_are_zero():
    enc = encode_fp32_bits_as_int64(torch.tensor([1.0, -2.0, float("nan"), -0.0]))
    assert high_words_are_zero(enc) is True
    assert high_words_are_zero(enc + (1 << 32)) is False
    assert high_words_are_zero(torch.tensor([0, 0, -1], dtype=torch.int64)) is False  # sign-extended
    assert high_words_are_zero(torch.tensor([2**31, 2**32 - 1], dtype=torch.int64)) is True
    assert high_words_are_zero(torch.tensor([2**32], dtype=torch.int64)) is False
    with_high = enc.clone()
    with_high[1] |= 7 << 40
    assert high_words_are_zero(with_high) is False


def test_decode_ignores_the_high_word():
    x = torch.tensor([1.0, -2.0, 3.5e-3, -7.25])
    enc = encode_fp32_bits_as_int64(x)
    dirty = enc | (0x1234 << 32)
    assert np.array_equal(bits_of(decode_int64_to_fp32(dirty)), bits_of(x))
    assert decode_int64_to_fp32(dirty).dtype == torch.float32


@SETTINGS
@given(st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True),
                min_size=1, max_size=40))
def test_encode_decode_round_trip_floats(values):
    x = torch.tensor(values, dtype=torch.float32)
    enc = encode_fp32_bits_as_int64(x)
    assert enc.dtype == torch.int64
    assert high_words_are_zero(enc)
    assert bool(((enc >= 0) & (enc < 2**32)).all())
    assert np.array_equal(enc.numpy(), bits_of(x).astype(np.int64))
    assert np.array_equal(bits_of(decode_int64_to_fp32(enc)), bits_of(x))


@SETTINGS
@given(st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=40))
def test_encode_decode_round_trip_every_bit_pattern(patterns):
    """Every fp32 bit pattern (negatives, subnormals, infs, NaN payloads) survives by bits."""
    x = torch.from_numpy(np.array(patterns, dtype=np.uint32).view(np.float32).copy())
    enc = encode_fp32_bits_as_int64(x)
    assert enc.tolist() == patterns
    assert high_words_are_zero(enc)
    assert bits_of(decode_int64_to_fp32(enc)).tolist() == patterns


# ---------------------------------------------------------------------------------------------
# fused per-group scales


def numpy_fused(channel: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Independent: fp32 product, [K/G, N], rounded to fp16 and back to fp32."""
    product = channel.astype(np.float32).reshape(1, -1) * group.astype(np.float32).T
    assert product.dtype == np.float32
    with np.errstate(over="ignore"):  # products past 65504 become inf, as in torch
        return product.astype(np.float16).astype(np.float32)


@pytest.mark.parametrize("n, groups", [(24, 5), (8, 1), (40, 12), (3, 7)])
def test_fuse_group_scales_matches_numpy(n, groups):
    rng = np.random.default_rng(n * 100 + groups)
    channel = (rng.uniform(1e-3, 3e-2, size=(n, 1))).astype(np.float32)
    group = (rng.uniform(0.2, 5.0, size=(n, groups))).astype(np.float32)
    got = fuse_group_scales_fp16(torch.from_numpy(channel), torch.from_numpy(group))
    assert got.dtype == torch.float32
    assert got.shape == (groups, n)
    expected = numpy_fused(channel, group)
    assert np.array_equal(bits_of(got), expected.view(np.uint32))
    # the rounding is real: the unrounded fp32 product differs somewhere
    unrounded = channel.reshape(1, -1) * group.T
    assert not np.array_equal(unrounded, expected)


def test_fuse_group_scales_fp16_edge_values():
    # products that land on fp16 subnormals, on the fp16 max, and past it (inf)
    channel = np.array([[1e-4], [1.0], [300.0]], dtype=np.float32)
    group = np.array([[1e-3, 0.5], [65504.0, 65519.0], [300.0, 0.0]], dtype=np.float32)
    got = fuse_group_scales_fp16(torch.from_numpy(channel), torch.from_numpy(group))
    expected = numpy_fused(channel, group)
    assert np.array_equal(bits_of(got), expected.view(np.uint32))
    assert float(got[0, 1]) == 65504.0
    assert float(got[1, 1]) == 65504.0  # 65519 rounds down to fp16 max
    assert np.isinf(float(got[0, 2]))   # 90000 overflows fp16
    assert float(got[1, 2]) == 0.0
    assert 0 < float(got[0, 0]) < 6.2e-5  # an fp16 subnormal, not flushed


def test_fuse_group_scales_accepts_half_precision_inputs():
    channel = torch.tensor([[0.0123], [0.0456]], dtype=torch.bfloat16)
    group = torch.tensor([[1.5, 2.25, 3.0], [0.75, 1.0, 1.25]], dtype=torch.float16)
    got = fuse_group_scales_fp16(channel, group)
    expected = numpy_fused(channel.to(torch.float32).numpy(), group.to(torch.float32).numpy())
    assert np.array_equal(bits_of(got), expected.view(np.uint32))


@SETTINGS
@given(st.integers(1, 33), st.integers(1, 17), st.integers(0, 2**31 - 1))
def test_fuse_group_scales_property(n, groups, seed):
    rng = np.random.default_rng(seed)
    channel = rng.uniform(1e-4, 1e-1, size=(n, 1)).astype(np.float32)
    group = rng.uniform(1e-2, 8.0, size=(n, groups)).astype(np.float32)
    got = fuse_group_scales_fp16(torch.from_numpy(channel), torch.from_numpy(group))
    assert got.shape == (groups, n)
    assert np.array_equal(bits_of(got), numpy_fused(channel, group).view(np.uint32))


def test_round_to_dtype():
    x = torch.tensor([1.0 + 2.0 ** -10, 1.0 + 2.0 ** -9, 0.1])
    # bf16 keeps 8 significand bits (ulp 2^-7 at 1): 1+2^-10 and 1+2^-9 both round to 1
    assert round_to_dtype(x, torch.bfloat16).tolist()[:2] == [1.0, 1.0]
    assert round_to_dtype(x, torch.float16).tolist()[:2] == [1.0 + 2.0 ** -10, 1.0 + 2.0 ** -9]
    assert round_to_dtype(x, torch.float16)[2].item() == float(np.float32(np.float16(0.1)))
    assert round_to_dtype(x, torch.float16).dtype == torch.float32
    assert torch.equal(round_to_dtype(x, torch.float32), x)
