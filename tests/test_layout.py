"""w4a8conv/layout.py: the vLLM MoE parameters a rank holds (`MOE_PARAMS`, `moe_param_specs`) are what the
checkpoint view builds and what the MoE layer registers, at every split the layout allows."""
from __future__ import annotations

import pytest

from w4a8conv.dtypes import TORCH_DTYPES
from w4a8conv.layout import MOE_PARAMS, moe_param_specs
from w4a8conv.runtime import MoELayer, NpuReadyCheckpoint
from w4a8conv.stamp import MoeRecord

SAFETENSORS_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}


@pytest.mark.parametrize("preset, splits", [
    ("moe-group-v1", [(1, 1), (2, 1), (4, 1), (1, 2), (2, 4)]),
    ("moe-channel-v0", [(1, 1), (8, 1), (16, 2)]),
])
def test_a_ranks_moe_tensors_have_the_layouts_names_dtypes_and_shapes(converted, preset, splits):
    _src, out = converted(preset)
    ckpt = NpuReadyCheckpoint.open(out)
    for prefix, m in ckpt.stamp.records(MoeRecord).items():
        for tp, ep in splits:
            tensors = ckpt.moe_layer(prefix, tp_size=tp, tp_rank=tp - 1, ep_size=ep, ep_rank=ep - 1)
            got = {name: (SAFETENSORS_NAMES[t.dtype], tuple(t.shape)) for name, t in tensors.items()}
            want = moe_param_specs(m.num_experts // ep, m.hidden, m.intermediate // tp, m.group_size)
            assert list(got) == list(want) == list(MOE_PARAMS), (prefix, tp, ep)
            assert got == want, (prefix, tp, ep)


def test_the_moe_layer_holds_the_parameters_under_their_names(converted):
    _src, out = converted("moe-group-v1")
    ckpt = NpuReadyCheckpoint.open(out)
    prefix = next(iter(ckpt.stamp.records(MoeRecord)))
    layer = MoELayer.from_checkpoint(ckpt, prefix, ep_size=2, ep_rank=1)
    assert [name for name, _buffer in layer.named_buffers()] == list(MOE_PARAMS)
    tensors = ckpt.moe_layer(prefix, ep_size=2, ep_rank=1)
    assert all(getattr(layer, name).equal(tensors[name]) for name in MOE_PARAMS)
