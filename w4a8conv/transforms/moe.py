"""MoE expert transforms, one table entry per checkpoint variant.

Each `make` takes one expert projection's source tensors in source orientation ([out, in]) and
returns that expert's slice of an output tensor in kernel orientation ([in, out]). Together they
reproduce vllm-ascend 0.11.0 `AscendW4A8DynamicFusedMoEMethod.process_weights_after_loading`:
transpose(1, 2), `process_scale`, `update_bias` and `pack_to_int32`; for compressed-tensors sources
(llm-compressor) vllm-ascend 0.23.0 `process_weights_after_loading_compressed_tensors`: the same
transpose and int4 words, the fp32 bits of the checkpoint's own scale (no fp16 product) and
8·Σ W·s computed from it.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from ..constants import Variant
from .bias import msd_bias_chunks
from .int4 import kernel_words_from_pairs, kernel_words_from_values, unpack_int8_pairs_to_int4
from .scales import encode_fp32_bits_as_int64, fuse_group_scales_fp16
from .workspace import Workspace

__all__ = ["Parts", "Make", "Output", "ScaleLayout", "MoeSpec", "MOE_SPECS"]

Parts = Mapping[str, torch.Tensor]
"""Source tensors of one projection keyed by suffix (weight, weight_scale, weight_scale_second, scale_bias)."""


class Make(Protocol):
    """(parts, bias chunks) -> one expert's slice of an output tensor.

    `workspace` lends reusable temporaries; `out`, an int8 tensor of the result's size (a staging
    buffer's slice), may receive the result, which is then a view of it: the weight transforms write
    there directly, the small outputs ignore it (the caller copies what it gets)."""

    def __call__(self, parts: Parts, chunks: int, workspace: Workspace | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor: ...


@dataclass(frozen=True)
class Output:
    """One output tensor's producer: the source suffixes it reads and the pure function."""

    needs: tuple[str, ...]
    make: Make


@dataclass(frozen=True)
class ScaleLayout:
    """How a source stores one projection's scales, and what they mean."""

    per_group: bool
    shapes: Callable[[int, int, int], dict[str, tuple[int, int]]]  # (out, in, G) -> suffix -> shape
    factors: Callable[[Parts], tuple[torch.Tensor, torch.Tensor | None]]  # fp32 (channel [out, 1], group [out, in/G])
    fp16_fused: bool  # the kernel scale is fp16(channel x group), not the checkpoint's value itself


def _msmodelslim_channel_shapes(out: int, _inp: int, _group: int) -> dict[str, tuple[int, int]]:
    return {"weight_scale": (out, 1), "weight_offset": (out, 1)}


def _msmodelslim_group_shapes(out: int, inp: int, group: int) -> dict[str, tuple[int, int]]:
    return {**_msmodelslim_channel_shapes(out, inp, group),
            "weight_scale_second": (out, inp // group), "weight_offset_second": (out, inp // group)}


def _compressed_tensors_shapes(out: int, inp: int, group: int) -> dict[str, tuple[int, int]]:
    """Symmetric compressed-tensors: one scale per output channel or per group, no zero point."""
    return {"weight_scale": (out, inp // group if group else 1)}


def _fp32(parts: Parts, suffix: str) -> torch.Tensor:
    return parts[suffix].to(torch.float32)


MSMODELSLIM_CHANNEL = ScaleLayout(False, _msmodelslim_channel_shapes, lambda p: (_fp32(p, "weight_scale"), None),
                                  False)
MSMODELSLIM_GROUP = ScaleLayout(True, _msmodelslim_group_shapes,
                                lambda p: (_fp32(p, "weight_scale"), _fp32(p, "weight_scale_second")), True)
# Multiplying by an all-ones channel scale is exact, so the msModelSlim formulas serve both.
COMPRESSED_CHANNEL = ScaleLayout(False, _compressed_tensors_shapes, lambda p: (_fp32(p, "weight_scale"), None),
                                 False)
COMPRESSED_GROUP = ScaleLayout(
    True, _compressed_tensors_shapes,
    lambda p: (torch.ones(p["weight_scale"].shape[0], 1), _fp32(p, "weight_scale")), False)


@dataclass(frozen=True)
class MoeSpec:
    packed_pairs: bool  # "1.0.0": two int4 per int8 byte along the output dimension
    outputs: Mapping[str, Output]  # "weight" int32 [in, out/8], "weight_scale" int64 [in/G or 1, out],
    #                                "scale_bias" fp32 [out, chunks]
    scales: ScaleLayout
    down_bias_total: bool = False  # the checkpoint's down_proj scale_bias is [out, 1], the chunks' sum

    @property
    def per_group(self) -> bool:
        return self.scales.per_group

    @property
    def bias_in_checkpoint(self) -> bool:
        return "scale_bias" in self.outputs["scale_bias"].needs

    def int4_values(self, weight: torch.Tensor) -> torch.Tensor:
        """The projection's int4 values, int8 [out, in], whichever way the source stores them."""
        return unpack_int8_pairs_to_int4(weight, dim=0) if self.packed_pairs else weight


def _kernel_bytes(out: torch.Tensor | None, parts: Parts) -> torch.Tensor | None:
    """`out` viewed as the int8 [in, out/2] the weight transforms write (None stays None)."""
    if out is None:
        return None
    rows, cols = parts["weight"].shape
    return out.view(cols, out.numel() // cols)


def _weight_from_values(parts: Parts, _chunks: int, workspace: Workspace | None = None,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    return kernel_words_from_values(parts["weight"], _kernel_bytes(out, parts), workspace)


def _weight_from_pairs(parts: Parts, _chunks: int, workspace: Workspace | None = None,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    return kernel_words_from_pairs(parts["weight"], _kernel_bytes(out, parts), workspace)


def _group_scale(parts: Parts, _chunks: int, _workspace: Workspace | None = None,
                 _out: torch.Tensor | None = None) -> torch.Tensor:
    return encode_fp32_bits_as_int64(fuse_group_scales_fp16(parts["weight_scale"], parts["weight_scale_second"]))


def _channel_scale(parts: Parts, _chunks: int, _workspace: Workspace | None = None,
                   _out: torch.Tensor | None = None) -> torch.Tensor:
    return encode_fp32_bits_as_int64(parts["weight_scale"].to(torch.float32).reshape(1, -1))


def _unfused_group_scale(parts: Parts, _chunks: int, _workspace: Workspace | None = None,
                         _out: torch.Tensor | None = None) -> torch.Tensor:
    """compressed-tensors per group: [out, in/G] bf16 -> int64 [in/G, out] holding its fp32 bits."""
    return encode_fp32_bits_as_int64(parts["weight_scale"].to(torch.float32).t())


def _unfused_group_bias(parts: Parts, chunks: int, workspace: Workspace | None = None,
                        _out: torch.Tensor | None = None) -> torch.Tensor:
    channel, group = COMPRESSED_GROUP.factors(parts)
    return msd_bias_chunks(parts["weight"], channel, group, chunks, workspace)


def _checkpoint_bias(parts: Parts, _chunks: int, _workspace: Workspace | None = None,
                     _out: torch.Tensor | None = None) -> torch.Tensor:
    return parts["scale_bias"].to(torch.float32)


def _group_bias(parts: Parts, chunks: int, workspace: Workspace | None = None,
                _out: torch.Tensor | None = None) -> torch.Tensor:
    return msd_bias_chunks(parts["weight"], parts["weight_scale"], parts["weight_scale_second"], chunks, workspace)


def _channel_bias(parts: Parts, chunks: int, workspace: Workspace | None = None,
                  _out: torch.Tensor | None = None) -> torch.Tensor:
    return msd_bias_chunks(parts["weight"], parts["weight_scale"], None, chunks, workspace)


def _channel_bias_from_pairs(parts: Parts, chunks: int, workspace: Workspace | None = None,
                             _out: torch.Tensor | None = None) -> torch.Tensor:
    """gate/up: the checkpoint's bias; down: its 16 chunk sums recomputed from the packed integers (the
    checkpoint holds only their total, which `produce` checks them against)."""
    if chunks == 1:
        return _checkpoint_bias(parts, chunks)
    return msd_bias_chunks(unpack_int8_pairs_to_int4(parts["weight"], dim=0), parts["weight_scale"], None, chunks,
                           workspace)


_VALUES = Output(("weight",), _weight_from_values)
_PAIRS = Output(("weight",), _weight_from_pairs)
_GROUP_SCALE = Output(("weight_scale", "weight_scale_second"), _group_scale)
_CHANNEL_SCALE = Output(("weight_scale",), _channel_scale)
_BIAS_FROM_CHECKPOINT = Output(("scale_bias",), _checkpoint_bias)

_CHANNEL_BIAS = Output(("weight", "weight_scale"), _channel_bias)

MOE_SPECS: dict[Variant, MoeSpec] = {
    Variant.MOE_GROUP_V0: MoeSpec(False, {
        "weight": _VALUES, "weight_scale": _GROUP_SCALE,
        "scale_bias": Output(("weight", "weight_scale", "weight_scale_second"), _group_bias)}, MSMODELSLIM_GROUP),
    Variant.MOE_GROUP_V1: MoeSpec(True, {
        "weight": _PAIRS, "weight_scale": _GROUP_SCALE, "scale_bias": _BIAS_FROM_CHECKPOINT}, MSMODELSLIM_GROUP),
    # vllm-ascend 0.11 serves a per-channel "0" checkpoint with no bias at all; computing it makes
    # the converted model right where the online path is not.
    Variant.MOE_CHANNEL_V0: MoeSpec(False, {
        "weight": _VALUES, "weight_scale": _CHANNEL_SCALE, "scale_bias": _CHANNEL_BIAS}, MSMODELSLIM_CHANNEL),
    Variant.MOE_CHANNEL_V1: MoeSpec(True, {
        "weight": _PAIRS, "weight_scale": _CHANNEL_SCALE, "scale_bias": _BIAS_FROM_CHECKPOINT}, MSMODELSLIM_CHANNEL),
    Variant.MOE_GROUP_CT: MoeSpec(False, {
        "weight": _VALUES, "weight_scale": Output(("weight_scale",), _unfused_group_scale),
        "scale_bias": Output(("weight", "weight_scale"), _unfused_group_bias)}, COMPRESSED_GROUP),
    Variant.MOE_CHANNEL_CT: MoeSpec(False, {
        "weight": _VALUES, "weight_scale": _CHANNEL_SCALE, "scale_bias": _CHANNEL_BIAS}, COMPRESSED_CHANNEL),
    # vllm-ascend cannot serve a [out, 1] down_proj bias (0.18 fails to load it, 0.23 leaves 15 of 16
    # columns unset); the chunks it needs are recomputed, so the converted model serves correctly.
    Variant.MOE_CHANNEL_V1_BIAS_TOTAL: MoeSpec(True, {
        "weight": _PAIRS, "weight_scale": _CHANNEL_SCALE,
        "scale_bias": Output(("weight", "weight_scale", "scale_bias"), _channel_bias_from_pairs)},
        MSMODELSLIM_CHANNEL, down_bias_total=True),
}
