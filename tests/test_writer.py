"""writer.py: the shard cut, the header, and the bytes of one small shard written from fixed tensors."""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from w4a8conv.errors import WriteError
from w4a8conv.journal import sha256_file
from w4a8conv.plan import CopyBytes, OutputTensor
from w4a8conv.source.safetensors_file import TensorRef
from w4a8conv.staging import StagingPool
from w4a8conv.writer import ShardPlan, assign_shards, plan_fingerprint, shard_header, write_shard

METADATA = {"format": "pt", "w4a8conv": "w4a8conv-npu-ready/2"}
# sha256 of the 367-byte shard `fixed_shard` writes, computed from bytes assembled by hand (8-byte
# little-endian header length, compact JSON in plan order padded with spaces to a multiple of 8, the
# data back to back): a change to the header layout, the padding, the order or the data changes it.
GOLDEN_SHA256 = "sha256:e9938e311cfb30fea54b640a77560dbad66ec57afb9c384865bb54af2a673955"
# The data region, value by value in little-endian: int32 1, -2, 3, 2^31-1, -2^31, 0; bf16 0.5 (0x3F00),
# -1.25 (0xBFA0), 3.0 (0x4040); int64 7, -9; uint8 255.
GOLDEN_DATA = bytes.fromhex("01000000" "feffffff" "03000000" "ffffff7f" "00000080" "00000000"
                            "003f" "a0bf" "4040" "0700000000000000" "f7ffffffffffffff" "ff")


def tensor(name: str, dtype: str, shape: tuple[int, ...]) -> OutputTensor:
    """An output tensor whose recipe is never run here (the tests hand the writer its bytes)."""
    return OutputTensor(name, dtype, shape, CopyBytes(TensorRef(name, Path("unused"), dtype, shape, 0, 0)))


FIXED = {  # name -> (dtype, values): an odd number of bytes in the middle, so alignment is not by chance
    "a.weight": ("I32", torch.tensor([[1, -2, 3], [2**31 - 1, -(2**31), 0]], dtype=torch.int32)),
    "b.bias": ("BF16", torch.tensor([0.5, -1.25, 3.0], dtype=torch.bfloat16)),
    "c.scale": ("I64", torch.tensor([[7], [-9]], dtype=torch.int64)),
    "d.flag": ("U8", torch.tensor([255], dtype=torch.uint8)),
}


def fixed_shard(directory: Path):
    tensors = tuple(tensor(n, dtype, tuple(v.shape)) for n, (dtype, v) in FIXED.items())
    shard = ShardPlan("model-00001-of-00001.safetensors", tensors)
    data = {n: memoryview(v.contiguous().view(torch.uint8).numpy()).cast("B") for n, (_d, v) in FIXED.items()}
    # 64-byte staging buffers: the header and the data cross buffer boundaries mid-tensor
    return shard, write_shard(directory, shard, METADATA, StagingPool(64), lambda t, out: out.write(data[t.name]))


def test_a_small_shard_has_its_golden_bytes(tmp_path):
    shard, written = fixed_shard(tmp_path)
    path = tmp_path / shard.file_name
    assert written.sha256 == sha256_file(path) == GOLDEN_SHA256
    assert written.nbytes == path.stat().st_size
    assert [p.name for p in tmp_path.iterdir()] == [shard.file_name]  # no .partial left behind


def test_the_written_shard_is_what_safetensors_reads(tmp_path):
    shard, _written = fixed_shard(tmp_path)
    raw = (tmp_path / shard.file_name).read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    assert (8 + length) % 8 == 0
    assert raw[8 + length:] == GOLDEN_DATA
    header = json.loads(raw[8:8 + length])
    assert header.pop("__metadata__") == METADATA
    assert list(header) == list(FIXED)  # tensors stored in plan order
    assert header["b.bias"] == {"dtype": "BF16", "shape": [3], "data_offsets": [24, 30]}
    loaded = load_file(tmp_path / shard.file_name)
    for name, (_dtype, values) in FIXED.items():
        assert torch.equal(loaded[name], values), name


def test_shard_header_pads_to_eight_bytes_and_lists_offsets_back_to_back():
    tensors = [tensor("x", "F16", (3,)), tensor("y", "I8", (1, 5))]
    head = shard_header(tensors, {"format": "pt"})
    (length,) = struct.unpack("<Q", head[:8])
    assert len(head) == 8 + length and len(head) % 8 == 0
    assert head[8:].rstrip(b" ") == json.dumps({"__metadata__": {"format": "pt"},
                                                 "x": {"dtype": "F16", "shape": [3], "data_offsets": [0, 6]},
                                                 "y": {"dtype": "I8", "shape": [1, 5], "data_offsets": [6, 11]}},
                                                separators=(",", ":")).encode()


def test_assign_shards_cuts_before_the_tensor_that_would_pass_the_cap():
    tensors = [tensor(f"t{i}", "U8", (n,)) for i, n in enumerate([40, 50, 20, 100, 5])]
    shards = assign_shards(tensors, 100)
    assert [[t.name for t in s.tensors] for s in shards] == [["t0", "t1"], ["t2"], ["t3"], ["t4"]]
    assert [s.file_name for s in shards] == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    assert [s.data_bytes for s in shards] == [90, 20, 100, 5]
    assert [len(s.tensors) for s in assign_shards([tensor("big", "U8", (300,))], 100)] == [1]  # over the cap alone


def test_plan_fingerprint_follows_what_decides_the_bytes():
    base = [ShardPlan("s1", (tensor("x", "F16", (4,)),))]
    assert plan_fingerprint(base, METADATA) == plan_fingerprint(list(base), dict(METADATA))
    assert plan_fingerprint(base, METADATA) != plan_fingerprint([ShardPlan("s1", (tensor("x", "F16", (2, 2)),))],
                                                                METADATA)
    assert plan_fingerprint(base, METADATA) != plan_fingerprint(base, {**METADATA, "format": "np"})


def test_a_short_tensor_fails_and_leaves_no_file(tmp_path):
    shard = ShardPlan("model-00001-of-00001.safetensors", (tensor("x", "I32", (4,)),))
    with pytest.raises(AssertionError, match="produced 8 bytes, the plan says 16"):
        write_shard(tmp_path, shard, METADATA, StagingPool(64), lambda _t, out: out.write(bytes(8)))
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_directory_is_a_write_error_naming_the_shard(tmp_path):
    shard = ShardPlan("model-00001-of-00001.safetensors", (tensor("x", "U8", (1,)),))
    with pytest.raises(WriteError, match=r"model-00001-of-00001\.safetensors: cannot write"):
        write_shard(tmp_path / "missing", shard, METADATA, StagingPool(64), lambda _t, out: out.write(b"\x01"))


def test_sha256_file_is_the_plain_digest(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"w4a8conv" * 1000)
    assert sha256_file(path) == "sha256:" + hashlib.sha256(b"w4a8conv" * 1000).hexdigest()
