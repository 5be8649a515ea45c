"""staging.py and the data path through it: buffers reused (no allocation per tensor once grown), the
writing thread's errors raised again as the same clean error with no complete-looking output left,
and the source read ahead in the order the shard reads it."""
from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

import w4a8conv.staging as staging
from w4a8conv.api import ConvertOptions, convert
from w4a8conv.errors import InvalidCheckpointError, WriteError
from w4a8conv.journal import sha256_file
from w4a8conv.plan import make_plan
from w4a8conv.produce import Producer, produce
from w4a8conv.source import TensorReader, open_source
from w4a8conv.staging import StagedFile, StagingPool
from w4a8conv.writer import ShardPlan, write_shard

METADATA = {"format": "pt"}


def address(view: memoryview) -> int:
    return np.frombuffer(view, np.uint8).ctypes.data


def staged_file(path: Path, pool: StagingPool, chunks: list[bytes]) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        staged = StagedFile(pool, fd)
        for chunk in chunks:
            staged.write(chunk)
        return staged.finish()
    finally:
        os.close(fd)


def test_a_staged_file_is_its_bytes_and_their_sha256_through_two_reused_buffers(tmp_path):
    pool = StagingPool(64)
    chunks = [bytes(range(i % 251, i % 251 + 5)) * (i + 1) for i in range(40)]  # 4100 bytes, odd lengths
    seen = set()
    real_take = pool.take
    pool.take = lambda: (view := real_take(), seen.add(address(view)))[0]
    digest = staged_file(tmp_path / "f", pool, chunks)
    data = b"".join(chunks)
    assert (tmp_path / "f").read_bytes() == data
    assert digest == hashlib.sha256(data).hexdigest()
    assert len(seen) == 2  # 65 buffers' worth went through the same two mappings
    assert pool.idle() == pool.count == 2  # all back in the pool between files


def test_reserve_lends_the_current_buffer_and_refuses_more_than_a_buffer(tmp_path):
    pool = StagingPool(64)
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        staged = StagedFile(pool, fd)
        first = staged.reserve(40)
        first[:] = b"a" * 40  # a lent region is filled before the next call
        second = staged.reserve(23)
        second[:] = b"b" * 23
        assert address(second) == address(first) + 40  # back to back in one buffer
        third = staged.reserve(8)  # does not fit: the next buffer
        third[:] = b"c" * 8
        assert address(third) not in range(address(first), address(first) + 64)
        assert staged.staged_bytes == 71
        with pytest.raises(ValueError, match="cannot reserve 65 bytes"):
            staged.reserve(65)
        rest = staged.reserve_some(100)
        assert len(rest) == 56  # the room left in the current buffer
        rest[:] = b"d" * 56
        assert len(staged.reserve_some(100)) == 64  # full: the next buffer's room (left as it was)
        staged.finish()
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes()[:127] == b"a" * 40 + b"b" * 23 + b"c" * 8 + b"d" * 56


def test_producing_a_second_expert_allocates_nothing(preset_source, tmp_path):
    """Once the workspace and source buffers have grown to one projection, the next projections of the
    same shape reuse them: the workspace holds the same bytes after one layer as after all of them."""
    src = open_source(preset_source("moe-group-v0", moe_layers=2))
    plan = make_plan(src)
    pool = StagingPool(2**20)
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        with TensorReader() as reader:
            producer = Producer(reader)
            staged = StagedFile(pool, fd)
            experts = [t for t in plan.tensors if ".experts." in t.name]
            half = len(experts) // 2
            for tensor in experts[:half]:
                produce(tensor, producer, src.tensors, staged)
            grown = producer.workspace.nbytes
            for tensor in experts[half:]:
                produce(tensor, producer, src.tensors, staged)
            assert producer.workspace.nbytes == grown > 0
            staged.finish()
    finally:
        os.close(fd)


def full_disk(monkeypatch, after: int = 0):
    written = [0]
    real = os.pwrite

    def pwrite(fd, data, offset):
        if written[0] + len(data) > after:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written[0] += len(data)
        return real(fd, data, offset)
    monkeypatch.setattr(staging.os, "pwrite", pwrite)


@pytest.fixture
def plan_and_source(preset_source):
    src = open_source(preset_source("moe-group-v1"))
    return make_plan(src), src


def write_one(directory: Path, plan, src, pool: StagingPool, produce_fn=produce):
    shard = ShardPlan("model-00001-of-00001.safetensors", plan.tensors)
    with TensorReader() as reader:
        producer = Producer(reader)
        return write_shard(directory, shard, METADATA, pool,
                           lambda tensor, staged: produce_fn(tensor, producer, src.tensors, staged))


def test_a_failing_write_on_the_staging_thread_is_a_write_error_and_leaves_no_file(
        plan_and_source, tmp_path, monkeypatch):
    plan, src = plan_and_source
    full_disk(monkeypatch, after=200)
    pool = StagingPool(4096)  # many buffers per shard: the error is seen while producing, not only at the end
    with pytest.raises(WriteError, match=r"model-00001-of-00001\.safetensors: cannot write: No space left"):
        write_one(tmp_path, plan, src, pool)
    assert list(tmp_path.iterdir()) == []  # no shard, no .partial
    assert pool.idle() == pool.count


def test_a_failing_hash_surfaces_as_itself_and_leaves_no_file(plan_and_source, tmp_path, monkeypatch):
    plan, src = plan_and_source

    class BrokenHash:
        def update(self, _data):
            raise OSError(errno.EIO, "hash failed")

        def hexdigest(self):
            raise AssertionError("never reached")
    monkeypatch.setattr(staging.hashlib, "sha256", BrokenHash)
    pool = StagingPool(4096)
    with pytest.raises(WriteError, match="cannot write: hash failed"):
        write_one(tmp_path, plan, src, pool)
    assert list(tmp_path.iterdir()) == []
    assert pool.idle() == pool.count


def test_a_producer_error_stops_the_staging_thread_and_leaves_no_file(plan_and_source, tmp_path):
    plan, src = plan_and_source
    calls = [0]

    def failing(tensor, producer, tensors, staged):
        calls[0] += 1
        if calls[0] == 5:
            raise InvalidCheckpointError("bad weight", file=Path("x"), tensor=tensor.name)
        produce(tensor, producer, tensors, staged)
    pool = StagingPool(4096)
    with pytest.raises(InvalidCheckpointError, match="bad weight"):
        write_one(tmp_path, plan, src, pool, failing)
    assert list(tmp_path.iterdir()) == []
    assert pool.idle() == pool.count
    assert not [t for t in __import__("threading").enumerate() if t.name in ("w4a8conv-hash", "w4a8conv-write")]


def test_a_write_error_mid_run_keeps_finished_shards_for_resume(preset_source, tmp_path, monkeypatch):
    """A full disk at the third shard: the first two are journaled; --resume writes the rest, and the
    result is the uninterrupted conversion's bytes."""
    source = preset_source("mixed-v1")
    reference = tmp_path / "reference"
    convert(source, reference, options=ConvertOptions(max_shard_bytes=60_000, workers=1))
    shards = sorted(reference.glob("model-*.safetensors"))
    assert len(shards) >= 4
    full_disk(monkeypatch, after=sum(p.stat().st_size for p in shards[:2]) + 100)  # inside the third shard
    out = tmp_path / "out"
    with pytest.raises(WriteError, match="No space left"):
        convert(source, out, options=ConvertOptions(max_shard_bytes=60_000, workers=1))
    assert not list(out.glob(".*.partial"))
    monkeypatch.undo()
    convert(source, out, options=ConvertOptions(max_shard_bytes=60_000, workers=1, resume=True))
    names = sorted(p.name for p in reference.iterdir())
    assert sorted(p.name for p in out.iterdir()) == names
    assert all(sha256_file(out / n) == sha256_file(reference / n) for n in names)


def test_reading_asks_the_kernel_for_the_announced_tensors_ahead(preset_source, monkeypatch):
    src = open_source(preset_source("moe-group-v1"))
    refs = sorted(src.tensors.values(), key=lambda r: (str(r.file), r.offset))
    advised: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "posix_fadvise", lambda _fd, offset, length, _advice: advised.append((offset, length)))
    with TensorReader() as reader:
        reader.read_ahead_bytes = window = 4 * max(r.nbytes for r in refs)
        reader.announce(refs)
        reader.read_bytes(refs[0])
        assert advised and advised[0][0] == refs[0].offset + refs[0].nbytes  # from the end of what was read
        assert sum(length for _o, length in advised) == window  # one window ahead, no more
        count = len(advised)
        reader.read_bytes(refs[1])  # still more than half a window ahead: nothing new asked
        assert len(advised) == count
        for ref in refs:
            reader.read_bytes(ref)
        covered = sorted(advised)
        assert covered[-1][0] + covered[-1][1] <= max(r.offset + r.nbytes for r in refs)
        assert sum(length for _o, length in advised) == sum(r.nbytes for r in refs) - refs[0].nbytes
