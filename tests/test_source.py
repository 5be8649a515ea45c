"""source/: header references against the bytes safetensors wrote, the reader, and open_source."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from w4a8conv.constants import SOURCE_TYPE
from w4a8conv.errors import InvalidCheckpointError
from w4a8conv.source import TensorReader, open_source, read_header
from w4a8conv.source.checkpoint import MSMODELSLIM

TENSORS = {
    "z.last": torch.arange(7, dtype=torch.int8).reshape(7, 1),
    "a.first": torch.tensor([[1.5, -2.0, 3.25]], dtype=torch.float32),
    "m.empty": torch.empty((0, 3), dtype=torch.bfloat16),
    "h.half": torch.tensor([0.5, -0.25], dtype=torch.float16),
}


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(TENSORS, path, metadata={"format": "pt"})
    return path


def test_header_references_point_at_each_tensors_bytes(weights):
    header = read_header(weights)
    assert header.metadata == {"format": "pt"}
    assert set(header.tensors) == set(TENSORS)
    raw = weights.read_bytes()
    for name, ref in header.tensors.items():
        expected = TENSORS[name]
        assert (ref.name, ref.file, ref.shape) == (name, weights, tuple(expected.shape))
        assert ref.nbytes == expected.numel() * expected.element_size()
        assert raw[ref.offset:ref.offset + ref.nbytes] == expected.contiguous().view(torch.uint8).numpy().tobytes()
    offsets = [ref.offset for ref in header.tensors.values()]
    assert offsets == sorted(offsets)  # in data order, whatever order the JSON lists them in


def test_the_reader_loads_each_tensor_and_any_byte_range(weights):
    header = read_header(weights)
    with TensorReader() as reader:
        for name, ref in header.tensors.items():
            loaded = reader.load(ref)
            assert loaded.dtype == TENSORS[name].dtype and torch.equal(loaded, TENSORS[name]), name
        ref = header.tensors["a.first"]
        tail = memoryview(bytearray(8))
        reader.read_into(ref, tail, 4)
        assert bytes(tail) == TENSORS["a.first"].numpy().tobytes()[4:12]


def test_a_file_cut_short_after_its_header_is_named_with_the_tensor(weights):
    ref = read_header(weights).tensors["z.last"]
    with open(weights, "r+b") as f:
        f.truncate(ref.offset + 3)
    with TensorReader() as reader, pytest.raises(InvalidCheckpointError, match=r"z\.last: file ends after 3 of 7"):
        reader.load(ref)


def test_open_source_reads_an_msmodelslim_directory_and_refuses_an_empty_one(preset_source, tmp_path):
    msmodelslim = open_source(preset_source("moe-group-v1"))
    assert msmodelslim.producer == MSMODELSLIM
    assert msmodelslim.version.value == "1.0.0" and msmodelslim.group_size > 0
    assert set(msmodelslim.tensors) == {n for h in msmodelslim.headers for n in h.tensors}
    assert any(msmodelslim.type_of(n) == SOURCE_TYPE for n in msmodelslim.tensors)
    with pytest.raises(InvalidCheckpointError, match="no quant_model_description"):
        open_source(tmp_path)
