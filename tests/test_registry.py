"""The transform tables: one entry per Variant, and exactly the documented output names."""
from __future__ import annotations

import pytest
import torch

from w4a8conv.constants import Variant
from w4a8conv.plan import MOE_OUTPUTS
from w4a8conv.transforms import LINEAR_SPECS, MOE_SPECS

# moe.py: "weight" int32 [in, out/8], "weight_scale" int64 [in/G or 1, out], "scale_bias" fp32 [out, chunks]
MOE_NAMES = {"weight", "weight_scale", "scale_bias"}
# linear.py / runtime `linear`: vllm-ascend's final parameter names; weight_scale_bias for "0",
# scale_bias for "1.0.0"
LINEAR_NAMES = {
    Variant.LINEAR_GROUP_V0: {"weight", "weight_scale_second", "weight_scale_bias"},
    Variant.LINEAR_GROUP_V1: {"weight", "weight_scale_second", "scale_bias"},
}
SOURCE_SUFFIXES = {"weight", "weight_scale", "weight_scale_second", "scale_bias"}


def test_every_variant_has_exactly_one_entry():
    moe, linear = set(MOE_SPECS), set(LINEAR_SPECS)
    assert not moe & linear
    assert moe | linear == set(Variant)
    assert len(MOE_SPECS) + len(LINEAR_SPECS) == len(Variant)
    assert all(isinstance(v, Variant) for v in (*MOE_SPECS, *LINEAR_SPECS))


def test_variant_families():
    assert {v for v in Variant if v.value.startswith("moe-")} == set(MOE_SPECS)
    assert {v for v in Variant if v.value.startswith("linear-")} == set(LINEAR_SPECS)


@pytest.mark.parametrize("variant", sorted(MOE_SPECS, key=lambda v: v.value))
def test_moe_outputs_are_the_documented_names(variant):
    spec = MOE_SPECS[variant]
    assert set(spec.outputs) == MOE_NAMES
    assert len(spec.outputs) == 3
    assert set(MOE_OUTPUTS) == MOE_NAMES
    for output in spec.outputs.values():
        assert output.needs and set(output.needs) <= SOURCE_SUFFIXES
    v1 = "-v1" in variant.value  # msModelSlim version "1.0.0": packed pairs and a stored bias
    assert spec.packed_pairs is v1
    assert spec.bias_in_checkpoint is v1
    assert spec.down_bias_total is variant.value.endswith("-bias-total")
    assert spec.per_group is ("-group-" in variant.value)
    assert spec.outputs["weight"].needs == ("weight",)


@pytest.mark.parametrize("variant", sorted(LINEAR_SPECS, key=lambda v: v.value))
def test_linear_outputs_are_the_documented_names(variant):
    spec = LINEAR_SPECS[variant]
    assert set(spec.outputs) == LINEAR_NAMES[variant]
    assert len(spec.outputs) == 3
    for output in spec.outputs.values():
        assert output.needs and set(output.needs) <= SOURCE_SUFFIXES
    assert spec.packed_pairs is variant.value.endswith("-v1")


@pytest.mark.parametrize("variant", list(Variant))
def test_int4_values_reads_both_storage_orders(variant):
    spec = MOE_SPECS.get(variant) or LINEAR_SPECS[variant]
    values = torch.tensor([[1, -2, 3], [-8, 7, 0], [5, 5, -1], [0, -3, 4]], dtype=torch.int8)  # [out=4, in=3]
    stored = values
    if spec.packed_pairs:  # two per byte along out: low nibble = even row
        stored = ((values[0::2] & 0xF) | (values[1::2] << 4)).to(torch.int8)
    assert torch.equal(spec.int4_values(stored), values)
