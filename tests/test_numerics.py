"""`w4a8conv.numerics` and `verify --numerics`: a fresh conversion is within the per-layer bound, a
damaged bias or scale (with a stamp fixed up so that integrity passes) is not, and the CLI maps
that to exit 5; `--numerics` without `--source` is a usage error."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from w4a8conv.constants import DESCRIPTION_NAME, STAMP_KEY, ExitCode
from w4a8conv.journal import sha256_file
from w4a8conv.errors import InvalidCheckpointError, UsageError
from w4a8conv.numerics import LinearNumerics, check_numerics, error_bound, fp_budget
from w4a8conv.runtime import NpuReadyCheckpoint
from w4a8conv.transforms.scales import decode_int64_to_fp32, encode_fp32_bits_as_int64
from w4a8conv.verify import verify

MOE = "model.layers.1.mlp"
UNSAMPLED_EXPERT = 3   # verify --sample 2 compares experts 0 and 7 only: fidelity cannot see this one


def cli(*args: str | Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="400", NO_COLOR="1", TERM="dumb")
    return subprocess.run([sys.executable, "-m", "w4a8conv.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300, check=False)


def tamper(out: Path, tensor: str, change) -> None:
    """Rewrite one stored tensor with `change(t)` in place, then re-record its shard's size and sha256
    in the stamp, so only the values can tell."""
    description = json.loads((out / DESCRIPTION_NAME).read_text())
    shard = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"][tensor]
    path = out / shard
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    change(tensors[tensor])
    save_file(tensors, str(path), metadata=metadata)
    description[STAMP_KEY]["shards"][shard] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    (out / DESCRIPTION_NAME).write_text(json.dumps(description, indent=2))


def zero_bias(t: torch.Tensor) -> None:
    t.zero_()


def double_scale(t: torch.Tensor) -> None:
    t.copy_(encode_fp32_bits_as_int64(2 * decode_int64_to_fp32(t)))


def test_bound_formula_matches_the_derivation():
    """tests/test_reference_backend.py derives 2.44 % + 6.34 % for the premises' maxima."""
    assert fp_budget(12) == pytest.approx(0.02441, abs=1e-5)
    assert error_bound(3.5, 10.5, 1.6, 12) == pytest.approx(0.0878, abs=1e-4)


@pytest.mark.parametrize("preset", ["moe-group-v1", "moe-channel-v0", "moe-group-v0-default-group", "mixed-v1"])
def test_fresh_conversion_is_within_each_layers_bound(converted, preset):
    source, out = converted(preset)
    ckpt = NpuReadyCheckpoint.open(out)
    layers = check_numerics(ckpt, source)
    assert [n.prefix for n in layers] == sorted(p for p, m in ckpt.stamp.modules.items() if m.kind == "moe")
    for n in layers:
        assert n.ok, n.problem()
        # measured 1.9–2.3 % on the presets; the bound with the inputs' own c1, c2, γ is 7–8 %
        assert 0.005 < n.error < 0.04 and n.bound < 0.0878, n.as_dict()
        assert n.experts == ckpt.stamp.modules[n.prefix].num_experts


def test_verify_reports_numerics_per_layer(converted):
    source, out = converted("mixed-v1")
    report = verify(out, source=source, numerics=True, sample=None)
    assert report.ok, report.problems
    summary = report.summary()
    assert len(summary["numerics"]) == 2 and all(layer["ok"] for layer in summary["numerics"])
    assert report.worst["numerics"] == max(layer["error"] for layer in summary["numerics"])
    one = verify(out, source=source, numerics=True, sample=1)
    assert len(one.numerics) == 1
    assert "numerics" not in verify(out, source=source).worst


def test_large_layers_are_checked_on_an_expert_parallel_slice(converted):
    source, out = converted("moe-group-v1")
    (n,) = check_numerics(NpuReadyCheckpoint.open(out), source, max_experts=2, top_k=2, seed=5)
    assert n.experts == 2 and n.expert_start % 2 == 0 and n.ok, n.as_dict()


def test_wrong_source_and_missing_source_are_refused(converted):
    _, out = converted("moe-group-v1")
    other, _ = converted("moe-channel-v1")
    with pytest.raises(InvalidCheckpointError, match="not the checkpoint this output was converted from"):
        check_numerics(NpuReadyCheckpoint.open(out), other)
    with pytest.raises(UsageError, match="needs the source"):
        verify(out, numerics=True)


@pytest.mark.parametrize("tensor,change", [
    (f"{MOE}.experts.{UNSAMPLED_EXPERT}.gate_proj.scale_bias", zero_bias),
    (f"{MOE}.experts.{UNSAMPLED_EXPERT}.down_proj.weight_scale", double_scale),
])
def test_damage_integrity_and_sampled_fidelity_miss_breaks_the_bound(converted, tmp_path, tensor, change):
    source, pristine = converted("moe-group-v1")
    out = tmp_path / "out"
    shutil.copytree(pristine, out)
    tamper(out, tensor, change)
    assert verify(out, source=source).ok   # hashes re-recorded; expert 3 is not among the sampled ones
    report = verify(out, source=source, numerics=True)
    (layer,) = report.numerics
    assert not layer.ok and layer.error > 2 * layer.bound, layer.as_dict()   # one expert of 8: 16 %, 44 %
    assert report.problems == [layer.problem()]
    assert "above its bound" in layer.problem() and MOE in layer.problem()


def test_cli_numerics_exit_codes(converted, tmp_path):
    source, pristine = converted("moe-group-v1")
    out = tmp_path / "out"
    shutil.copytree(pristine, out)
    tamper(out, f"{MOE}.experts.{UNSAMPLED_EXPERT}.gate_proj.scale_bias", zero_bias)
    bad = cli("verify", out, "--source", source, "--numerics", "--json")
    assert bad.returncode == ExitCode.VERIFY_FAILED, bad.stderr
    summary = json.loads(bad.stdout)
    assert summary["ok"] is False and summary["numerics"][0]["ok"] is False
    assert summary["worst_relative_error"]["numerics"] > summary["numerics"][0]["bound"]
    assert "above its bound" in bad.stderr
    usage = cli("verify", out, "--numerics")
    assert usage.returncode == ExitCode.USAGE
    assert "--numerics needs --source" in usage.stderr


def test_linear_layers_are_checked_within_their_bound(converted):
    """W4A8 Linear layers run as A16W4 (weight-only antiquant): the emulation on the converted tensors
    against the fp32 product of the source, for both versions and both model dtypes of the presets."""
    for preset in ("linear-v0", "linear-v1"):
        source, out = converted(preset)
        ckpt = NpuReadyCheckpoint.open(out)
        layers = check_numerics(ckpt, source)
        linears = sorted(p for p, m in ckpt.stamp.modules.items() if m.kind == "linear")
        assert [n.prefix for n in layers if isinstance(n, LinearNumerics)] == linears and linears
        for n in layers:
            assert n.ok, n.problem()
        for n in (n for n in layers if isinstance(n, LinearNumerics)):
            assert 0 < n.error < n.bound < 0.2, n.as_dict()


def test_linear_check_catches_a_wrong_antiquant_scale_and_nibble_order(converted):
    from w4a8conv.numerics import dequantized_linear, linear_numerics
    from w4a8conv.source import TensorReader, open_source

    source, out = converted("linear-v1")
    ckpt = NpuReadyCheckpoint.open(out)
    prefix = next(p for p, m in ckpt.stamp.modules.items() if m.kind == "linear")
    src = open_source(source)
    with TensorReader() as reader:
        want = dequantized_linear(src, reader, prefix, ckpt.stamp.modules[prefix])
    tensors = ckpt.linear(prefix)
    good = linear_numerics(prefix, tensors, want, torch.bfloat16)
    assert good.ok and good.error < good.bound / 10, good.as_dict()  # the bound is a worst case: ρ·4u
    scaled = dict(tensors, weight_scale_second=tensors["weight_scale_second"] * 1.5)
    words = tensors["weight"]
    swapped_nibbles = dict(tensors, weight=((words >> 4) & 0x0F0F0F0F) | ((words & 0x0F0F0F0F) << 4))
    for wrong in (scaled, swapped_nibbles):
        bad = linear_numerics(prefix, wrong, want, torch.bfloat16)
        assert not bad.ok and bad.error > 2 * bad.bound, bad.as_dict()


def test_verify_numerics_without_moe_checks_linear_layers(preset_source, tmp_path):
    from w4a8conv.api import convert

    linear_only = preset_source("linear-v1", moe_layers=0)
    convert(linear_only, tmp_path / "linear-only")
    run = cli("verify", tmp_path / "linear-only", "--source", linear_only, "--numerics", "--json")
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["numerics"] and {layer["kind"] for layer in summary["numerics"]} == {"linear"}
    # An output with nothing to check cannot be made: convert refuses a source without W4A8 modules.
    nothing = preset_source("moe-group-v1", moe_layers=0, w8a8_moe_layers=1)
    with pytest.raises(InvalidCheckpointError, match="nothing to convert"):
        convert(nothing, tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()
