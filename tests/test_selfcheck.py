"""`w4a8conv selfcheck`: on this host (no torch_npu) it skips the device checks and exits 0; with a
stand-in torch_npu (CPU implementations of the ops from their documented semantics, as
tests/test_reference_backend.py and tests/vllm_ascend_harness.py build them) every check runs and
passes; a stand-in with swapped nibbles or a kernel that drops the bias fails its check, exit 5."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from types import ModuleType, SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from w4a8conv.cli import app
from w4a8conv.constants import ExitCode
from w4a8conv.runtime import moe
from w4a8conv.runtime.reference import dynamic_quant, grouped_matmul_a8w4, swiglu
from w4a8conv.selfcheck import CHECKS, run_selfcheck, vllm_ascend_int64_scale

try:
    import vllm_ascend_harness as harness
except ImportError:  # tests/ imported as a package
    from tests import vllm_ascend_harness as harness


def npu_grouped_matmul(*, x, weight, scale, bias, per_token_scale, split_item, group_list_type, group_type,
                       group_list, output_dtype):
    assert (split_item, group_list_type, group_type, output_dtype) == (2, 1, 0, torch.bfloat16)
    return [grouped_matmul_a8w4(x[0], weight[0], scale[0], bias[0], per_token_scale[0], group_list)]


def swap_nibbles(words: torch.Tensor) -> torch.Tensor:
    b = words.contiguous().view(torch.uint8)
    return ((b << 4) | (b >> 4)).view(torch.int32)


@pytest.fixture
def stand_in(monkeypatch):
    """install(**overrides) -> a CPU torch_npu in sys.modules, an "available" torch.npu, NPU_DEVICE "cpu"."""

    def install(**overrides) -> ModuleType:
        stub = ModuleType("torch_npu")
        ops = dict(npu_convert_weight_to_int4pack=harness.npu_convert_weight_to_int4pack,
                   npu_quantize=harness.npu_quantize, npu_format_cast=harness.npu_format_cast,
                   npu_grouped_matmul=npu_grouped_matmul, npu_dynamic_quant=dynamic_quant, npu_swiglu=swiglu)
        for name, op in {**ops, **overrides}.items():
            setattr(stub, name, op)
        monkeypatch.setitem(sys.modules, "torch_npu", stub)
        monkeypatch.setattr(torch, "npu", SimpleNamespace(is_available=lambda: True), raising=False)
        monkeypatch.setattr(moe, "NPU_DEVICE", "cpu")
        return stub

    return install


def statuses(report) -> dict[str, str]:
    return {item.name: item.status for item in report.items}


def test_numpy_recipe_is_the_bit_view_widened():
    scale = torch.tensor([1.0, -2.0, 0.0, float("inf")])
    assert vllm_ascend_int64_scale(scale).tolist() == [0x3F800000, 0xC0000000, 0, 0x7F800000]


@pytest.mark.skipif(importlib.util.find_spec("torch_npu") is not None, reason="torch_npu is installed here")
def test_without_torch_npu_lists_what_it_would_check_and_exits_0():
    env = dict(os.environ, COLUMNS="400", NO_COLOR="1", TERM="dumb")
    run = subprocess.run([sys.executable, "-m", "w4a8conv.cli", "selfcheck"], capture_output=True, text=True,
                         env=env, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    for name, what in CHECKS.items():
        assert f"{name}: {what}" in run.stdout
    assert run.stdout.count("skipped: torch_npu not importable (needs CANN)") == 3
    assert run.stdout.rstrip().endswith("ok (3 skipped)")
    as_json = CliRunner().invoke(app, ["selfcheck", "--json"])
    assert as_json.exit_code == 0
    summary = json.loads(as_json.stdout)
    assert summary["ok"] is True
    assert {c["name"]: c["status"] for c in summary["checks"]} == {
        "int4pack": "skipped", "quantize": "skipped", "scale_encoding": "ok", "moe_layer": "skipped"}


def test_with_a_faithful_stand_in_every_check_runs_and_passes(stand_in):
    stand_in()
    report = run_selfcheck()
    assert statuses(report) == dict.fromkeys(CHECKS, "ok"), report.summary()
    layer = report.items[-1].detail
    assert "npu backend" in layer and "bound" in layer
    result = CliRunner().invoke(app, ["selfcheck"])
    assert result.exit_code == 0 and "skipped" not in result.stdout, result.stdout


def test_swapped_nibbles_fail_the_int4pack_check_with_exit_5(stand_in):
    stand_in(npu_convert_weight_to_int4pack=lambda w: swap_nibbles(harness.npu_convert_weight_to_int4pack(w)))
    report = run_selfcheck()
    assert statuses(report) == {"int4pack": "failed", "quantize": "ok", "scale_encoding": "ok", "moe_layer": "ok"}
    assert "words differ; first at" in report.items[0].detail
    result = CliRunner().invoke(app, ["selfcheck", "--json"])
    assert result.exit_code == ExitCode.VERIFY_FAILED
    assert json.loads(result.stdout)["ok"] is False


def test_a_kernel_without_the_bias_fails_the_layer_check(stand_in):
    def no_bias(*, bias, **kwargs):
        return npu_grouped_matmul(bias=[torch.zeros_like(bias[0])], **kwargs)

    stand_in(npu_grouped_matmul=no_bias)
    item = {i.name: i for i in run_selfcheck().items}["moe_layer"]
    assert item.status == "failed" and "npu backend" in item.detail, item


def test_an_op_that_raises_is_a_failed_check(stand_in):
    def unsupported(*args, **kwargs):
        raise RuntimeError("EZ9999: op not supported on this SoC")

    stand_in(npu_quantize=unsupported)
    item = {i.name: i for i in run_selfcheck().items}["quantize"]
    assert item.status == "failed" and "EZ9999" in item.detail
