"""w4a8conv: convert msModelSlim W4A8_DYNAMIC checkpoints once, offline, into the layout
vllm-ascend's A8W4 kernels consume, and read that layout back for any TP/EP rank.

Importing the package imports neither vLLM, vllm-ascend nor torch_npu.
"""
from __future__ import annotations

from .version import __version__

__all__ = ["__version__", "convert", "inspect"]


def __getattr__(name: str):
    if name in ("convert", "inspect"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'w4a8conv' has no attribute {name!r}")
