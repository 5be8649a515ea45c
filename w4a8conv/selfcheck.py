"""`w4a8conv selfcheck`: does this host's torch_npu agree with the CPU code the converter and the
reference backend rest on?

The converter writes int4 weights and int64 scales that it computed on the CPU from the documented
semantics of torch_npu's ops and vllm-ascend's recipes; the reference backend emulates the A8W4
kernels. On a host with torch_npu and an NPU this compares, on random and synthetic data:

1. `int4pack`: `npu_convert_weight_to_int4pack` (int32 [R, C] int4 values) with `pack_int4_to_int32`;
2. `quantize`: `npu_quantize(x, [1.], None, quint4x2, -1, False)` on the same values with it too;
3. `scale_encoding`: `encode_fp32_bits_as_int64` with vllm-ascend's numpy recipe (fp32 bits viewed
   as uint32, widened to int64), on random bit patterns; needs no device and always runs;
4. `moe_layer`: a tiny synthetic checkpoint, converted, its MoE layer run by `MoELayer` on the
   "npu" backend and the "reference" backend, each against the fp32 forward of the source
   (`numerics.check_layer`); fails when the npu backend's error exceeds the bound.

torch_npu is imported only here, lazily; without it (or without a device) 1, 2 and 4 are skipped.
"""
from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .api import ConvertOptions, convert
from .errors import UsageError
from .numerics import check_layer
from .runtime import NpuReadyCheckpoint, moe
from .source import TensorReader, open_source
from .stamp import MoeRecord
from .synthetic import PRESETS, write_checkpoint
from .transforms.int4 import INT4_MAX, INT4_MIN, pack_int4_to_int32
from .transforms.scales import encode_fp32_bits_as_int64

__all__ = ["CHECKS", "CheckItem", "SelfcheckReport", "run_selfcheck", "vllm_ascend_int64_scale"]

OK, FAILED, SKIPPED = "ok", "failed", "skipped"

CHECKS: dict[str, str] = {
    "int4pack": "torch_npu.npu_convert_weight_to_int4pack on random int4 values (int32, 2-D) equals "
                "w4a8conv's pack_int4_to_int32",
    "quantize": "torch_npu.npu_quantize(x, [1.], None, quint4x2, -1, False) on the same values equals "
                "pack_int4_to_int32",
    "scale_encoding": "encode_fp32_bits_as_int64 equals vllm-ascend's numpy recipe (fp32 bits as uint32 -> int64)",
    "moe_layer": "a tiny synthetic MoE layer, converted, on the npu backend: relative error against the fp32 "
                 "source forward within its bound (the reference backend's error alongside)",
}

_PACK_SHAPE = (64, 256)    # int4 values [R, C]; C a multiple of 8
_SCALES = 1 << 16          # random fp32 bit patterns for the encoding check
# A tiny MoE model: one dense and one MoE layer, 8 experts, two scale groups per matmul.
_TINY = replace(PRESETS["moe-group-v1"], hidden=64, intermediate=64, dense_intermediate=64, vocab=64,
                attention=False, shared_experts=False, shard_bytes=None)


@dataclass(frozen=True)
class CheckItem:
    """One check: `status` is "ok", "failed" or "skipped"; `detail` says what was seen or why not run."""

    name: str
    status: str
    detail: str

    @property
    def checks(self) -> str:
        return CHECKS[self.name]


@dataclass
class SelfcheckReport:
    items: list[CheckItem] = field(default_factory=list)
    require_device: bool = False  # a skipped device check fails the report (a CI gate on an NPU host)

    @property
    def skipped(self) -> int:
        return sum(item.status == SKIPPED for item in self.items)

    @property
    def ok(self) -> bool:
        """Nothing failed, and nothing was skipped when the device checks are required."""
        return all(item.status != FAILED for item in self.items) and not (self.require_device and self.skipped)

    def summary(self) -> dict:
        return {"ok": self.ok, "require_device": self.require_device, "skipped": self.skipped,
                "checks": [{**asdict(item), "checks": item.checks} for item in self.items]}


def vllm_ascend_int64_scale(scale: torch.Tensor) -> torch.Tensor:
    """vllm-ascend's encoding of fp32 scales for the A8W4 kernel, as its process_scale does it in
    numpy: the fp32 array's dtype set to uint32 (a view of the bits), then `astype(np.int64)`."""
    bits = np.ascontiguousarray(scale.to(torch.float32).numpy()).view(np.uint32)
    return torch.from_numpy(bits.astype(np.int64))


def _first_difference(got: torch.Tensor, want: torch.Tensor) -> str:
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"got {got.dtype} {list(got.shape)}, expected {want.dtype} {list(want.shape)}"
    index = tuple(torch.nonzero(got != want)[0].tolist())
    count = int((got != want).sum())
    return (f"{count} of {want.numel()} words differ; first at {list(index)}: "
            f"got {int(got[index]) & 0xFFFFFFFF:#010x}, expected {int(want[index]) & 0xFFFFFFFF:#010x}")


def _compare(name: str, compute: Callable[[], torch.Tensor], want: torch.Tensor) -> CheckItem:
    """Run a device op and compare its result (on the CPU) with `want`, bit for bit."""
    try:
        got = compute().cpu()
    except Exception as exc:  # noqa: BLE001 - a device op can fail in many ways; report it as the check's
        return CheckItem(name, FAILED, f"the op raised {type(exc).__name__}: {exc}")
    if got.shape == want.shape and got.dtype == want.dtype and torch.equal(got, want):
        return CheckItem(name, OK, f"{want.numel()} int32 words equal")
    return CheckItem(name, FAILED, _first_difference(got, want))


def _check_scale_encoding(gen: torch.Generator) -> CheckItem:
    # Random bit patterns cover negative values, subnormals, infinities and NaNs; real scales too.
    bits = torch.randint(-(2 ** 31), 2 ** 31, (_SCALES,), generator=gen, dtype=torch.int64).to(torch.int32)
    values = torch.cat([bits.view(torch.float32), torch.rand(_SCALES, generator=gen) * 1e-2])
    got, want = encode_fp32_bits_as_int64(values), vllm_ascend_int64_scale(values)
    if torch.equal(got, want):
        return CheckItem("scale_encoding", OK, f"{values.numel()} fp32 values encode equally")
    index = int(torch.nonzero(got != want)[0])
    return CheckItem("scale_encoding", FAILED,
                     f"{int((got != want).sum())} of {values.numel()} differ; first {float(values[index])!r}: "
                     f"got {int(got[index])}, expected {int(want[index])}")


def _check_moe_layer() -> CheckItem:
    with tempfile.TemporaryDirectory(prefix="w4a8conv-selfcheck-") as tmp:
        source = write_checkpoint(Path(tmp) / "source", _TINY)
        convert(source, Path(tmp) / "converted", options=ConvertOptions(workers=1))
        ckpt = NpuReadyCheckpoint.open(Path(tmp) / "converted")
        src = open_source(source)
        prefix = next(iter(ckpt.stamp.records(MoeRecord)))
        try:
            with TensorReader() as reader:
                reference = check_layer(ckpt, src, reader, prefix, backend="reference")
                npu = check_layer(ckpt, src, reader, prefix, backend="npu")
        except Exception as exc:  # noqa: BLE001 - report a device failure as this check's
            return CheckItem("moe_layer", FAILED, f"running the layer raised {type(exc).__name__}: {exc}")
    detail = (f"{prefix} ({npu.experts} experts, {npu.tokens} tokens): npu backend {npu.error:.2%} from the fp32 "
              f"source forward, bound {npu.bound:.2%}; reference backend {reference.error:.2%}")
    return CheckItem("moe_layer", OK if npu.ok else FAILED, detail)


def _torch_npu():
    """(torch_npu, None) or (None, why the device checks are skipped)."""
    try:
        return moe.load_torch_npu(), None
    except UsageError as exc:
        return None, str(exc)


def run_selfcheck(*, require_device: bool = False) -> SelfcheckReport:
    """Run the checks in `CHECKS` order; device checks are skipped without torch_npu or an NPU (and then
    fail the report with `require_device`)."""
    gen = torch.Generator().manual_seed(0)
    values = torch.randint(INT4_MIN, INT4_MAX + 1, _PACK_SHAPE, generator=gen, dtype=torch.int32)
    want = pack_int4_to_int32(values)
    torch_npu, why_not = _torch_npu()
    report = SelfcheckReport(require_device=require_device)
    if torch_npu is None:
        report.items += [CheckItem(name, SKIPPED, f"skipped: {why_not}") for name in ("int4pack", "quantize")]
    else:
        device = moe.NPU_DEVICE
        report.items.append(_compare("int4pack", lambda: torch_npu.npu_convert_weight_to_int4pack(
            values.to(device)), want))
        report.items.append(_compare("quantize", lambda: torch_npu.npu_quantize(
            values.float().to(device), torch.tensor([1.0]).to(device), None, torch.quint4x2, -1, False), want))
    report.items.append(_check_scale_encoding(gen))
    report.items.append(CheckItem("moe_layer", SKIPPED, f"skipped: {why_not}") if torch_npu is None
                        else _check_moe_layer())
    return report
