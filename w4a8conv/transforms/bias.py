"""The MSD bias the A8W4 grouped matmul adds.

The kernel splits int8 activations as x = 16·xh + xl + 8 with xh, xl in int4 range, so x·W needs
+8·Σ_k W[k, n]·s[k, n] on top of the two int4 products; checkpoints of version "1.0.0" ship it as
`scale_bias`, version "0" ones do not and vllm-ascend computes it at load
(`process_scale`, the `weight_high` sum), in fp32, from the unrounded scales.
"""
from __future__ import annotations

import numpy as np
import torch

from .workspace import Workspace

__all__ = ["msd_bias_chunks"]

_BLOCK_ELEMENTS = 64 * 2**10  # fp32 products per block: 256 KiB


def msd_bias_chunks(values: torch.Tensor, channel_scale: torch.Tensor,
                    group_scale: torch.Tensor | None, chunks: int, workspace: Workspace | None = None) -> torch.Tensor:
    """8·Σ_k W·s2·s1 over `chunks` contiguous slices of the input dimension.

    values int8 [N, K] (int4 values), channel_scale [N, 1], group_scale [N, K/G] or None
    (per-channel) -> fp32 [N, chunks]. Multiplication order follows vllm-ascend: (W·s2)·s1.

    Rows are independent, so they are done a block at a time: the fp32 products of a block stay in
    the L2 cache (in `workspace`'s buffers when given) instead of four matrix-sized temporaries. Each
    row's sum is torch's reduction over the same contiguous elements, so the bits are those of the
    whole-matrix formula.
    """
    n, k = values.shape
    if k % chunks:
        raise ValueError(f"input dimension {k} does not split into {chunks} chunks")
    step = max(1, _BLOCK_ELEMENTS // max(k, 1))
    weighted = torch.from_numpy(workspace.array("bias-products", (min(step, n), k), np.float32) if workspace
                                else np.empty((min(step, n), k), np.float32))
    channel = channel_scale.to(torch.float32).reshape(n, 1)
    groups = group_scale.shape[1] if group_scale is not None else 0
    group = group_scale.to(torch.float32).reshape(n, groups, 1) if group_scale is not None else None
    result = torch.empty((n, chunks), dtype=torch.float32)
    for start in range(0, n, step):
        stop = min(start + step, n)
        block = weighted[:stop - start]
        if group is not None:
            torch.mul(values[start:stop].reshape(stop - start, groups, k // groups), group[start:stop],
                      out=block.view(stop - start, groups, k // groups))
            block.mul_(channel[start:stop])
        else:
            torch.mul(values[start:stop], channel[start:stop], out=block)
        torch.sum(block.view(stop - start, chunks, k // chunks), dim=2, out=result[start:stop])
    return result.mul_(8)
