"""Strict safetensors header reading: name -> TensorRef, no tensor data touched.

Checkpoints come from the internet, so every header field is checked against the file before an
offset is trusted: header length, JSON shape, dtype, byte length = numel x itemsize, offsets inside
the data region and not overlapping.
"""
from __future__ import annotations

import json
import math
import os
import stat
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

from ..dtypes import DTYPE_SIZES, MAX_DIM, TORCH_DTYPES, torch_shape_problem
from ..errors import InvalidCheckpointError

__all__ = ["DTYPE_SIZES", "TORCH_DTYPES", "TensorRef", "SafetensorsHeader", "read_header", "parse_json",
           "MAX_HEADER_BYTES", "MAX_DIM"]

MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes lie (`TensorReader` reads them)."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in `file`
    nbytes: int


@dataclass(frozen=True)
class SafetensorsHeader:
    file: Path
    header_bytes: bytes  # the raw JSON, for fingerprints
    metadata: dict[str, str]
    tensors: dict[str, TensorRef]  # in data-offset order


def _fail(file: Path, rule: str, tensor: str | None = None) -> InvalidCheckpointError:
    return InvalidCheckpointError(rule, file=file, tensor=tensor)


def parse_json(raw: bytes, file: Path, what: str = "") -> object:
    """JSON from untrusted bytes, or `InvalidCheckpointError` "<what>not valid JSON (<why>)" naming `file`."""
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(file, f"{what}not valid JSON ({exc})") from None
    except ValueError:  # the only other ValueError json raises: an integer past Python's int-string limit
        raise _fail(file, f"{what}not valid JSON (an integer of more than {sys.get_int_max_str_digits()} "
                          "digits)") from None
    except RecursionError:
        raise _fail(file, f"{what}not valid JSON (nested too deeply)") from None


def _encodable(name: str) -> bool:
    try:
        name.encode()
    except UnicodeEncodeError:
        return False
    return True


def read_header(file: Path) -> SafetensorsHeader:
    """Parse and validate one safetensors file's header."""
    try:
        info = os.stat(file)
        if not stat.S_ISREG(info.st_mode):  # a FIFO or device would block or never end
            raise _fail(file, "is not a regular file")
        size = info.st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _fail(file, f"safetensors file of {size} bytes is shorter than its 8-byte header length")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER_BYTES:
                raise _fail(file, f"header length {length} exceeds the {MAX_HEADER_BYTES}-byte limit")
            if 8 + length > size:
                raise _fail(file, f"header length {length} runs past the end of the {size}-byte file")
            raw = f.read(length)
    except OSError as exc:
        raise _fail(file, f"cannot read: {exc.strerror or exc}") from None
    header = parse_json(raw, file, "header is ")
    if not isinstance(header, dict):
        raise _fail(file, "header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _fail(file, "__metadata__ is not a map of strings")
    data_start, data_size = 8 + length, size - 8 - length
    spans: list[tuple[int, int, str]] = []
    refs: dict[str, TensorRef] = {}
    for name, info in header.items():
        if not _encodable(name):
            raise _fail(file, f"tensor name {name!r} is not valid Unicode (a lone surrogate)")
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise _fail(file, "entry needs exactly dtype, shape and data_offsets", name)
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise _fail(file, f"unknown dtype {dtype!r}", name)
        problem = torch_shape_problem(shape)
        if problem:
            raise _fail(file, f"shape {shape!r} {problem}", name)
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
            raise _fail(file, f"data_offsets {offsets!r} are not [begin, end] with 0 <= begin <= end", name)
        begin, end = offsets
        expected = math.prod(shape) * DTYPE_SIZES[dtype]
        if end - begin != expected:
            raise _fail(file, f"{dtype} {shape} needs {expected} bytes but data_offsets span {end - begin}", name)
        if end > data_size:
            raise _fail(file, f"data_offsets end {end} is past the data region of {data_size} bytes", name)
        spans.append((begin, end, name))
        refs[name] = TensorRef(name, file, dtype, tuple(shape), data_start + begin, end - begin)
    spans.sort()
    for (b0, e0, n0), (b1, _e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise _fail(file, f"data of {n1} overlaps {n0} (bytes {b1} < {e0})", n1)
    ordered = {name: refs[name] for _b, _e, name in spans}
    return SafetensorsHeader(Path(file), bytes(raw), dict(metadata), ordered)
