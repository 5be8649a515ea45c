"""The MSD bias 8·Σ_k W·s2·s1 per chunk of the input dimension, against float64 numpy."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from w4a8conv.transforms.bias import msd_bias_chunks


def reference(values: np.ndarray, channel: np.ndarray, group: np.ndarray | None, chunks: int) -> np.ndarray:
    """float64, written per element: 8 * sum over chunk c of W[n, k] * s2[n, k // G] * s1[n]."""
    n, k = values.shape
    if group is None:
        per_k = np.ones((n, k))
    else:
        g = k // group.shape[1]
        per_k = np.repeat(group.astype(np.float64), g, axis=1)  # s2 of k's group, for every k
    terms = values.astype(np.float64) * per_k * channel.astype(np.float64).reshape(n, 1)
    width = k // chunks
    return np.stack([8 * terms[:, c * width:(c + 1) * width].sum(axis=1) for c in range(chunks)], axis=1)


def magnitude(values, channel, group, chunks) -> np.ndarray:
    """8·Σ|W·s2·s1| per chunk: the scale fp32 rounding error is relative to."""
    return reference(np.abs(values), np.abs(channel), None if group is None else np.abs(group), chunks)


def make(seed: int, n: int, k: int, groups: int | None):
    rng = np.random.default_rng(seed)
    values = rng.integers(-8, 8, size=(n, k)).astype(np.int8)
    channel = rng.uniform(2e-3, 2e-2, size=(n, 1)).astype(np.float32)
    group = None if groups is None else rng.uniform(0.25, 4.0, size=(n, groups)).astype(np.float32)
    return values, channel, group


def run(values, channel, group, chunks) -> torch.Tensor:
    return msd_bias_chunks(torch.from_numpy(values), torch.from_numpy(channel),
                           None if group is None else torch.from_numpy(group), chunks)


def assert_close_to_reference(got: torch.Tensor, values, channel, group, chunks):
    expected = reference(values, channel, group, chunks)
    assert got.dtype == torch.float32
    assert got.shape == expected.shape
    tol = 1e-5 * magnitude(values, channel, group, chunks) + 1e-12
    err = np.abs(got.numpy().astype(np.float64) - expected)
    worst = np.unravel_index(np.argmax(err - tol), err.shape)
    assert (err <= tol).all(), f"error {err[worst]} > tolerance {tol[worst]} at {worst}"


# (n, k, groups): groups None = per-channel. Chunk widths smaller than, equal to and larger than
# the group width; non-square everywhere.
CASES = [
    (24, 256, 8),      # G=32, chunk width 16 at 16 chunks (2 chunks per group)
    (40, 128, 32),     # G=4, chunk width 8 (a chunk spans two groups)
    (8, 64, 4),        # G=16 = chunk width 4 x 4
    (24, 256, None),   # per-channel
    (16, 48, None),
    (56, 512, 2),      # G=256
]


@pytest.mark.parametrize("chunks", [1, 16])
@pytest.mark.parametrize("n, k, groups", CASES)
def test_matches_float64_reference(n, k, groups, chunks):
    values, channel, group = make(n + k, n, k, groups)
    got = run(values, channel, group, chunks)
    assert got.shape == (n, chunks)
    assert_close_to_reference(got, values, channel, group, chunks)


@pytest.mark.parametrize("n, k, groups", CASES)
def test_chunk_sums_add_up_to_the_single_chunk(n, k, groups):
    values, channel, group = make(7 * n + k, n, k, groups)
    one = run(values, channel, group, 1)
    sixteen = run(values, channel, group, 16)
    assert one.shape == (n, 1) and sixteen.shape == (n, 16)
    tol = 2e-5 * magnitude(values, channel, group, 1)[:, 0] + 1e-12
    diff = (sixteen.to(torch.float64).sum(dim=1) - one[:, 0].to(torch.float64)).abs().numpy()
    assert (diff <= tol).all()
    # and the chunks are really different slices, not 16 copies of one sum / 16
    assert not torch.allclose(sixteen[:, 0], sixteen[:, 1])


def test_hand_computed_small_case():
    # n=2, k=8, G=4 (2 groups), 2 chunks of 4 = one chunk per group
    values = np.array([[1, 2, 3, 4, -1, -2, -3, -4],
                       [7, -8, 0, 0, 1, 1, 1, 1]], dtype=np.int8)
    channel = np.array([[0.5], [0.25]], dtype=np.float32)
    group = np.array([[2.0, 4.0], [1.0, 0.5]], dtype=np.float32)
    got = run(values, channel, group, 2)
    # row 0: 8·(1+2+3+4)·2·0.5 = 80 ; 8·(-10)·4·0.5 = -160
    # row 1: 8·(7-8)·1·0.25 = -2   ; 8·4·0.5·0.25 = 4
    assert got.tolist() == [[80.0, -160.0], [-2.0, 4.0]]
    assert run(values, channel, group, 1).tolist() == [[-80.0], [2.0]]
    # per-channel: 8·Σ W·s1 -> row 0: 8·0·0.5 = 0 ; row 1: 8·3·0.25 = 6
    assert run(values, channel, None, 1).tolist() == [[0.0], [6.0]]
    assert run(values, channel, None, 2).tolist() == [[40.0, -40.0], [-2.0, 8.0]]


def test_rejects_chunks_that_do_not_divide_k():
    values, channel, group = make(1, 4, 24, 3)
    with pytest.raises(ValueError, match="input dimension 24 does not split into 16 chunks"):
        run(values, channel, group, 16)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 20), st.sampled_from([16, 32, 64, 128]), st.sampled_from([None, 1, 2, 4, 8]),
       st.sampled_from([1, 2, 4, 16]), st.integers(0, 2**31 - 1))
def test_property_against_reference(n, k, groups, chunks, seed):
    if groups is not None and k % groups:
        groups = 1
    values, channel, group = make(seed, n, k, groups)
    got = run(values, channel, group, chunks)
    assert_close_to_reference(got, values, channel, group, chunks)
