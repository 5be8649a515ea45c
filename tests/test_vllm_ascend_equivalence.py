"""The converter's output equals, bit for bit, what vllm-ascend 0.11.0 itself holds after loading.

The reference is vllm-ascend's own `process_weights_after_loading`, executed on the CPU by
`vllm_ascend_harness` from the published wheel (downloaded at test time into a cache outside the
repository). Without the wheel these tests skip, or fail when $CI is set.
"""
from __future__ import annotations

import re
import struct

import pytest
import torch

from w4a8conv.runtime import NpuReadyCheckpoint

try:
    import vllm_ascend_harness as harness
    from cases import LINEAR_CASES, MOE_CASES, split_allowed
except ImportError:  # tests/ imported as a package
    from tests import vllm_ascend_harness as harness
    from tests.cases import LINEAR_CASES, MOE_CASES, split_allowed

SOURCE_TYPE = "W4A8_DYNAMIC"
BIAS_RTOL = 1e-5  # of max |bias|: fp32 sums in another order differ in the last bits
SHOWN = 6         # differing elements listed in a failure message


# --------------------------------------------------------------------------------------------
# Fixtures and cases


def _expected_modules(source: harness.SourceCheckpoint) -> tuple[set[str], set[str]]:
    """The W4A8_DYNAMIC MoE blocks and Linear layers of a source checkpoint, from its description."""
    moe, linear = set(), set()
    for name, kind in source.description.items():
        if kind != SOURCE_TYPE or not name.endswith(".weight"):
            continue
        match = re.match(r"(.*)\.experts\.\d+\.[^.]+\.weight$", name)
        if match:
            moe.add(match.group(1))
        else:
            linear.add(name[: -len(".weight")])
    return moe, linear


def _open(converted, name: str):
    source_dir, out_dir = converted(name)
    source = harness.SourceCheckpoint(source_dir)
    ck = NpuReadyCheckpoint.open(out_dir)
    moe, linear = _expected_modules(source)
    stamped = {kind: {p for p, m in ck.stamp.modules.items() if m.kind == kind} for kind in ("moe", "linear")}
    assert stamped["moe"] == moe, f"{name}: converted MoE blocks {sorted(stamped['moe'])} != source's {sorted(moe)}"
    assert stamped["linear"] == linear, (f"{name}: converted Linear layers {sorted(stamped['linear'])} "
                                         f"!= source's {sorted(linear)}")
    return source_dir, source, ck


# --------------------------------------------------------------------------------------------
# Comparison with located, bit-level failure messages


def _int4s(word: int) -> list[int]:
    return [((word >> (4 * t)) & 0xF) - 16 * (((word >> (4 * t)) & 0xF) >= 8) for t in range(8)]


def _f32(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits & 0xFFFFFFFF))[0]


def _show_int(value: int, dtype: torch.dtype) -> str:
    if dtype == torch.int32:  # 8 packed int4
        return f"0x{value & 0xFFFFFFFF:08x} int4 {_int4s(value)}"
    if dtype == torch.int64:  # fp32 scale bits in the low half
        word = value & 0xFFFFFFFFFFFFFFFF
        return f"0x{word:016x} (low fp32 {_f32(word):.9g}, high 0x{word >> 32:08x})"
    return f"{value} (0x{value & 0xFF:02x})"


def _diff_bits(got: int, want: int, dtype: torch.dtype) -> str:
    xor = (got ^ want) & ((1 << (8 * (torch.iinfo(dtype).bits // 8))) - 1)
    text = f"xor 0x{xor:x}"
    if dtype == torch.int32:
        text += f", int4 nibbles {[t for t in range(8) if (xor >> (4 * t)) & 0xF]} differ"
    return text


def assert_ints_equal(got: torch.Tensor, want: torch.Tensor, what: str, where) -> None:
    """Integer tensors: same dtype, shape and bits; else name the first differing places."""
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype}, vllm-ascend holds {want.dtype}"
    assert tuple(got.shape) == tuple(want.shape), f"{what}: shape {tuple(got.shape)}, vllm-ascend {tuple(want.shape)}"
    if torch.equal(got, want):
        return
    places = (got != want).nonzero().tolist()
    lines = [f"  {where(tuple(i))}: got {_show_int(got[tuple(i)].item(), got.dtype)}, "
             f"vllm-ascend {_show_int(want[tuple(i)].item(), want.dtype)}; "
             f"{_diff_bits(got[tuple(i)].item(), want[tuple(i)].item(), got.dtype)}" for i in places[:SHOWN]]
    raise AssertionError(f"{what}: {len(places)} of {got.numel()} elements differ from vllm-ascend\n"
                         + "\n".join(lines))


def assert_floats_identical(got: torch.Tensor, want: torch.Tensor, what: str, where) -> None:
    """Floating tensors that must be bit-identical (compared through their bits, NaN-safe)."""
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype}, vllm-ascend holds {want.dtype}"
    assert got.dtype == torch.float32, f"{what}: expected fp32, got {got.dtype}"
    assert_ints_equal(got.contiguous().view(torch.int32), want.contiguous().view(torch.int32), what,
                      lambda i: f"{where(i)} [{got[i].item():.9g} vs {want[i].item():.9g}]")


def assert_bias_close(got: torch.Tensor, want: torch.Tensor, what: str, where, rtol: float = BIAS_RTOL) -> None:
    """fp32 biases: within rtol x max|want| of the reference everywhere."""
    assert got.dtype == torch.float32, f"{what}: dtype {got.dtype}, expected float32"
    assert tuple(got.shape) == tuple(want.shape), f"{what}: shape {tuple(got.shape)}, reference {tuple(want.shape)}"
    assert bool(torch.isfinite(want).all()), f"{what}: the reference is not finite"
    bad_values = (~torch.isfinite(got)).nonzero().tolist()
    assert not bad_values, f"{what}: non-finite values at {[where(tuple(i)) for i in bad_values[:SHOWN]]}"
    tolerance = rtol * want.double().abs().max().item()
    error = (got.double() - want.double()).abs()
    if error.max().item() <= tolerance:
        return
    places = (error > tolerance).nonzero().tolist()
    places.sort(key=lambda i: -error[tuple(i)].item())
    lines = [f"  {where(tuple(i))}: got {got[tuple(i)].item():.9g} "
             f"(0x{got[tuple(i)].view(torch.int32).item() & 0xFFFFFFFF:08x}), "
             f"reference {want[tuple(i)].item():.9g}, |diff| {error[tuple(i)].item():.3g}" for i in places[:SHOWN]]
    raise AssertionError(f"{what}: {len(places)} of {got.numel()} values off by more than {tolerance:.3g} "
                         f"({rtol:g} x max|bias|); worst first\n" + "\n".join(lines))


class MoeWhere:
    """Turns an index of one rank's MoE tensor into words: expert, source projection, row, column."""

    def __init__(self, projections, tp_rank: int, part: int, first_expert: int, group_size: int):
        self.gate, self.up, self.down = projections
        self.tp_rank, self.part, self.first, self.group = tp_rank, part, first_expert, group_size

    def _gate_up(self, column: int) -> str:
        proj = self.gate if column < self.part else self.up
        return f"{proj} row {self.tp_rank * self.part + column % self.part}"

    def __call__(self, key: str, index: tuple) -> str:
        text = f"expert {self.first + index[0]}"

        def k_global(k: int) -> int:  # down_proj input column of the rank's k
            return self.tp_rank * self.part + k

        if key == "w13_weight":
            _, h, word = index
            return f"{text}, input {h}, word {word} = {self._gate_up(8 * word)}..+7"
        if key == "w2_weight":
            _, k, word = index
            return f"{text}, {self.down} input {k_global(k)}, word {word} = output rows {8 * word}..{8 * word + 7}"
        if key == "w13_weight_scale":
            _, g, n = index
            span = f"inputs {g * self.group}..{(g + 1) * self.group - 1}" if self.group else "per channel"
            return f"{text}, {span}, {self._gate_up(n)}"
        if key == "w2_weight_scale":
            _, g, n = index
            span = (f"inputs {k_global(g * self.group)}..{k_global((g + 1) * self.group - 1)}" if self.group
                    else "per channel")
            return f"{text}, {self.down} {span}, output row {n}"
        if key == "w13_scale_bias":
            return f"{text}, {self._gate_up(index[1])}"
        if key == "w2_scale_bias":
            return f"{text}, {self.down} output row {index[1]}"
        return f"{text}, index {index}"


def linear_where(key: str, index: tuple) -> str:
    if key == "weight":
        return f"input {index[0]}, word {index[1]} = outputs {8 * index[1]}..{8 * index[1] + 7}"
    if key == "weight_scale_second":
        return f"group {index[0]}, output {index[1]}"
    if len(index) == 2:
        return f"output {index[0]}, chunk {index[1]}"
    return f"output {index[0]}" if index else "scalar"


# --------------------------------------------------------------------------------------------
# The harness itself


def test_int4_pack_stand_in_matches_hand_computed_words():
    # Value 8j+t sits in bits 4t..4t+3: nibbles 1..7 then 0x8 (-8) read 0x87654321 high to low.
    values = torch.tensor([[1, 2, 3, 4, 5, 6, 7, -8, -1, -1, -1, -1, -1, -1, -1, -1],
                           [7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, -8]], dtype=torch.int32)
    packed = harness.npu_convert_weight_to_int4pack(values)
    assert packed.dtype == torch.int32 and tuple(packed.shape) == (2, 2)
    assert packed.tolist() == [[0x87654321 - 2**32, -1], [7, -2**31]]


def test_npu_quantize_stand_in_rounds_half_to_even_and_clamps():
    # x * 2: 0.5, 1.5, 2.5, -0.5, -1.5, 7.6, -9, 3 -> rint 0, 2, 2, -0, -2, 8, -9, 3 -> clamp 7, -8
    # nibbles 0, 2, 2, 0, 0xE, 7, 8, 3 -> 0x387E0220 read high to low.
    x = torch.tensor([[0.25, 0.75, 1.25, -0.25, -0.75, 3.8, -4.5, 1.5]])
    packed = harness.npu_quantize(x, torch.tensor([2.0]), None, torch.quint4x2, -1, False)
    assert packed.tolist() == [[0x387E0220]]


def test_harness_reads_v0_and_v1_encodings_of_the_same_int4_data_alike(vllm_ascend_wheel, preset_source):
    """Version "0" goes through the npu_quantize stand-in, "1.0.0" through a byte view of the
    checkpoint: equal results mean the stand-in packs in the order the device format expects."""
    v0 = harness.SourceCheckpoint(preset_source("moe-group-v0"))
    v1 = harness.SourceCheckpoint(preset_source("moe-group-v1"))
    name = "model.layers.1.mlp.experts.3.down_proj.weight_scale_second"
    assert torch.equal(v0.tensor(name), v1.tensor(name)), "presets moe-group-v0/v1 no longer share their data"
    a = harness.moe_rank_tensors(v0.root, "model.layers.1.mlp", tp_size=2, tp_rank=1)
    b = harness.moe_rank_tensors(v1.root, "model.layers.1.mlp", tp_size=2, tp_rank=1)
    where = MoeWhere(("gate_proj", "up_proj", "down_proj"), 1, 64, 0, 32)
    for key in ("w13_weight", "w2_weight", "w13_weight_scale", "w2_weight_scale"):
        assert_ints_equal(a[key], b[key], f"v0 vs v1 {key}", lambda i, k=key, w=where: w(k, i))


# --------------------------------------------------------------------------------------------
# MoE


def _channel_v0_bias(source: harness.SourceCheckpoint, prefix: str, projections, experts: range, tp_rank: int,
                     part: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 8·Σ_k W[n,k]·scale[n]: w13 over all of K per gate/up row of the rank; w2 over the
    rank's K slice. Independent of vllm-ascend, which keeps no bias for per-channel version "0"."""
    gate, up, down = projections
    rows = slice(tp_rank * part, (tp_rank + 1) * part)
    w13, w2 = [], []
    for e in experts:
        head = f"{prefix}.experts.{e}."
        pieces = []
        for proj in (gate, up):
            weight = source.tensor(head + proj + ".weight")
            assert weight.dtype == torch.int8, f"{head}{proj}.weight: version 0 stores int8, got {weight.dtype}"
            scale = source.tensor(head + proj + ".weight_scale").double().reshape(-1)
            pieces.append(8 * weight.double().sum(dim=1)[rows] * scale[rows])
        w13.append(torch.cat(pieces))
        weight = source.tensor(head + down + ".weight").double()
        scale = source.tensor(head + down + ".weight_scale").double().reshape(-1)
        w2.append(8 * weight[:, rows].sum(dim=1) * scale)
    return torch.stack(w13).float(), torch.stack(w2).float()


@pytest.mark.parametrize("preset, tp, ep", MOE_CASES)
def test_moe_rank_equals_vllm_ascend(vllm_ascend_wheel, converted, preset, tp, ep):
    source_dir, source, ck = _open(converted, preset)
    layers = sorted(p for p, m in ck.stamp.modules.items() if m.kind == "moe")
    assert layers, f"{preset}: no converted MoE layer"
    for prefix in layers:
        m = ck.stamp.modules[prefix]
        group, intermediate, experts = m.group_size, m.intermediate, m.num_experts
        assert split_allowed(intermediate, experts, group, tp, ep), (
            f"{preset} {prefix}: stamp (I={intermediate}, E={experts}, G={group}) refuses tp={tp} ep={ep}, "
            "which the preset's spec allows")
        channel_v0 = m.variant == "moe-channel-v0"
        part, local = intermediate // tp, experts // ep
        for rank in range(max(tp, ep)):
            split = {"tp_size": tp, "tp_rank": rank if tp > 1 else 0, "ep_size": ep, "ep_rank": rank if ep > 1 else 0}
            got = ck.moe_layer(prefix, **split)
            want = harness.moe_rank_tensors(source_dir, prefix, **split)
            first = split["ep_rank"] * local
            where = MoeWhere(tuple(m.projections), split["tp_rank"], part, first, group)
            label = f"{preset} {prefix} tp {split['tp_rank']}/{tp} ep {split['ep_rank']}/{ep}"
            assert set(got) == set(harness.MOE_KEYS), f"{label}: keys {sorted(got)}"
            for key in ("w13_weight", "w2_weight", "w13_weight_scale", "w2_weight_scale"):
                assert_ints_equal(got[key], want[key], f"{label} {key}", lambda i, k=key, w=where: w(k, i))
            if channel_v0:
                for key in ("w13_scale_bias", "w2_scale_bias"):
                    assert want[key].numel() == 0, f"{label}: vllm-ascend 0.11 was expected to hold no {key}"
                ref13, ref2 = _channel_v0_bias(source, prefix, tuple(m.projections),
                                               range(first, first + local), split["tp_rank"], part)
                references = {"w13_scale_bias": ref13, "w2_scale_bias": ref2}
            else:
                references = want
            for key in ("w13_scale_bias", "w2_scale_bias"):
                assert_bias_close(got[key], references[key], f"{label} {key}", lambda i, k=key, w=where: w(k, i))


# --------------------------------------------------------------------------------------------
# Linear


@pytest.mark.parametrize("preset", LINEAR_CASES)
def test_linear_equals_vllm_ascend(vllm_ascend_wheel, converted, preset):
    source_dir, _, ck = _open(converted, preset)
    layers = sorted(p for p, m in ck.stamp.modules.items() if m.kind == "linear")
    assert layers, f"{preset}: no converted Linear layer"
    for prefix in layers:
        got = ck.linear(prefix)
        want = harness.linear_tensors(source_dir, prefix)
        label = f"{preset} {prefix}"
        assert set(got) <= set(want), f"{label}: {sorted(set(got) - set(want))} are not vllm-ascend parameters"
        assert {"weight", "weight_scale_second"} <= set(got), f"{label}: keys {sorted(got)}"
        assert {"weight_scale_bias", "scale_bias"} & set(got), f"{label}: no bias among {sorted(got)}"
        for key, tensor in got.items():
            def where(i, k=key):
                return linear_where(k, i)

            if not tensor.is_floating_point():
                assert_ints_equal(tensor, want[key], f"{label} {key}", where)
            elif key.endswith("bias"):
                assert_bias_close(tensor, want[key], f"{label} {key}", where)
            else:
                assert_floats_identical(tensor, want[key], f"{label} {key}", where)
