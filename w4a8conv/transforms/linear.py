"""W4A8_DYNAMIC Linear transforms (dense MLP, attention), one table entry per checkpoint variant.

They reproduce vllm-ascend 0.11.0 `AscendW4A8DynamicLinearMethod.process_weights_after_loading`.
That method creates `weight_scale` / `weight_scale_second` in the model dtype, so the fp32
checkpoint scales are rounded to it before the antiquant product. The layer runs as A16W4 through
`npu_weight_quant_batchmatmul`, which reads only `weight` and the antiquant scale; the bias is kept
because vllm-ascend keeps it.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from ..constants import Variant
from .bias import msd_bias_chunks
from .int4 import kernel_words_from_pairs, kernel_words_from_values, unpack_int8_pairs_to_int4
from .moe import Parts
from .scales import round_to_dtype
from .workspace import Workspace

__all__ = ["LinearMake", "LinearOutput", "LinearSpec", "LINEAR_SPECS"]


class LinearMake(Protocol):
    """(parts, model dtype) -> output tensor; `workspace` and `out` as for the MoE `Make`."""

    def __call__(self, parts: Parts, model_dtype: torch.dtype, workspace: Workspace | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor: ...


@dataclass(frozen=True)
class LinearOutput:
    needs: tuple[str, ...]
    make: LinearMake


@dataclass(frozen=True)
class LinearSpec:
    packed_pairs: bool
    outputs: Mapping[str, LinearOutput]  # keyed by vllm-ascend's final parameter names

    @property
    def bias_name(self) -> str:
        """"weight_scale_bias" ("0") or "scale_bias" ("1.0.0"): vllm-ascend names the bias by version."""
        return next(name for name in self.outputs if name.endswith("bias"))

    def int4_values(self, weight: torch.Tensor) -> torch.Tensor:
        return unpack_int8_pairs_to_int4(weight, dim=0) if self.packed_pairs else weight


def _antiquant(parts: Parts, model_dtype: torch.dtype, _workspace: Workspace | None = None,
               _out: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 [in/G, out]: (scale x scale_second) from scales held in the model dtype."""
    channel = round_to_dtype(parts["weight_scale"], model_dtype).reshape(1, -1)
    return channel * round_to_dtype(parts["weight_scale_second"], model_dtype).t()


def _computed_bias(parts: Parts, model_dtype: torch.dtype, workspace: Workspace | None = None,
                   _out: torch.Tensor | None = None) -> torch.Tensor:
    return msd_bias_chunks(parts["weight"], round_to_dtype(parts["weight_scale"], model_dtype),
                           round_to_dtype(parts["weight_scale_second"], model_dtype), 1, workspace).reshape(-1)


def _checkpoint_bias(parts: Parts, _model_dtype: torch.dtype, _workspace: Workspace | None = None,
                     _out: torch.Tensor | None = None) -> torch.Tensor:
    """[out, 1] is flattened to [out]; a row-parallel layer's [out, 16] is kept (as vllm-ascend does)."""
    bias = parts["scale_bias"].to(torch.float32)
    return bias.reshape(-1) if bias.shape[1] == 1 else bias


def _kernel_bytes(out: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor | None:
    return None if out is None else out.view(weight.shape[1], out.numel() // weight.shape[1])


def _weight_from_values(parts: Parts, _model_dtype: torch.dtype, workspace: Workspace | None = None,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    return kernel_words_from_values(parts["weight"], _kernel_bytes(out, parts["weight"]), workspace)


def _weight_from_pairs(parts: Parts, _model_dtype: torch.dtype, workspace: Workspace | None = None,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    return kernel_words_from_pairs(parts["weight"], _kernel_bytes(out, parts["weight"]), workspace)


_ANTIQUANT = LinearOutput(("weight_scale", "weight_scale_second"), _antiquant)

LINEAR_SPECS: dict[Variant, LinearSpec] = {
    Variant.LINEAR_GROUP_V0: LinearSpec(False, {
        "weight": LinearOutput(("weight",), _weight_from_values),
        "weight_scale_second": _ANTIQUANT,
        "weight_scale_bias": LinearOutput(("weight", "weight_scale", "weight_scale_second"), _computed_bias)}),
    Variant.LINEAR_GROUP_V1: LinearSpec(True, {
        "weight": LinearOutput(("weight",), _weight_from_pairs),
        "weight_scale_second": _ANTIQUANT,
        "scale_bias": LinearOutput(("scale_bias",), _checkpoint_bias)}),
}
