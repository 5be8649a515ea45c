"""The MSD bias the A8W4 grouped matmul adds.

The kernel splits int8 activations as x = 16·xh + xl + 8 with xh, xl in int4 range, so x·W needs
+8·Σ_k W[k, n]·s[k, n] on top of the two int4 products; checkpoints of version "1.0.0" ship it as
`scale_bias`, version "0" ones do not and vllm-ascend computes it at load
(`process_scale`, the `weight_high` sum), in fp32, from the unrounded scales.
"""
from __future__ import annotations

import torch

__all__ = ["msd_bias_chunks"]


def msd_bias_chunks(values: torch.Tensor, channel_scale: torch.Tensor,
                    group_scale: torch.Tensor | None, chunks: int) -> torch.Tensor:
    """8·Σ_k W·s2·s1 over `chunks` contiguous slices of the input dimension.

    values int8 [N, K] (int4 values), channel_scale [N, 1], group_scale [N, K/G] or None
    (per-channel) -> fp32 [N, chunks]. Multiplication order follows vllm-ascend: (W·s2)·s1.
    """
    n, k = values.shape
    if k % chunks:
        raise ValueError(f"input dimension {k} does not split into {chunks} chunks")
    weighted = values.to(torch.float32)
    if group_scale is not None:
        groups = group_scale.shape[1]
        weighted = (weighted.reshape(n, groups, k // groups)
                    * group_scale.to(torch.float32).reshape(n, groups, 1)).reshape(n, k)
    weighted = weighted * channel_scale.to(torch.float32).reshape(n, 1)
    return 8 * weighted.reshape(n, chunks, k // chunks).sum(dim=2)
