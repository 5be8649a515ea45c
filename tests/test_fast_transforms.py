"""The fast transforms (compiled kernels, two-step byte transpose, blocked pair packing, row-blocked bias sums, reused
workspace buffers, results written into a caller's buffer) give bit for bit what the plain formulas
they replaced give, on random shapes and values, odd sizes and block boundaries included."""
from __future__ import annotations

from unittest import mock

import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from w4a8conv.constants import DOWN_BIAS_CHUNKS
from w4a8conv.transforms import MOE_SPECS, LINEAR_SPECS
from w4a8conv.transforms import bias as bias_module
from w4a8conv.transforms import int4, kernels
from w4a8conv.transforms.bias import msd_bias_chunks
from w4a8conv.transforms.int4 import (kernel_words_from_pairs, kernel_words_from_values, pack_int4_rows_to_pairs,
                                      transpose_bytes)
from w4a8conv.transforms.rules import int4_range_violation
from w4a8conv.transforms.workspace import Workspace

SETTINGS = settings(max_examples=40, deadline=None)


# The formulas the fast paths replaced, kept here as the definition they must reproduce.

def plain_pack_rows(values: torch.Tensor) -> torch.Tensor:
    low, high = values[0::2].to(torch.int8), values[1::2].to(torch.int8)
    return ((low & 0xF) | (high << 4)).contiguous()


def plain_bias(values: torch.Tensor, channel: torch.Tensor, group: torch.Tensor | None, chunks: int) -> torch.Tensor:
    n, k = values.shape
    weighted = values.to(torch.float32)
    if group is not None:
        groups = group.shape[1]
        weighted = (weighted.reshape(n, groups, k // groups)
                    * group.to(torch.float32).reshape(n, groups, 1)).reshape(n, k)
    weighted = weighted * channel.to(torch.float32).reshape(n, 1)
    return 8 * weighted.reshape(n, chunks, k // chunks).sum(dim=2)


def plain_int4_range_violation(values: torch.Tensor) -> str | None:
    shifted = values.numpy() + np.int8(8)
    bad = shifted.view(np.uint8) > 15
    if not bad.any():
        return None
    at = [int(i) for i in np.unravel_index(int(np.argmax(bad)), bad.shape)]
    return f"int4 value {int(values[tuple(at)])} at {at} outside [-8, 7]"


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def int8_matrices(max_rows: int = 40, max_cols: int = 48, elements=st.integers(-128, 127)):
    return st.tuples(st.integers(0, max_rows), st.integers(0, max_cols)).flatmap(
        lambda shape: hnp.arrays(np.int8, shape, elements=elements))


@pytest.fixture(scope="module")
def torch_one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@SETTINGS
@given(int8_matrices())
def test_transpose_bytes_equals_plain_transpose(matrix):
    t = torch.from_numpy(matrix)
    expected = t.t().contiguous()
    assert torch.equal(transpose_bytes(t), expected)
    workspace = Workspace()
    for _ in range(2):  # the reused word buffer holds the previous call's bytes
        assert torch.equal(transpose_bytes(t, workspace=workspace), expected)


@SETTINGS
@given(int8_matrices(), st.integers(0, 15), st.integers(0, 15))
def test_transpose_into_a_slice_of_a_larger_buffer(matrix, out_offset, in_offset):
    """The destination is a staging buffer's slice at any offset; the source may be unaligned too."""
    rows, cols = matrix.shape
    staging = torch.full((out_offset + rows * cols + 7,), 0x5A, dtype=torch.int8)
    source_buffer = torch.zeros(in_offset + rows * cols, dtype=torch.int8)
    source = source_buffer[in_offset:].view(rows, cols)
    source.copy_(torch.from_numpy(matrix))
    out = staging[out_offset:out_offset + rows * cols].view(cols, rows)
    got = transpose_bytes(source, out, Workspace())
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(out, torch.from_numpy(matrix).t().contiguous())
    untouched = torch.cat((staging[:out_offset], staging[out_offset + rows * cols:]))
    assert bool((untouched == 0x5A).all())


def test_transpose_bytes_at_expert_shapes(torch_one_thread):
    """DeepSeek-V3's gate/up ([1024, 7168] pairs) and down ([3584, 2048]) projections."""
    generator = torch.Generator().manual_seed(3)
    workspace = Workspace()
    for shape in ((1024, 7168), (3584, 2048), (3584, 2048)):
        matrix = torch.randint(-128, 128, shape, dtype=torch.int8, generator=generator)
        assert torch.equal(transpose_bytes(matrix, workspace=workspace), matrix.t().contiguous())


needs_kernels = pytest.mark.skipif(not kernels.AVAILABLE, reason=f"compiled kernels off: {kernels.NAME}")


def test_ci_has_the_compiled_kernels():
    """CI installs the extra `fast` (scripts/setup.sh): the kernel tests below must not skip there."""
    if os.environ.get("CI") and os.environ.get("W4A8CONV_KERNELS") != "numpy":
        assert kernels.AVAILABLE, kernels.NAME


def multiple_of_8_matrices():
    return st.tuples(st.integers(0, 12), st.integers(0, 12)).flatmap(
        lambda shape: hnp.arrays(np.int8, (8 * shape[0], 8 * shape[1]), elements=st.integers(-128, 127)))


@needs_kernels
@SETTINGS
@given(multiple_of_8_matrices(), st.sampled_from([0, 8, 16, 24]))
def test_compiled_transpose_equals_numpy_path_and_plain_transpose(matrix, out_offset):
    """The 8x8-word kernel and the two-step numpy path write the same bytes, partial 8-block tiles
    (sizes not a multiple of 64) and any 8-byte aligned slice of a staging buffer included."""
    rows, cols = matrix.shape
    t = torch.from_numpy(matrix)
    expected = t.t().contiguous()
    staging = torch.full((out_offset + rows * cols + 8,), 0x5A, dtype=torch.int8)
    out = staging[out_offset:out_offset + rows * cols].view(cols, rows)
    assert kernels.transpose_words(matrix, out.numpy()) == (rows * cols > 0)
    assert torch.equal(out, expected)
    assert bool((staging[out_offset + rows * cols:] == 0x5A).all()) and bool((staging[:out_offset] == 0x5A).all())
    with mock.patch.object(kernels, "AVAILABLE", False):
        assert torch.equal(transpose_bytes(t, workspace=Workspace()), expected)


def test_compiled_transpose_declines_what_it_cannot_do():
    """Sizes not a multiple of 8 and unaligned buffers go to the numpy path (the property tests above
    cover their bytes)."""
    assert not kernels.transpose_words(np.zeros((8, 12), np.int8), np.zeros((12, 8), np.int8))
    unaligned = np.zeros(8 * 8 + 1, np.int8)[1:].reshape(8, 8)
    assert not kernels.transpose_words(unaligned, np.zeros((8, 8), np.int8))


@needs_kernels
def test_compiled_kernels_at_expert_shapes(torch_one_thread):
    """DeepSeek-V3's gate/up and down projections, both version "1.0.0" pairs and version "0" values."""
    generator = torch.Generator().manual_seed(5)
    for shape in ((1024, 7168), (3584, 2048)):
        matrix = torch.randint(-128, 128, shape, dtype=torch.int8, generator=generator)
        out = np.empty(shape[::-1], np.int8)
        assert kernels.transpose_words(matrix.numpy(), out)
        assert torch.equal(torch.from_numpy(out), matrix.t().contiguous())
        values = torch.randint(-8, 8, (2 * shape[0], shape[1]), dtype=torch.int8, generator=generator)
        with mock.patch.object(kernels, "AVAILABLE", False):
            numpy_path = kernel_words_from_values(values, workspace=Workspace())
        assert same_bits(kernel_words_from_values(values, workspace=Workspace()), numpy_path)


@needs_kernels
@SETTINGS
@given(st.tuples(st.integers(0, 20).map(lambda n: 2 * n), st.integers(0, 40)).flatmap(
    lambda shape: hnp.arrays(np.int8, shape, elements=st.integers(-128, 127))))
def test_compiled_pair_packing_equals_numpy_path(values):
    """Every int8 value, out-of-range ones included (the high nibble wraps as the formula's does)."""
    t = torch.from_numpy(values)
    compiled = pack_int4_rows_to_pairs(t, workspace=Workspace())
    with mock.patch.object(kernels, "AVAILABLE", False):
        assert torch.equal(pack_int4_rows_to_pairs(t, workspace=Workspace()), compiled)
    assert torch.equal(compiled, plain_pack_rows(t))


def test_transpose_refuses_a_wrong_destination():
    with pytest.raises(ValueError, match=r"needs a contiguous int8 \[8, 4\] output"):
        transpose_bytes(torch.zeros(4, 8, dtype=torch.int8), torch.zeros(4, 8, dtype=torch.int8))


@SETTINGS
@given(st.tuples(st.integers(0, 20).map(lambda n: 2 * n), st.integers(0, 40)).flatmap(
    lambda shape: hnp.arrays(np.int8, shape, elements=st.integers(-128, 127))), st.sampled_from([1, 7, 64, 2**20]))
def test_pair_packing_equals_plain_formula(values, block_bytes):
    """Every int8 value (the wrap-around of out-of-range ones too), any number of row blocks."""
    t = torch.from_numpy(values)
    with mock.patch.object(int4, "_PACK_BLOCK_BYTES", block_bytes):
        assert torch.equal(pack_int4_rows_to_pairs(t), plain_pack_rows(t))
        assert torch.equal(pack_int4_rows_to_pairs(t, workspace=Workspace()), plain_pack_rows(t))


def test_pair_packing_refuses_odd_rows():
    with pytest.raises(ValueError, match="odd dimension of 3"):
        pack_int4_rows_to_pairs(torch.zeros(3, 4, dtype=torch.int8))


@SETTINGS
@given(st.tuples(st.integers(1, 6).map(lambda n: 8 * n), st.integers(1, 40)).flatmap(
    lambda shape: hnp.arrays(np.int8, shape, elements=st.integers(-8, 7))))
def test_kernel_words_equal_the_plain_route(values):
    """values [out, in] -> words [in, out/8]: pack rows, transpose, view; "1.0.0" pairs likewise."""
    t = torch.from_numpy(values)
    pairs = plain_pack_rows(t)
    expected = torch.empty(pairs.shape[::-1], dtype=torch.int8).copy_(pairs.t()).view(torch.int32)
    workspace = Workspace()
    assert torch.equal(kernel_words_from_values(t), expected)
    assert torch.equal(kernel_words_from_pairs(pairs), expected)
    out = torch.empty(pairs.numel(), dtype=torch.int8)
    for _ in range(2):
        words = kernel_words_from_values(t, out.view(t.shape[1], -1), workspace)
        assert torch.equal(words, expected) and words.data_ptr() == out.data_ptr()
        assert torch.equal(kernel_words_from_pairs(pairs, out.view(t.shape[1], -1), workspace), expected)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 24), st.sampled_from([16, 32, 64, 256]), st.sampled_from([None, 1, 2, 4, 8]),
       st.sampled_from([1, 2, 4, 16]), st.sampled_from([16, 100, 2**16]), st.sampled_from(["float32", "bfloat16"]),
       st.integers(0, 2**31 - 1))
def test_blocked_bias_equals_the_whole_matrix_formula(n, k, groups, chunks, block, dtype, seed):
    """Bit for bit, however the rows are blocked, with fp32 or bf16 scales, per group or per channel."""
    if groups is not None and k % groups:
        groups = 1
    generator = torch.Generator().manual_seed(seed)
    values = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=generator)
    channel = (torch.rand(n, 1, generator=generator) * 0.02).to(getattr(torch, dtype))
    group = None if groups is None else (torch.rand(n, groups, generator=generator) * 4).to(getattr(torch, dtype))
    expected = plain_bias(values, channel, group, chunks)
    with mock.patch.object(bias_module, "_BLOCK_ELEMENTS", block):
        assert same_bits(msd_bias_chunks(values, channel, group, chunks), expected)
        workspace = Workspace()
        for _ in range(2):
            assert same_bits(msd_bias_chunks(values, channel, group, chunks, workspace), expected)


def test_blocked_bias_at_expert_shapes(torch_one_thread):
    generator = torch.Generator().manual_seed(5)
    workspace = Workspace()
    for (n, k), groups, chunks in (((2048, 7168), 28, 1), ((7168, 2048), 8, DOWN_BIAS_CHUNKS),
                                   ((7168, 2048), None, DOWN_BIAS_CHUNKS)):
        values = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=generator)
        channel = torch.rand(n, 1, generator=generator).to(torch.bfloat16) * 0.01
        group = None if groups is None else torch.rand(n, groups, generator=generator) * 3
        assert same_bits(msd_bias_chunks(values, channel, group, chunks, workspace),
                         plain_bias(values, channel, group, chunks))


@SETTINGS
@given(int8_matrices(12, 12, st.sampled_from([-128, -9, -8, -1, 0, 7, 8, 127])))
def test_int4_range_rule_says_what_it_said(values):
    t = torch.from_numpy(values)
    assert int4_range_violation(t) == plain_int4_range_violation(t)


def test_workspace_roles_are_separate_aligned_and_reused():
    workspace = Workspace()
    a = workspace.array("a", (3, 5), np.int64)
    b = workspace.array("b", (7,), np.float32)
    assert a.ctypes.data % 64 == 0 and b.ctypes.data % 64 == 0
    a.fill(-1)
    b.fill(0)
    assert (a == -1).all()
    smaller = workspace.array("a", (2,), np.int8)
    assert smaller.ctypes.data == a.ctypes.data  # no new allocation for a request that fits
    larger = workspace.array("a", (100,), np.int64)
    assert larger.shape == (100,) and larger.ctypes.data % 64 == 0
    assert workspace.nbytes == 800 + 28


def _parts(spec, needs, out: int, inp: int, group: int, chunks: int, generator) -> dict[str, torch.Tensor]:
    parts = {}
    shapes = spec.scales.shapes(out, inp, group if spec.per_group else 0)
    for suffix in needs:
        if suffix == "weight":
            parts[suffix] = (torch.randint(-128, 128, (out // 2, inp), dtype=torch.int8, generator=generator)
                             if spec.packed_pairs else
                             torch.randint(-8, 8, (out, inp), dtype=torch.int8, generator=generator))
        elif suffix == "scale_bias":
            parts[suffix] = torch.randn(out, chunks, generator=generator)
        else:
            parts[suffix] = (torch.rand(shapes[suffix], generator=generator) + 0.1).to(torch.bfloat16)
    return parts


@pytest.mark.parametrize("variant", sorted(MOE_SPECS, key=str))
def test_every_moe_output_written_into_a_buffer_equals_the_allocating_call(variant):
    """Through the variant table as `produce` calls it: with a reused workspace and a destination
    buffer, every output's bytes are those of the plain call."""
    spec = MOE_SPECS[variant]
    generator = torch.Generator().manual_seed(11)
    workspace = Workspace()
    for out, inp, group, chunks in ((48, 64, 16, 1), (64, 48, 16, DOWN_BIAS_CHUNKS), (48, 64, 16, 1)):
        for name, output in spec.outputs.items():
            parts = _parts(spec, output.needs, out, inp, group, chunks, generator)
            expected = output.make(parts, chunks)
            buffer = torch.full((expected.numel() * expected.element_size(),), 0x33, dtype=torch.int8)
            got = output.make(parts, chunks, workspace, buffer)
            assert same_bits(got, expected), (variant, name)


@pytest.mark.parametrize("variant", sorted(LINEAR_SPECS, key=str))
def test_every_linear_output_written_into_a_buffer_equals_the_allocating_call(variant):
    spec = LINEAR_SPECS[variant]
    generator = torch.Generator().manual_seed(12)
    workspace = Workspace()
    for name, output in spec.outputs.items():
        for out, inp, group in ((64, 48, 16), (32, 96, 32)):
            parts = {}
            for suffix in output.needs:
                if suffix == "weight":
                    parts[suffix] = (torch.randint(-128, 128, (out // 2, inp), dtype=torch.int8, generator=generator)
                                     if spec.packed_pairs else
                                     torch.randint(-8, 8, (out, inp), dtype=torch.int8, generator=generator))
                elif suffix == "weight_scale_second":
                    parts[suffix] = torch.rand(out, inp // group, generator=generator) + 0.1
                elif suffix == "scale_bias":
                    parts[suffix] = torch.randn(out, 1, generator=generator)
                else:
                    parts[suffix] = torch.rand(out, 1, generator=generator) * 0.01
            expected = output.make(parts, torch.bfloat16)
            buffer = torch.empty(expected.numel() * expected.element_size(), dtype=torch.int8)
            assert same_bits(output.make(parts, torch.bfloat16, workspace, buffer), expected), (variant, name)
