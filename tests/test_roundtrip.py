"""Every preset, converted: the stored tensors decode back to the source's values, pass-through
tensors and non-weight files are byte-identical, the description and stamp say what they must,
and the source directory is left untouched."""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from w4a8conv.api import ConvertOptions, convert
from w4a8conv.constants import DOWN_BIAS_CHUNKS
from w4a8conv.runtime import NpuReadyCheckpoint
from w4a8conv.source import open_source
from w4a8conv.synthetic import PRESETS
from w4a8conv.transforms.int4 import unpack_int8_pairs_to_int4, unpack_int32_to_int4

ALL = sorted(PRESETS)
V0_PRESETS = sorted(n for n, s in PRESETS.items() if s.version in (None, "0"))
LINEAR_PRESETS = sorted(n for n, s in PRESETS.items() if s.w4a8_linear)
NON_WEIGHT_FILES = ("config.json", "tokenizer_config.json", "generation_config.json")
CONVERTED = "W4A8_DYNAMIC_NPU"
SOURCE = "W4A8_DYNAMIC"
MODEL_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# ---------------------------------------------------------------------------------------------
# independent readers


def raw_tensors(file: Path) -> dict[str, tuple[str, list[int], bytes]]:
    """name -> (dtype, shape, raw bytes), straight from the safetensors layout."""
    data = file.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    header.pop("__metadata__", None)
    base = 8 + length
    return {name: (info["dtype"], info["shape"], data[base + info["data_offsets"][0]:base + info["data_offsets"][1]])
            for name, info in header.items()}


def shard_metadata(file: Path) -> dict:
    data = file.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length]).get("__metadata__", {})


def all_raw(directory: Path) -> dict[str, tuple[str, list[int], bytes]]:
    out: dict = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(raw_tensors(f))
    return out


class Source:
    def __init__(self, root: Path):
        self.root = root
        (self.description_file,) = sorted(root.glob("quant_model_description*.json"))
        self.description = json.loads(self.description_file.read_text())
        self.tensors: dict[str, torch.Tensor] = {}
        for f in sorted(root.glob("*.safetensors")):
            self.tensors.update(load_file(str(f)))
        self.version = self.description.get("version", "0")
        self.group_size = self.description.get("group_size", 256)
        self.model_dtype = json.loads((root / "config.json").read_text())["torch_dtype"]

    def values(self, name: str) -> torch.Tensor:
        """int4 values [out, in] of a W4A8 weight, whichever way it is stored."""
        w = self.tensors[name]
        assert w.dtype == torch.int8
        return unpack_int8_pairs_to_int4(w, dim=0) if self.version == "1.0.0" else w

    def f32(self, name: str) -> np.ndarray:
        return self.tensors[name].to(torch.float32).numpy()


def decode(encoded: torch.Tensor) -> np.ndarray:
    assert encoded.dtype == torch.int64
    assert bool(((encoded >> 32) == 0).all()), "an int64 scale has a non-zero high word"
    return encoded.numpy().astype(np.uint32).view(np.float32)


def fp16_fused(s1: np.ndarray, s2: np.ndarray) -> np.ndarray:
    """[out,1] x [out, in/G] -> [in/G, out]: fp32 product, rounded through fp16."""
    return (s1.reshape(1, -1).astype(np.float32) * s2.T.astype(np.float32)).astype(np.float16).astype(np.float32)


def msd_reference(values: torch.Tensor, s1: np.ndarray, s2: np.ndarray | None, chunks: int) -> np.ndarray:
    """float64 8·Σ W·s2·s1 per chunk of the input dimension -> [out, chunks]."""
    v = values.numpy().astype(np.float64)
    out, k = v.shape
    per_k = np.ones_like(v) if s2 is None else np.repeat(s2.astype(np.float64), k // s2.shape[1], axis=1)
    terms = v * per_k * s1.astype(np.float64).reshape(out, 1)
    return 8 * terms.reshape(out, chunks, k // chunks).sum(axis=2)


def assert_bias_close(got: np.ndarray, values: torch.Tensor, s1, s2, chunks: int, what: str):
    expected = msd_reference(values, s1, s2, chunks)
    scale = msd_reference(values.abs(), np.abs(s1), None if s2 is None else np.abs(s2), chunks)
    err = np.abs(got.astype(np.float64).reshape(expected.shape) - expected)
    assert (err <= 1e-5 * scale + 1e-9).all(), f"{what}: max error {err.max()}"


def bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(np.ascontiguousarray(a, np.float32).view(np.uint32),
                                                 np.ascontiguousarray(b, np.float32).view(np.uint32))


def snapshot(root: Path) -> dict[str, tuple]:
    out: dict[str, tuple] = {".": (root.stat().st_mode, root.stat().st_mtime_ns)}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            out[str(p.relative_to(root))] = (digest, st.st_size if p.is_file() else None, st.st_mode,
                                             st.st_mtime_ns if p.is_file() else None)
    return out


def expected_modules(name: str) -> tuple[set[str], set[str]]:
    """(MoE prefixes, W4A8 Linear prefixes) the preset's spec implies."""
    spec = PRESETS[name]
    first_moe = spec.dense_layers
    moe = {f"model.layers.{first_moe + i}.mlp" for i in range(spec.moe_layers)}
    linear: set[str] = set()
    if spec.w4a8_linear:
        mlps = [f"model.layers.{i}.mlp" for i in range(spec.dense_layers)]
        if getattr(spec, "shared_experts", True):
            mlps += [f"model.layers.{i}.mlp.shared_experts"
                     for i in range(spec.dense_layers, spec.dense_layers + spec.moe_layers + spec.w8a8_moe_layers)]
        linear = {f"{m}.{p}" for m in mlps for p in ("gate_proj", "up_proj", "down_proj")}
    return moe, linear


def expected_converted_names(name: str) -> set[str]:
    """The output tensors the converter produces (everything else is passed through)."""
    moe, linear = expected_modules(name)
    spec = PRESETS[name]
    names = {f"{p}.experts.{e}.{proj}.{o}" for p in moe for e in range(spec.num_experts)
             for proj in spec.projections for o in ("weight", "weight_scale", "scale_bias")}
    bias = "scale_bias" if spec.version == "1.0.0" else "weight_scale_bias"
    for p in linear:
        names |= {f"{p}.weight", f"{p}.weight_scale_second", f"{p}.{bias}"}
    return names


# ---------------------------------------------------------------------------------------------
# converted tensors decode to the source


@pytest.mark.parametrize("name", ALL)
def test_moe_layers_round_trip(converted, name):
    src_dir, out = converted(name)
    src = Source(src_dir)
    ck = NpuReadyCheckpoint.open(out)
    modules = ck.stamp.modules
    moe = {p: m for p, m in modules.items() if m.kind == "moe"}
    assert set(moe) == expected_modules(name)[0]
    spec = PRESETS[name]
    g = src.group_size
    for prefix, m in moe.items():
        assert m.num_experts == spec.num_experts
        assert tuple(m.projections) == spec.projections
        assert (m.hidden, m.intermediate, m.group_size) == (spec.hidden, spec.intermediate, g)
        down = m.projections[2]
        for proj in m.projections:
            is_down = proj == down
            out_dim, in_dim = (spec.hidden, spec.intermediate) if is_down else (spec.intermediate, spec.hidden)
            for e in range(spec.num_experts):
                base = f"{prefix}.experts.{e}.{proj}."  # converted tensors keep the source names
                weight, scale, bias = (ck.tensor(base + o) for o in ("weight", "weight_scale", "scale_bias"))
                assert weight.dtype == torch.int32 and weight.shape == (in_dim, out_dim // 8)
                assert scale.dtype == torch.int64 and scale.shape == (in_dim // g if g else 1, out_dim)
                assert bias.dtype == torch.float32
                assert bias.shape == ((out_dim, DOWN_BIAS_CHUNKS) if is_down else (out_dim,))
                values = src.values(base + "weight")
                assert values.shape == (out_dim, in_dim)
                assert torch.equal(unpack_int32_to_int4(weight), values.t()), f"{base}weight"
                s1 = src.f32(base + "weight_scale")
                s2 = src.f32(base + "weight_scale_second") if g else None
                expected_scale = fp16_fused(s1, s2) if g else s1.reshape(1, -1)
                assert bits_equal(decode(scale), expected_scale), f"{base}weight_scale"
                if src.version == "1.0.0":
                    stored = src.tensors[base + "scale_bias"]
                    assert torch.equal(bias, stored if is_down else stored.reshape(-1)), f"{base}scale_bias"
                else:
                    assert_bias_close(bias.numpy(), values, s1, s2, DOWN_BIAS_CHUNKS if is_down else 1, base + "scale_bias")


@pytest.mark.parametrize("name", LINEAR_PRESETS)
def test_linear_layers_round_trip(converted, name):
    src_dir, out = converted(name)
    src = Source(src_dir)
    ck = NpuReadyCheckpoint.open(out)
    linear = {p: m for p, m in ck.stamp.modules.items() if m.kind == "linear"}
    assert set(linear) == expected_modules(name)[1]
    dtype = MODEL_DTYPES[src.model_dtype]
    g = src.group_size
    rounded = lambda a: torch.from_numpy(a).to(dtype).to(torch.float32).numpy()  # noqa: E731
    for prefix, m in linear.items():
        values = src.values(prefix + ".weight")
        out_dim, in_dim = values.shape
        assert (m.out_features, m.in_features, m.group_size) == (out_dim, in_dim, g)
        weight = ck.tensor(prefix + ".weight")
        assert weight.dtype == torch.int32 and weight.shape == (in_dim, out_dim // 8)
        assert torch.equal(unpack_int32_to_int4(weight), values.t())
        s1, s2 = src.f32(prefix + ".weight_scale"), src.f32(prefix + ".weight_scale_second")
        antiquant = ck.tensor(prefix + ".weight_scale_second")
        assert antiquant.dtype == torch.float32 and antiquant.shape == (in_dim // g, out_dim)
        expected = rounded(s1).reshape(1, -1) * rounded(s2).T
        assert expected.dtype == np.float32
        assert bits_equal(antiquant.numpy(), expected), prefix
        # the rounding to the model dtype is not a no-op on these scales
        assert not bits_equal(antiquant.numpy(), s1.reshape(1, -1) * s2.T)
        if src.version == "1.0.0":
            stored = src.tensors[prefix + ".scale_bias"]
            got = ck.tensor(prefix + ".scale_bias")
            assert torch.equal(got, stored.reshape(-1) if stored.shape[1] == 1 else stored)
            assert prefix + ".weight_scale_bias" not in ck.tensor_names
        else:
            got = ck.tensor(prefix + ".weight_scale_bias")
            assert got.dtype == torch.float32 and got.shape == (out_dim,)
            assert_bias_close(got.numpy(), values, rounded(s1), rounded(s2), 1, prefix)
            assert prefix + ".scale_bias" not in ck.tensor_names
        assert set(ck.linear(prefix)) == ({"weight", "weight_scale_second", "scale_bias"} if src.version == "1.0.0"
                                          else {"weight", "weight_scale_second", "weight_scale_bias"})


# ---------------------------------------------------------------------------------------------
# everything else is unchanged


@pytest.mark.parametrize("name", ALL)
def test_output_tensor_set_and_passthrough_bytes(converted, name):
    src_dir, out = converted(name)
    src = Source(src_dir)
    source_raw, output_raw = all_raw(src_dir), all_raw(out)
    converted_names = expected_converted_names(name)
    passthrough = {n for n in source_raw if src.description[n] != SOURCE}
    assert passthrough, "every preset has float and W8A8 tensors"
    assert set(output_raw) == converted_names | passthrough
    assert not converted_names & passthrough
    for n in passthrough:
        assert output_raw[n] == source_raw[n], f"{n} is not byte-identical"
    assert all(n not in output_raw for n in source_raw if src.description[n] == SOURCE and n not in converted_names)


@pytest.mark.parametrize("name", ALL)
def test_non_weight_files_copied_and_nothing_else(converted, name):
    src_dir, out = converted(name)
    for f in NON_WEIGHT_FILES:
        assert (out / f).read_bytes() == (src_dir / f).read_bytes(), f
    visible = {p.name for p in out.iterdir() if not p.name.startswith(".")}
    shards = {p.name for p in out.glob("*.safetensors")}
    assert visible == {*NON_WEIGHT_FILES, "quant_model_description.json", "model.safetensors.index.json", *shards}
    assert not [p for p in out.iterdir() if p.name.endswith(".partial")]
    assert not list(out.glob("quant_model_description_*.json"))


@pytest.mark.parametrize("name", ALL)
def test_rewritten_description(converted, name):
    src_dir, out = converted(name)
    src = Source(src_dir)
    desc = json.loads((out / "quant_model_description.json").read_text())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    output_names = set(index["weight_map"])
    source_types = src.description
    meta_keys = {k for k in source_types if k not in src.tensors}
    assert "model_quant_type" in meta_keys
    for k in meta_keys:
        assert desc[k] == source_types[k], k
    converted_names = expected_converted_names(name)
    assert converted_names <= output_names
    for n in output_names:
        if n in converted_names:
            assert desc[n] == CONVERTED, n
        else:
            assert source_types[n] != SOURCE
            assert desc[n] == source_types[n], f"pass-through {n} retyped"
    moe, _linear = expected_modules(name)
    spec = PRESETS[name]
    expert_weights = {f"{p}.experts.{e}.{proj}.weight" for p in moe for e in range(spec.num_experts)
                      for proj in spec.projections}
    for n in expert_weights:
        assert desc[n] == CONVERTED, n  # vllm-ascend resolves the MoE scheme from these keys
    assert set(desc) == meta_keys | output_names | expert_weights | {"w4a8conv"}
    assert SOURCE not in {v for k, v in desc.items() if k not in meta_keys and k != "w4a8conv"}


@pytest.mark.parametrize("name", ALL)
def test_stamp_and_shard_hashes(converted, name):
    src_dir, out = converted(name)
    src = Source(src_dir)
    desc = json.loads((out / "quant_model_description.json").read_text())
    stamp = desc["w4a8conv"]
    assert stamp["layout"] == "w4a8conv-npu-ready"
    assert stamp["layout_version"] == 2
    assert stamp["source"]["version"] == ("1.0.0" if PRESETS[name].version == "1.0.0" else "0")
    assert stamp["source"]["group_size"] == PRESETS[name].effective_group_size
    assert stamp["source"]["model_dtype"] == PRESETS[name].model_dtype
    fingerprint = stamp["source"]["fingerprint"]
    assert fingerprint.startswith("sha256:") and len(fingerprint) == len("sha256:") + 64
    assert fingerprint == open_source(src_dir).fingerprint()
    assert src.version == stamp["source"]["version"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = {p.name for p in out.glob("*.safetensors")}
    assert set(stamp["shards"]) == files == set(index["weight_map"].values())
    for file_name, record in stamp["shards"].items():
        data = (out / file_name).read_bytes()
        assert record["sha256"] == "sha256:" + hashlib.sha256(data).hexdigest(), file_name
        assert record["bytes"] == len(data)
        assert shard_metadata(out / file_name).get("w4a8conv") == "w4a8conv-npu-ready/2"
        for tensor in raw_tensors(out / file_name):
            assert index["weight_map"][tensor] == file_name
    total = sum(len(raw) for _d, _s, raw in all_raw(out).values())
    assert index["metadata"]["total_size"] == total


def test_fingerprints_differ_between_presets(converted):
    prints = {json.loads((converted(n)[1] / "quant_model_description.json").read_text())["w4a8conv"]["source"]
              ["fingerprint"] for n in ("moe-group-v0", "moe-group-v1", "moe-channel-v0")}
    assert len(prints) == 3


def test_v0_presets_cover_the_documented_ones():
    assert {"moe-group-v0", "moe-channel-v0", "linear-v0"} <= set(V0_PRESETS)


@pytest.mark.parametrize("name", V0_PRESETS)
def test_v0_converted_weights_are_at_most_055_of_the_source(converted, name):
    src_dir, out = converted(name)
    src = Source(src_dir)
    source_raw, output_raw = all_raw(src_dir), all_raw(out)
    desc = json.loads((out / "quant_model_description.json").read_text())
    source_bytes = sum(len(raw) for n, (_d, _s, raw) in source_raw.items()
                       if src.description[n] == SOURCE and n.endswith(".weight"))
    output_bytes = sum(len(raw) for n, (_d, _s, raw) in output_raw.items()
                       if desc[n] == CONVERTED and n.endswith(".weight"))
    assert source_bytes > 0 and output_bytes > 0
    assert output_bytes <= 0.55 * source_bytes, (output_bytes, source_bytes)


# ---------------------------------------------------------------------------------------------
# the source is read only; sharding changes nothing but file boundaries


@pytest.mark.parametrize("name", ALL)
def test_convert_does_not_modify_the_input(preset_source, tmp_path, name):
    src = preset_source(name)
    before = snapshot(src)
    assert len(before) >= 5
    convert(src, tmp_path / "out")
    assert snapshot(src) == before
    assert (tmp_path / "out" / "quant_model_description.json").is_file()


def test_small_shards_hold_the_same_tensors(converted, tmp_path):
    src, single = converted("linear-v1")
    out = tmp_path / "sharded"
    convert(src, out, options=ConvertOptions(max_shard_bytes=300_000, workers=1))
    files = sorted(out.glob("*.safetensors"))
    assert len(files) >= 3
    count = len(files)
    assert [f.name for f in files] == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    assert all_raw(out) == all_raw(single)
    stamp = json.loads((out / "quant_model_description.json").read_text())["w4a8conv"]
    assert set(stamp["shards"]) == {f.name for f in files}
    for f in files:
        assert stamp["shards"][f.name]["sha256"] == "sha256:" + hashlib.sha256(f.read_bytes()).hexdigest()
    single_stamp = json.loads((single / "quant_model_description.json").read_text())["w4a8conv"]
    assert stamp["modules"] == single_stamp["modules"] and stamp["source"] == single_stamp["source"]
    ck = NpuReadyCheckpoint.open(out)
    assert sorted(ck.tensor_names) == sorted(NpuReadyCheckpoint.open(single).tensor_names)
