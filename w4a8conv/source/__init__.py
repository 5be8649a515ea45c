"""Source reading: directory, description, index and safetensors headers -> {name: TensorRef}.

Two producers: msModelSlim (`checkpoint.py`, a quant_model_description*.json) and llm-compressor
(`compressed_tensors.py`, config.json's compressed-tensors quantization_config).
"""
from __future__ import annotations

from pathlib import Path

from ..errors import InvalidCheckpointError
from .checkpoint import SourceCheckpoint
from .checkpoint import open_source as open_msmodelslim
from .compressed_tensors import is_compressed_tensors, open_compressed_tensors
from .reader import TensorReader
from .safetensors_file import TensorRef, read_header

__all__ = ["SourceCheckpoint", "open_source", "TensorRef", "TensorReader", "read_header"]

# (does this directory hold the producer's checkpoint?, its reader); msModelSlim is the fallback,
# so its error messages are the ones a directory of neither kind gets.
_READERS = ((is_compressed_tensors, open_compressed_tensors),)


def open_source(root: Path | str, *, model_dtype: str | None = None, group_size: int | None = None) -> SourceCheckpoint:
    """Validate a source directory of either producer; read no tensor data. `group_size` states the group
    size of an msModelSlim description that has none."""
    reader = next((read for detect, read in _READERS if detect(root)), None)
    if reader is None:
        return open_msmodelslim(root, model_dtype=model_dtype, group_size=group_size)
    if group_size is not None:
        raise InvalidCheckpointError("--group-size states the group size an msModelSlim description lacks; this "
                                     "checkpoint's config.json names its own", file=root)
    return reader(root, model_dtype=model_dtype)
