"""Source reading: directory, description, index and safetensors headers -> {name: TensorRef}."""
from .checkpoint import SourceCheckpoint, open_source
from .reader import TensorReader
from .safetensors_file import TensorRef, read_header

__all__ = ["SourceCheckpoint", "open_source", "TensorRef", "TensorReader", "read_header"]
