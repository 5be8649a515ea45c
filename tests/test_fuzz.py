"""Fuzzing the parsers that see untrusted bytes: safetensors headers, the description, the index and
config.json of a source, and the stamp and index of a converted directory. Whatever the input, the
only exceptions allowed out are w4a8conv's own (`W4A8Error` subclasses), and a header that is accepted
must describe byte ranges that lie inside the file without overlapping.

Also the scale policy and the int64 scale encoding as properties.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from w4a8conv.errors import W4A8Error
from w4a8conv.plan import make_plan
from w4a8conv.source import open_source, read_header
from w4a8conv.source.safetensors_file import DTYPE_SIZES
from w4a8conv.transforms.rules import scale_violation
from w4a8conv.transforms.scales import decode_int64_to_fp32, encode_fp32_bits_as_int64, high_words_are_zero

from robustness_support import DESCRIPTION, INDEX, MOE, WEIGHTS, build, read_raw

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                database=None)
_counter = itertools.count()

# An integer past Python's int-string limit: json.dumps cannot write it, so `dumps` puts it in for this string.
BIG_INT = "@@int-past-the-limit@@"
BIG_INT_DIGITS = "7" * (sys.get_int_max_str_digits() + 1)

# JSON values of every kind, with the awkward ones made likely: non-ASCII digits (a superscript,
# Arabic-Indic), lone surrogates, names that leave the directory, huge and zero sizes.
TRICKY_TEXT = st.sampled_from(["", ".", "..", "../x.safetensors", "/etc/passwd", "a\x00b", "\ud800", "x\udfff",
                               "x" * 300, "quant_model_weights.safetensors", "W4A8_DYNAMIC", "FLOAT", "1.0.0", "0",
                               "F32", "I8", "bfloat16", "__metadata__", "model.layers.\u00b2", "experts.\u0663",
                               "\u0663", BIG_INT])
TRICKY_INT = st.sampled_from([-1, 0, 1, 7, 8, 16, 32, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64 + 5, 10**30, BIG_INT])


def dumps(doc) -> bytes:
    """json.dumps, with every BIG_INT string turned into an integer of more digits than Python parses."""
    return json.dumps(doc).replace(f'"{BIG_INT}"', BIG_INT_DIGITS).replace(BIG_INT, BIG_INT_DIGITS).encode()
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), TRICKY_INT,
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8), TRICKY_TEXT)
JSON = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                    max_leaves=8)


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz")
    return {"v1": build("v1", root / "v1"), "v1-sharded": build("v1-sharded", root / "v1-sharded"),
            "work": root / "work"}


def _fresh(bases: dict[str, Path], base: str) -> Path:
    """A new directory holding hard links to a base source (cheap, and inside the directory)."""
    target = bases["work"] / f"case{next(_counter)}"
    target.mkdir(parents=True)
    for f in bases[base].iterdir():
        os.link(f, target / f.name)
    return target


def _replace(path: Path, data: bytes) -> None:
    path.unlink()  # break the hard link: never write through to the base
    path.write_bytes(data)


def _open_and_plan(root: Path) -> None:
    """Only w4a8conv errors may come out of reading and planning a source."""
    try:
        make_plan(open_source(root))
    except W4A8Error:
        pass
    finally:
        shutil.rmtree(root)


def _mutate_bytes(data: bytes, draw) -> bytes:
    """Flip, insert, delete or truncate bytes of a serialized document."""
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 16))]
        else:
            del data[at:]
    return bytes(data)


def _mutate_json(doc, draw):
    """Set, delete or replace entries somewhere in a JSON document (dicts only, at depth <= 2)."""
    for _ in range(draw(st.integers(1, 3))):
        target = doc
        if isinstance(doc, dict) and doc and draw(st.booleans()):
            inner_key = draw(st.sampled_from(sorted(doc)))
            if isinstance(doc[inner_key], dict):
                target = doc[inner_key]
        if not isinstance(target, dict):
            return draw(JSON)
        action = draw(st.sampled_from(["set", "set", "delete", "replace"]))
        keys = sorted(target)
        key = draw(st.sampled_from(keys)) if keys and draw(st.booleans()) else draw(st.one_of(st.text(max_size=6),
                                                                                          TRICKY_TEXT))
        if action == "set":
            target[key] = draw(JSON)
        elif action == "delete":
            target.pop(key, None)
        else:
            return draw(JSON)
    return doc


# -- safetensors headers -------------------------------------------------------------------------------------


def _check_accepted(file: Path) -> None:
    """read_header raises a w4a8conv error, or returns refs that lie in the data region without overlap."""
    try:
        header = read_header(file)
    except W4A8Error:
        return
    size = file.stat().st_size
    data_start = 8 + len(header.header_bytes)
    spans = []
    for ref in header.tensors.values():
        assert ref.nbytes == math.prod(ref.shape) * DTYPE_SIZES[ref.dtype]
        assert data_start <= ref.offset and ref.offset + ref.nbytes <= size
        spans.append((ref.offset, ref.offset + ref.nbytes))
    spans.sort()
    assert all(b1 >= e0 for (_b0, e0), (b1, _e1) in zip(spans, spans[1:]))


@FUZZ
@given(blob=st.binary(max_size=600))
def test_read_header_on_random_bytes(bases, blob):
    file = bases["work"] / "random.safetensors"
    file.parent.mkdir(exist_ok=True)
    file.write_bytes(blob)
    _check_accepted(file)


@FUZZ
@given(data=st.data())
def test_read_header_on_mutated_headers(bases, data):
    header, payload = read_raw(bases["v1"] / WEIGHTS)
    draw = data.draw
    how = draw(st.sampled_from(["json", "json", "bytes", "length"]))
    raw = dumps(header)
    declared = None
    if how == "json":
        name = draw(st.sampled_from(sorted(header)))
        entry = header[name]
        if isinstance(entry, dict) and draw(st.booleans()):
            field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))
            entry[field] = draw(st.one_of(JSON, st.lists(TRICKY_INT, max_size=3),
                                          st.sampled_from(sorted(DTYPE_SIZES))))
        else:
            header = _mutate_json(header, draw)
        raw = dumps(header)
    elif how == "bytes":
        raw = _mutate_bytes(raw, draw)
    else:
        declared = draw(st.one_of(st.integers(0, len(raw) + len(payload) + 16), st.integers(0, 2**64 - 1)))
    file = bases["work"] / "mutated.safetensors"
    file.parent.mkdir(exist_ok=True)
    file.write_bytes(struct.pack("<Q", len(raw) if declared is None else declared) + raw
                     + payload[: draw(st.sampled_from([len(payload), len(payload) // 2, 0]))])
    _check_accepted(file)


# -- the source's JSON files ---------------------------------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_open_source_with_a_mutated_description(bases, data):
    root = _fresh(bases, "v1")
    raw = (root / DESCRIPTION).read_bytes()
    if data.draw(st.booleans()):
        mutated = dumps(_mutate_json(json.loads(raw), data.draw))
    else:
        mutated = _mutate_bytes(raw, data.draw)
    _replace(root / DESCRIPTION, mutated)
    _open_and_plan(root)


@FUZZ
@given(data=st.data())
def test_open_source_with_a_mutated_index(bases, data):
    root = _fresh(bases, "v1-sharded")
    raw = (root / INDEX).read_bytes()
    choice = data.draw(st.sampled_from(["weight_map", "json", "bytes"]))
    if choice == "weight_map":
        index = json.loads(raw)
        names = sorted(index["weight_map"])
        for _ in range(data.draw(st.integers(1, 3))):
            name = data.draw(st.sampled_from(names))
            index["weight_map"][name] = data.draw(st.one_of(TRICKY_TEXT, JSON, st.text(max_size=40)))
        mutated = dumps(index)
    elif choice == "json":
        mutated = dumps(_mutate_json(json.loads(raw), data.draw))
    else:
        mutated = _mutate_bytes(raw, data.draw)
    _replace(root / INDEX, mutated)
    _open_and_plan(root)


@settings(max_examples=60, deadline=None, database=None)
@given(value=JSON)
def test_open_source_with_any_config_dtype(bases, value):
    root = _fresh(bases, "v1")
    config = json.loads((root / "config.json").read_text())
    config["torch_dtype"] = value
    _replace(root / "config.json", dumps(config))
    _open_and_plan(root)


# -- tensor names and sizes, through a whole conversion ----------------------------------------------------

NAME_PART = st.one_of(st.sampled_from(["0", "3", "4", "007", "1" * 19, "\u0663", "\u00b2", "\ud800", BIG_INT,
                                       "gate_proj", "weight"]), st.text(max_size=4))
DIM = st.one_of(st.sampled_from([0, 1, 2, 8, 2**31, 2**63 - 1, 2**63, 2**64, BIG_INT]), st.integers(0, 6))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
@given(data=st.data())
def test_convert_with_an_added_tensor_of_tricky_name_and_shape(bases, data, tmp_path_factory):
    """A tensor whose name holds long or non-ASCII digits or surrogates, or whose shape mixes zero and
    huge sizes: `convert` either refuses it with a w4a8conv error before the completion marker exists,
    or writes an output that `verify` accepts and the runtime reads."""
    from w4a8conv.api import ConvertOptions, convert
    from w4a8conv.constants import DESCRIPTION_NAME
    from w4a8conv.runtime import NpuReadyCheckpoint
    from w4a8conv.verify import verify

    root = _fresh(bases, "v1")
    header, payload = read_raw(root / WEIGHTS)
    template = data.draw(st.sampled_from([f"{MOE}.experts.{{}}.gate_proj.weight", "model.layers.{}.extra.weight",
                                          "extra.{}", "{}"]))
    name = template.format(data.draw(NAME_PART))
    shape = data.draw(st.lists(DIM, max_size=3))
    dtype = data.draw(st.sampled_from(["F32", "I8", "BF16"]))
    real = all(isinstance(d, int) for d in shape)
    nbytes = math.prod(shape) * DTYPE_SIZES[dtype] if real else 0
    data_end = len(payload)
    if real and nbytes <= 4096:
        payload += bytes(nbytes)
    header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [data_end, data_end + min(nbytes, 4096)]}
    _replace(root / WEIGHTS, struct.pack("<Q", len(dumps(header))) + dumps(header) + payload)
    description = json.loads((root / DESCRIPTION).read_text())
    description[name] = data.draw(st.sampled_from(["FLOAT", "W4A8_DYNAMIC"]))
    _replace(root / DESCRIPTION, dumps(description))
    out = tmp_path_factory.mktemp("fuzz-out") / "out"
    try:
        try:
            convert(root, out, options=ConvertOptions(workers=1))
        except W4A8Error:
            assert not (out / DESCRIPTION_NAME).exists()
            return
        assert verify(out, source=root, sample=None).ok
        ckpt = NpuReadyCheckpoint.open(out)
        assert list(ckpt.tensor(name.replace(BIG_INT, BIG_INT_DIGITS)).shape) == shape  # the name as written
    finally:
        shutil.rmtree(root)
        shutil.rmtree(out, ignore_errors=True)


@settings(max_examples=400, deadline=None, database=None)
@given(sizes=st.lists(st.one_of(DIM.filter(lambda d: isinstance(d, int)), st.integers(0, 2**64)), max_size=4),
       zero_at=st.integers(0, 4))
def test_the_shape_rule_is_exactly_what_torch_can_make(sizes, zero_at):
    """On zero-byte shapes (which torch makes without allocating), torch_shape_problem (the header parsers'
    rule) refuses exactly those torch.empty cannot make ([8, 2^63 - 1, 0] overflows torch's storage size)."""
    from w4a8conv.dtypes import torch_shape_problem

    shape = sizes[:zero_at] + [0] + sizes[zero_at:]
    try:
        torch.empty(shape, dtype=torch.int8)
        made = True
    except (RuntimeError, TypeError, OverflowError):
        made = False
    assert (torch_shape_problem(shape) is None) == made, shape


@pytest.mark.parametrize("shape", [[8, 2**63 - 1, 0], [2**32, 2**32, 0], [0, 2, 2**63 - 1]])
def test_the_shape_rule_on_the_shapes_the_fuzzer_found(shape):
    from w4a8conv.dtypes import torch_shape_problem

    assert torch_shape_problem(shape)
    with pytest.raises(RuntimeError):
        torch.empty(shape)
    assert torch_shape_problem([2**32 - 1, 2**32 + 1, 0]) is None  # (2^32)^2 - 1: the largest product that fits


# -- converted directories: the runtime and verify ----------------------------------------------------------


@pytest.fixture(scope="module")
def converted_base(bases):
    from w4a8conv.api import ConvertOptions, convert

    out = bases["work"].parent / "converted"
    convert(bases["v1"], out, options=ConvertOptions(max_shard_bytes=20_000, workers=1))
    return out


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None,
          phases=[Phase.explicit, Phase.generate])  # no shrinking: report the first crash quickly
@given(data=st.data())
def test_runtime_and_verify_on_a_mutated_stamp_or_index(bases, converted_base, data):
    """open() and moe_layer() raise only w4a8conv errors; verify() never raises."""
    from w4a8conv.runtime import NpuReadyCheckpoint
    from w4a8conv.verify import verify

    root = bases["work"] / f"rt{next(_counter)}"
    root.mkdir(parents=True)
    for f in converted_base.iterdir():
        os.link(f, root / f.name)
    which = data.draw(st.sampled_from(["quant_model_description.json", "model.safetensors.index.json"]))
    doc = json.loads((root / which).read_text())
    if which == "quant_model_description.json" and data.draw(st.booleans()):
        doc["w4a8conv"] = _mutate_json(doc["w4a8conv"], data.draw)  # the stamp and its records
    else:
        doc = _mutate_json(doc, data.draw)
    _replace(root / which, dumps(doc))
    try:
        try:
            NpuReadyCheckpoint.open(root).moe_layer(MOE, tp_size=2, tp_rank=1)
        except W4A8Error:
            pass
        verify(root)
    finally:
        shutil.rmtree(root)


# -- scale policy and encoding -------------------------------------------------------------------------------

FP32 = st.floats(width=32, allow_nan=True, allow_infinity=True)


@settings(max_examples=300, deadline=None, database=None)
@given(value=FP32)
def test_scale_policy_is_finite_and_not_negative(value):
    """A scale is accepted exactly when it is finite and >= 0 (zero, and IEEE -0.0 == 0, included)."""
    problem = scale_violation(torch.tensor([[value]], dtype=torch.float32))
    assert (problem is None) == (math.isfinite(value) and value >= 0), (value, problem)


@settings(max_examples=300, deadline=None, database=None)
@given(values=st.lists(st.floats(width=32, max_value=-0.0, allow_nan=False), min_size=1, max_size=16))
def test_int64_encoding_of_a_negative_scale_is_a_zero_extension(values):
    """The low word holds the fp32 bits, the high word is zero: a negative fp32 never sign-extends
    (-2.0 is 0x00000000C0000000 = 3221225472, not 0xFFFFFFFFC0000000)."""
    scales = torch.tensor(values, dtype=torch.float32)
    encoded = encode_fp32_bits_as_int64(scales)
    assert encoded.dtype == torch.int64
    assert high_words_are_zero(encoded)
    assert bool((encoded >= 2**31).all()) and bool((encoded < 2**32).all())  # sign bit set, in the low word
    bits = scales.view(torch.int32).numpy().view(np.uint32).astype(np.int64)
    assert np.array_equal(encoded.numpy(), bits)
    assert torch.equal(decode_int64_to_fp32(encoded).view(torch.int32), scales.view(torch.int32))


def test_int64_encoding_golden_values():
    encoded = encode_fp32_bits_as_int64(torch.tensor([-2.0, -0.0, 1.0, 0.0]))
    assert encoded.tolist() == [0xC0000000, 0x80000000, 0x3F800000, 0]
