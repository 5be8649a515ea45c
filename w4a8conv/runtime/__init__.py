"""The runtime side: read converted checkpoints for a serving stack (no vLLM needed)."""
from .checkpoint import NpuReadyCheckpoint, RankSplit

__all__ = ["NpuReadyCheckpoint", "RankSplit"]
