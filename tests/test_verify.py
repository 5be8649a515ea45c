"""`verify` accepts a fresh conversion and catches every kind of damage."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from w4a8conv.api import ConvertOptions, convert
from w4a8conv.constants import DESCRIPTION_NAME, INDEX_NAME, ExitCode
from w4a8conv.verify import verify


@pytest.fixture(scope="module")
def pristine(preset_source, tmp_path_factory) -> tuple[Path, Path]:
    source = preset_source("mixed-v1")
    out = tmp_path_factory.mktemp("verify") / "out"
    convert(source, out, options=ConvertOptions(max_shard_bytes=1_000_000, workers=1))
    return source, out


@pytest.fixture
def copy(pristine, tmp_path) -> Path:
    target = tmp_path / "out"
    shutil.copytree(pristine[1], target)
    return target


def shard(out: Path, index: int = 1) -> Path:
    return sorted(out.glob("model-*.safetensors"))[index]


def test_fresh_conversion_verifies_with_and_without_source(pristine):
    source, out = pristine
    integrity = verify(out)
    assert integrity.ok, integrity.problems
    assert integrity.shards_checked == len(list(out.glob("model-*.safetensors"))) >= 3
    full = verify(out, source=source, sample=None)
    assert full.ok, full.problems
    assert full.tensors_compared > 100
    assert full.worst["bias"] == 0.0  # "1.0.0" biases are copied, not recomputed
    assert 0 < full.worst["scale"] < 2**-11  # fp16 rounding of fused scales, nothing more


def test_flipped_byte_is_caught(copy):
    target = shard(copy)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(data)
    problems = verify(copy).problems
    assert any(target.name in p and "sha256" in p for p in problems), problems


def test_truncated_shard_is_caught(copy):
    target = shard(copy)
    data = target.read_bytes()
    target.write_bytes(data[: len(data) - 100])
    problems = verify(copy).problems
    assert any(target.name in p and "bytes" in p for p in problems), problems


def test_missing_shard_is_caught(copy):
    target = shard(copy, 0)
    target.unlink()
    problems = verify(copy).problems
    assert any(target.name in p and "missing" in p for p in problems), problems


def test_tampered_index_is_caught(copy):
    index = json.loads((copy / INDEX_NAME).read_text())
    name = next(iter(index["weight_map"]))
    other = next(f for f in set(index["weight_map"].values()) if f != index["weight_map"][name])
    index["weight_map"][name] = other
    (copy / INDEX_NAME).write_text(json.dumps(index))
    problems = verify(copy).problems
    assert any(name in p and "indexed in" in p for p in problems), problems


def test_index_missing_a_tensor_is_caught(copy):
    index = json.loads((copy / INDEX_NAME).read_text())
    name = sorted(index["weight_map"])[-1]
    del index["weight_map"][name]
    (copy / INDEX_NAME).write_text(json.dumps(index))
    assert any(name in p and "not indexed" in p for p in verify(copy).problems)


def test_tampered_stamp_is_caught(copy):
    description = json.loads((copy / DESCRIPTION_NAME).read_text())
    description["w4a8conv"]["layout_version"] = 99
    (copy / DESCRIPTION_NAME).write_text(json.dumps(description))
    assert any("layout version 99" in p for p in verify(copy).problems)


def test_wrong_source_is_reported(pristine, preset_source):
    problems = verify(pristine[1], source=preset_source("moe-group-v1")).problems
    assert any("is not the checkpoint this output was converted from" in p for p in problems), problems


def test_cli_exit_codes(pristine, copy):
    ok = subprocess.run([sys.executable, "-m", "w4a8conv.cli", "verify", str(pristine[1]), "--source",
                         str(pristine[0]), "--json"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["ok"] is True
    shard(copy).unlink()
    bad = subprocess.run([sys.executable, "-m", "w4a8conv.cli", "verify", str(copy)], capture_output=True, text=True)
    assert bad.returncode == ExitCode.VERIFY_FAILED
    assert "missing" in bad.stderr and bad.stdout.startswith("FAILED")
