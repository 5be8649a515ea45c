"""Format facts shared by the converter, the writer and the runtime view."""
from __future__ import annotations

from enum import Enum, IntEnum

__all__ = [
    "SOURCE_TYPE", "CONVERTED_TYPE", "LAYOUT_NAME", "LAYOUT_VERSION", "STAMP_KEY",
    "DOWN_BIAS_CHUNKS", "INT4_PER_INT32", "QuantVersion", "Variant", "GroupSizeFrom",
    "ExitCode", "DESCRIPTION_NAME", "INDEX_NAME", "SHARD_NAME", "MAX_OPTION_VALUE",
]

SOURCE_TYPE = "W4A8_DYNAMIC"
CONVERTED_TYPE = "W4A8_DYNAMIC_NPU"

LAYOUT_NAME = "w4a8conv-npu-ready"
LAYOUT_VERSION = 2
STAMP_KEY = "w4a8conv"

# msModelSlim cuts down_proj's input dimension in 16 chunks for scale_bias; vllm-ascend gives each
# of T MoE tensor-parallel ranks 16/T of them, so T must divide 16.
DOWN_BIAS_CHUNKS = 16
INT4_PER_INT32 = 8

DESCRIPTION_NAME = "quant_model_description.json"
INDEX_NAME = "model.safetensors.index.json"
SHARD_NAME = "model-{index:05d}-of-{count:05d}.safetensors"
MAX_OPTION_VALUE = 2**63 - 1  # the largest file size: a shard size or worker count above it is absurd


class QuantVersion(str, Enum):
    """The description's `version`: "0" stores one int4 per int8, "1.0.0" two per int8."""

    V0 = "0"
    V1 = "1.0.0"


class Variant(str, Enum):
    """Every W4A8_DYNAMIC module kind the converter knows; each maps to one transform table entry."""

    MOE_GROUP_V0 = "moe-group-v0"
    MOE_GROUP_V1 = "moe-group-v1"
    MOE_CHANNEL_V0 = "moe-channel-v0"
    MOE_CHANNEL_V1 = "moe-channel-v1"
    MOE_GROUP_CT = "moe-group-ct"      # compressed-tensors (llm-compressor), int4 values one per int8
    MOE_CHANNEL_CT = "moe-channel-ct"
    # vllm-ascend's DeepSeek-V4 script: down_proj's scale_bias is one [out, 1] total, not 16 chunks
    MOE_CHANNEL_V1_BIAS_TOTAL = "moe-channel-v1-bias-total"
    LINEAR_GROUP_V0 = "linear-group-v0"
    LINEAR_GROUP_V1 = "linear-group-v1"

    @property
    def kind(self) -> str:
        """"moe" or "linear": the kind of module the variant converts (the stamp records both)."""
        return self.value.split("-", 1)[0]


class GroupSizeFrom(str, Enum):
    """Where the group size came from (recorded in the stamp)."""

    DESCRIPTION = "description"
    SHAPES = "shapes"      # no group_size in the description: inferred from weight_scale_second
    OPTION = "option"      # stated with --group-size (and checked against the shapes)
    DEFAULT = "default"    # no group_size and no per-group tensor: vllm-ascend's 256


class ExitCode(IntEnum):
    """Process exit codes of the CLI (documented in README)."""

    OK = 0
    INTERNAL = 1
    USAGE = 2
    INVALID_INPUT = 3
    IO_FAILURE = 4
    VERIFY_FAILED = 5
    INCOMPLETE = 6  # commit: a planned task is not finished, or its shards were altered
