"""NpuReadyCheckpoint: refuses what it cannot serve, and slices any supported TP/EP rank."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from w4a8conv.constants import DOWN_BIAS_CHUNKS, ExitCode
from w4a8conv.errors import InvalidCheckpointError, NotConvertedError, UnsupportedSplitError, UsageError
from w4a8conv.runtime import NpuReadyCheckpoint
from w4a8conv.synthetic import PRESETS
from w4a8conv.transforms.int4 import unpack_int8_pairs_to_int4, unpack_int32_to_int4

from robustness_support import read_raw, write_raw

MOE = "model.layers.1.mlp"


def stacked(ck: NpuReadyCheckpoint, proj: str, output: str, num_experts: int) -> torch.Tensor:
    """One projection's stored per-expert tensors stacked on a leading expert axis."""
    return torch.stack([ck.tensor(f"{MOE}.experts.{e}.{proj}.{output}") for e in range(num_experts)])


def copy_of(converted_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "ck"
    shutil.copytree(converted_dir, target)
    return target


def edit_description(root: Path, change) -> None:
    path = root / "quant_model_description.json"
    description = json.loads(path.read_text())
    change(description)
    path.write_text(json.dumps(description))


# ---------------------------------------------------------------------------------------------
# open: refusals


def test_open_accepts_a_conversion(converted):
    _src, out = converted("moe-group-v1")
    ck = NpuReadyCheckpoint.open(out)
    assert ck.stamp.layout == "w4a8conv-npu-ready"
    assert MOE in ck.stamp.modules
    assert ck.type_of(f"{MOE}.experts.0.gate_proj.weight") == "W4A8_DYNAMIC_NPU"


def test_not_converted_error_is_an_invalid_input():
    assert issubclass(NotConvertedError, InvalidCheckpointError)
    assert NotConvertedError("x").exit_code == ExitCode.INVALID_INPUT == 3


def test_open_refuses_an_unconverted_source_with_plain_description(preset_source):
    src = preset_source("moe-group-v1")
    assert (src / "quant_model_description.json").is_file()
    with pytest.raises(NotConvertedError, match=r"no 'w4a8conv' stamp"):
        NpuReadyCheckpoint.open(src)


def test_open_refuses_an_unconverted_source_with_typed_description(preset_source):
    src = preset_source("moe-group-v0")
    assert not (src / "quant_model_description.json").exists()
    with pytest.raises(NotConvertedError, match=r"no quant_model_description\.json"):
        NpuReadyCheckpoint.open(src)


def test_open_refuses_a_description_without_stamp(converted, tmp_path):
    ck = copy_of(converted("moe-group-v1")[1], tmp_path)
    edit_description(ck, lambda d: d.pop("w4a8conv"))
    with pytest.raises(NotConvertedError, match=r"no 'w4a8conv' stamp") as info:
        NpuReadyCheckpoint.open(ck)
    assert "quant_model_description.json" in str(info.value)


@pytest.mark.parametrize("version", [1, 3])  # 1: stacked experts, written by w4a8conv 0.1; 3: a future one
def test_open_refuses_other_layout_versions(converted, tmp_path, version):
    ck = copy_of(converted("moe-group-v1")[1], tmp_path)
    edit_description(ck, lambda d: d["w4a8conv"].update(layout_version=version))
    with pytest.raises(NotConvertedError, match=rf"layout version {version}; this w4a8conv serves version 2 only"):
        NpuReadyCheckpoint.open(ck)


def test_open_refuses_a_foreign_layout(converted, tmp_path):
    ck = copy_of(converted("moe-group-v1")[1], tmp_path)
    edit_description(ck, lambda d: d["w4a8conv"].update(layout="something-else"))
    with pytest.raises(NotConvertedError, match=r"layout 'something-else' is not 'w4a8conv-npu-ready'"):
        NpuReadyCheckpoint.open(ck)


def test_open_refuses_a_missing_shard(converted, tmp_path):
    ck = copy_of(converted("moe-group-v1")[1], tmp_path)
    shards = sorted(ck.glob("*.safetensors"))
    assert shards
    shards[0].unlink()
    with pytest.raises(NotConvertedError, match=rf"missing: \['{shards[0].name}'\]"):
        NpuReadyCheckpoint.open(ck)


def test_open_refuses_unreadable_description(converted, tmp_path):
    ck = copy_of(converted("moe-group-v1")[1], tmp_path)
    (ck / "quant_model_description.json").write_text("{not json")
    with pytest.raises(NotConvertedError, match="unreadable"):
        NpuReadyCheckpoint.open(ck)


@pytest.mark.parametrize("shape, rule", [
    ([8, 2**63 - 1, 0], "product before the first zero, 73786976294838206456, passes 2^64 - 1"),
    ([0, 2, 2**63 - 1], "contiguous stride of 18446744073709551614, past 2^63 - 1"),
    ([0, 2**63], "is not a list of non-negative integers below 2^63"),
])
def test_open_refuses_a_zero_byte_tensor_torch_cannot_make(converted, tmp_path, shape, rule):
    """A shard header may declare a zero-byte tensor whose shape torch cannot make (torch.empty raises
    a RuntimeError for [8, 2^63 - 1, 0]): the shard check refuses it, naming the shard, the tensor and
    the rule, before tensor() could reach torch."""
    ck = copy_of(converted("moe-group-v1")[1], tmp_path)
    shard = sorted(ck.glob("*.safetensors"))[0]
    header, data = read_raw(shard)
    header["extra.empty"] = {"dtype": "F32", "shape": shape, "data_offsets": [len(data), len(data)]}
    write_raw(shard, header, data)
    edit_description(ck, lambda d: d["w4a8conv"]["shards"][shard.name].update(bytes=shard.stat().st_size))
    index = json.loads((ck / "model.safetensors.index.json").read_text())
    index["weight_map"]["extra.empty"] = shard.name
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(NotConvertedError) as info:
        NpuReadyCheckpoint.open(ck)
    assert (info.value.file, info.value.tensor) == (shard, "extra.empty")
    assert rule in info.value.rule and f"shape {shape}" in info.value.rule


def test_open_refuses_a_directory_without_description(tmp_path):
    with pytest.raises(NotConvertedError, match="no quant_model_description.json"):
        NpuReadyCheckpoint.open(tmp_path)


# ---------------------------------------------------------------------------------------------
# moe_layer: refused splits


@pytest.mark.parametrize("kwargs, rule", [
    (dict(tp_size=3), r"MoE TP size must divide 16 \(the down_proj bias chunks\)"),
    (dict(tp_size=32), r"MoE TP size must divide 16"),
    (dict(tp_size=5, tp_rank=1), r"must divide 16"),
    (dict(ep_size=3), r"8 experts do not split evenly over 3 EP ranks"),
    (dict(ep_size=16), r"8 experts do not split evenly over 16 EP ranks"),
    (dict(tp_size=8), r"intermediate part 16 is not a multiple of group_size 32"),
    (dict(tp_size=16), r"intermediate part 8 is not a multiple of group_size 32"),
    (dict(tp_size=2, tp_rank=2), r"tp_rank 2 is not in \[0, tp_size\)"),
    (dict(ep_size=2, ep_rank=-1), r"ep_rank -1 is not in \[0, ep_size\)"),
    (dict(tp_size=0), r"tp_rank 0 is not in \[0, tp_size\)"),
])
def test_moe_layer_refuses_unsupported_splits(converted, kwargs, rule):
    ck = NpuReadyCheckpoint.open(converted("moe-group-v1")[1])  # E 8, H 256, I 128, G 32
    with pytest.raises(UnsupportedSplitError, match=rule) as info:
        ck.moe_layer(MOE, **kwargs)
    assert MOE in str(info.value)
    assert info.value.exit_code == ExitCode.USAGE


def test_moe_layer_refuses_a_part_that_is_not_whole_int32_words(converted):
    ck = NpuReadyCheckpoint.open(converted("moe-channel-v1", intermediate=64)[1])
    ck.moe_layer(MOE, tp_size=8)  # part 8: fine
    with pytest.raises(UnsupportedSplitError, match=r"intermediate part 4 is not a multiple of 8"):
        ck.moe_layer(MOE, tp_size=16)


@pytest.mark.parametrize("prefix", ["model.layers.7.mlp", "model.layers.1", "", "model.layers.1.mlp.experts"])
def test_moe_layer_unknown_prefix_is_a_usage_error(converted, prefix):
    ck = NpuReadyCheckpoint.open(converted("moe-group-v1")[1])
    with pytest.raises(UsageError, match=r"is not a converted moe layer \(known: model\.layers\.1\.mlp\)"):
        ck.moe_layer(prefix)


def test_layer_kind_mismatch_is_a_usage_error(converted):
    ck = NpuReadyCheckpoint.open(converted("linear-v1")[1])
    with pytest.raises(UsageError, match="is not a converted moe layer"):
        ck.moe_layer("model.layers.0.mlp.gate_proj")
    with pytest.raises(UsageError, match="is not a converted linear layer"):
        ck.linear(MOE)


# ---------------------------------------------------------------------------------------------
# moe_layer: shapes and values of supported splits


def expected_shapes(e: int, h: int, i: int, g: int, tp: int, ep: int) -> dict:
    ip, ee = i // tp, e // ep
    return {
        "w13_weight": (torch.int32, (ee, h, 2 * ip // 8)),
        "w2_weight": (torch.int32, (ee, ip, h // 8)),
        "w13_weight_scale": (torch.int64, (ee, h // g if g else 1, 2 * ip)),
        "w2_weight_scale": (torch.int64, (ee, ip // g if g else 1, h)),
        "w13_scale_bias": (torch.float32, (ee, 2 * ip)),
        "w2_scale_bias": (torch.float32, (ee, h)),
    }


SPLITS = [  # (tp_size, tp_rank, ep_size, ep_rank)
    (1, 0, 1, 0), (2, 1, 1, 0), (4, 3, 2, 1), (2, 0, 8, 7), (1, 0, 4, 2), (4, 0, 1, 0),
]
CHANNEL_SPLITS = [(1, 0, 1, 0), (16, 5, 2, 1), (8, 7, 4, 0), (2, 1, 1, 0)]


@pytest.mark.parametrize("preset, split", [("moe-group-v1", s) for s in SPLITS]
                         + [("moe-channel-v1", s) for s in CHANNEL_SPLITS]
                         + [("moe-group-v0", (2, 1, 2, 0)), ("moe-channel-v0", (4, 2, 4, 3))])
def test_moe_layer_shapes_and_slices(converted, preset, split):
    tp, t, ep, r = split
    ck = NpuReadyCheckpoint.open(converted(preset)[1])
    spec = PRESETS[preset]
    e, h, i, g = spec.num_experts, spec.hidden, spec.intermediate, spec.effective_group_size
    got = ck.moe_layer(MOE, tp_size=tp, tp_rank=t, ep_size=ep, ep_rank=r)
    shapes = expected_shapes(e, h, i, g, tp, ep)
    assert set(got) == set(shapes)
    for key, (dtype, shape) in shapes.items():
        assert got[key].dtype == dtype, key
        assert tuple(got[key].shape) == shape, key
        assert got[key].is_contiguous(), key

    full = {f"{p}.{o}": stacked(ck, p, o, e) for p in spec.projections
            for o in ("weight", "weight_scale", "scale_bias")}
    gate, up, down = spec.projections
    ip, ee = i // tp, e // ep
    ex = slice(r * ee, (r + 1) * ee)
    cols = slice(t * ip, (t + 1) * ip)
    words = slice(t * ip // 8, (t + 1) * ip // 8)
    assert torch.equal(got["w13_weight"], torch.cat([full[f"{gate}.weight"][ex, :, words],
                                                     full[f"{up}.weight"][ex, :, words]], dim=-1))
    assert torch.equal(got["w2_weight"], full[f"{down}.weight"][ex, cols, :])
    assert torch.equal(got["w13_weight_scale"], torch.cat([full[f"{gate}.weight_scale"][ex, :, cols],
                                                           full[f"{up}.weight_scale"][ex, :, cols]], dim=-1))
    rows = slice(t * ip // g, (t + 1) * ip // g) if g else slice(None)
    assert torch.equal(got["w2_weight_scale"], full[f"{down}.weight_scale"][ex, rows, :])
    assert torch.equal(got["w13_scale_bias"], torch.cat([full[f"{gate}.scale_bias"][ex, cols],
                                                         full[f"{up}.scale_bias"][ex, cols]], dim=-1))
    per = DOWN_BIAS_CHUNKS // tp
    expected_w2_bias = full[f"{down}.scale_bias"][ex, :, t * per:(t + 1) * per].to(torch.float64).sum(dim=-1)
    torch.testing.assert_close(got["w2_scale_bias"].to(torch.float64), expected_w2_bias, rtol=1e-6, atol=1e-6)


def test_moe_layer_rank_values_trace_back_to_the_source(converted):
    src, out = converted("moe-group-v1")
    ck = NpuReadyCheckpoint.open(out)
    tensors = {}
    for f in src.glob("*.safetensors"):
        tensors.update(load_file(str(f)))
    got = ck.moe_layer(MOE, tp_size=2, tp_rank=1, ep_size=2, ep_rank=1)
    w13 = unpack_int32_to_int4(got["w13_weight"])  # [4, H=256, 2*64]
    w2 = unpack_int32_to_int4(got["w2_weight"])    # [4, 64, H=256]
    for local, expert in enumerate(range(4, 8)):
        gate = unpack_int8_pairs_to_int4(tensors[f"{MOE}.experts.{expert}.gate_proj.weight"], dim=0)  # [I, H]
        up = unpack_int8_pairs_to_int4(tensors[f"{MOE}.experts.{expert}.up_proj.weight"], dim=0)
        down = unpack_int8_pairs_to_int4(tensors[f"{MOE}.experts.{expert}.down_proj.weight"], dim=0)  # [H, I]
        assert torch.equal(w13[local, :, :64], gate[64:128].t())
        assert torch.equal(w13[local, :, 64:], up[64:128].t())
        assert torch.equal(w2[local], down[:, 64:128].t())
        bias = tensors[f"{MOE}.experts.{expert}.down_proj.scale_bias"]  # [H, 16]
        torch.testing.assert_close(got["w2_scale_bias"][local], bias[:, 8:].sum(dim=1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("preset, tp_sizes", [
    ("moe-group-v1", (2, 4)), ("moe-channel-v1", (2, 4, 8, 16)), ("moe-channel-v0", (2, 16)),
    ("moe-group-v0", (4,)),
])
def test_w2_scale_bias_sums_over_tp_ranks_to_tp1(converted, preset, tp_sizes):
    ck = NpuReadyCheckpoint.open(converted(preset)[1])
    whole = ck.moe_layer(MOE)["w2_scale_bias"].to(torch.float64)
    assert whole.abs().max() > 0
    down = PRESETS[preset].projections[2]
    stored = stacked(ck, down, "scale_bias", PRESETS[preset].num_experts).to(torch.float64)
    tolerance = 1e-6 * float(whole.abs().max())
    torch.testing.assert_close(whole, stored.sum(dim=-1), rtol=1e-6, atol=tolerance)
    for tp in tp_sizes:
        parts = [ck.moe_layer(MOE, tp_size=tp, tp_rank=t)["w2_scale_bias"].to(torch.float64) for t in range(tp)]
        assert not torch.equal(parts[0], parts[-1])
        torch.testing.assert_close(sum(parts), whole, rtol=1e-6, atol=tolerance)
        # the w13 biases of the TP ranks tile the TP=1 one
        w13 = [ck.moe_layer(MOE, tp_size=tp, tp_rank=t)["w13_scale_bias"] for t in range(tp)]
        full_w13 = ck.moe_layer(MOE)["w13_scale_bias"]
        i = PRESETS[preset].intermediate
        gate_cat = torch.cat([w[:, : i // tp] for w in w13], dim=-1)
        up_cat = torch.cat([w[:, i // tp:] for w in w13], dim=-1)
        assert torch.equal(torch.cat([gate_cat, up_cat], dim=-1), full_w13)


# ---------------------------------------------------------------------------------------------
# linear


@pytest.mark.parametrize("preset, bias_name", [("linear-v1", "scale_bias"), ("linear-v0", "weight_scale_bias")])
def test_linear_returns_vllm_ascend_names_and_shapes(converted, preset, bias_name):
    ck = NpuReadyCheckpoint.open(converted(preset)[1])
    spec = PRESETS[preset]
    g, h = spec.effective_group_size, spec.hidden
    cases = {  # prefix: (out N, in K)
        "model.layers.0.mlp.gate_proj": (spec.dense_intermediate, h),
        "model.layers.0.mlp.down_proj": (h, spec.dense_intermediate),
        "model.layers.1.mlp.shared_experts.down_proj": (h, spec.intermediate),
    }
    for prefix, (n, k) in cases.items():
        got = ck.linear(prefix)
        assert set(got) == {"weight", "weight_scale_second", bias_name}
        assert got["weight"].dtype == torch.int32 and tuple(got["weight"].shape) == (k, n // 8)
        assert got["weight_scale_second"].dtype == torch.float32
        assert tuple(got["weight_scale_second"].shape) == (k // g, n)
        bias = got[bias_name]
        assert bias.dtype == torch.float32
        row_parallel_v1 = preset == "linear-v1" and prefix.endswith("down_proj")
        assert tuple(bias.shape) == ((n, DOWN_BIAS_CHUNKS) if row_parallel_v1 else (n,))
        assert torch.equal(got["weight"], ck.tensor(prefix + ".weight"))


def test_returned_tensors_own_their_memory(converted):
    """Editing what one call returned must not change what the next call returns."""
    _source, out = converted("moe-group-v1")
    ckpt = NpuReadyCheckpoint.open(out)
    first = ckpt.moe_layer("model.layers.1.mlp")
    expected = {k: v.clone() for k, v in first.items()}
    for tensor in first.values():
        tensor.zero_()
    again = ckpt.moe_layer("model.layers.1.mlp")
    assert all(torch.equal(again[k], expected[k]) for k in expected)
    name = "model.layers.1.mlp.experts.0.down_proj.weight"
    whole = ckpt.tensor(name)
    kept = whole.clone()
    whole.zero_()
    assert torch.equal(ckpt.tensor(name), kept)
