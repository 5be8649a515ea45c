"""The checkpoint engine: identical bytes for any worker count, crash-safe resume, refusals."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from w4a8conv.api import ConvertOptions, convert
from w4a8conv.constants import DESCRIPTION_NAME, INDEX_NAME
from w4a8conv.journal import JOURNAL_NAME
from w4a8conv.errors import OutputLocationError
from w4a8conv.verify import verify

SHARD = 400_000  # small shards: the mixed preset then spans about ten of them


def tree_hashes(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def reference(preset_source, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    source = preset_source("mixed-v1")
    out = tmp_path_factory.mktemp("ref") / "out"
    convert(source, out, options=ConvertOptions(max_shard_bytes=SHARD, workers=1))
    return out, tree_hashes(out)


def test_reference_spans_several_shards(reference):
    out, hashes = reference
    shards = [n for n in hashes if n.endswith(".safetensors")]
    assert len(shards) >= 5
    assert JOURNAL_NAME not in hashes and not list(out.glob(".*.partial"))


def test_two_workers_write_identical_bytes(preset_source, reference, tmp_path):
    out = tmp_path / "out"
    convert(preset_source("mixed-v1"), out, options=ConvertOptions(max_shard_bytes=SHARD, workers=2))
    assert tree_hashes(out) == reference[1]


_KILLER = textwrap.dedent("""
    import os, signal, sys
    import w4a8conv.engine as engine
    from w4a8conv.api import ConvertOptions, convert

    kill_at = int(sys.argv[3])
    original = engine.produce
    seen = [0]

    def produce(tensor, producer, tensors, staged):
        original(tensor, producer, tensors, staged)
        seen[0] += 1
        if seen[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # mid-shard: this tensor is staged, the shard unfinished

    engine.produce = produce
    convert(sys.argv[1], sys.argv[2], options=ConvertOptions(max_shard_bytes=%d, workers=1))
""" % SHARD)


@pytest.mark.parametrize("kill_at", [3, 40, 150])
def test_sigkill_mid_shard_then_resume_is_byte_identical(preset_source, reference, tmp_path, kill_at):
    source, out = preset_source("mixed-v1"), tmp_path / "out"
    run = subprocess.run([sys.executable, "-c", _KILLER, str(source), str(out), str(kill_at)], capture_output=True)
    assert run.returncode == -9, run.stderr.decode()
    assert not (out / DESCRIPTION_NAME).exists() and not (out / INDEX_NAME).exists()
    assert list(out.glob(".*.partial")), "the kill should land inside a shard"
    assert not verify(out).ok

    with pytest.raises(OutputLocationError, match="not empty"):
        convert(source, out, options=ConvertOptions(max_shard_bytes=SHARD, workers=1))
    convert(source, out, options=ConvertOptions(max_shard_bytes=SHARD, workers=2, resume=True))
    assert tree_hashes(out) == reference[1]
    assert verify(out, source=source).ok


def test_resume_skips_journaled_shards_and_redoes_damaged_ones(preset_source, reference, tmp_path):
    source, out = preset_source("mixed-v1"), tmp_path / "out"
    subprocess.run([sys.executable, "-c", _KILLER, str(source), str(out), "150"], capture_output=True)
    journal = json.loads((out / JOURNAL_NAME).read_text())
    assert len(journal["shards"]) >= 2
    first, second = sorted(journal["shards"])[:2]
    untouched = (out / first).stat().st_mtime_ns
    damaged = bytearray((out / second).read_bytes())
    damaged[-1] ^= 0xFF
    (out / second).write_bytes(damaged)
    convert(source, out, options=ConvertOptions(max_shard_bytes=SHARD, workers=1, resume=True))
    assert (out / first).stat().st_mtime_ns == untouched
    assert tree_hashes(out) == reference[1]


def test_resume_refuses_a_changed_source(preset_source, tmp_path):
    source = preset_source("moe-group-v1", seed=11)
    out = tmp_path / "out"
    subprocess.run([sys.executable, "-c", _KILLER, str(source), str(out), "20"], capture_output=True)
    assert (out / JOURNAL_NAME).exists()
    changed = tmp_path / "changed"
    changed.mkdir()
    for f in source.iterdir():
        (changed / f.name).write_bytes(f.read_bytes())
    description = json.loads((changed / "quant_model_description.json").read_text())
    description["model.embed_tokens.weight"] = "FLOAT"  # same type, but reordered keys change the bytes
    (changed / "quant_model_description.json").write_text(json.dumps(description, indent=1))
    with pytest.raises(OutputLocationError, match="source changed"):
        convert(changed, out, options=ConvertOptions(max_shard_bytes=SHARD, resume=True))


def test_resume_refuses_other_options(preset_source, tmp_path):
    source, out = preset_source("mixed-v1"), tmp_path / "out"
    subprocess.run([sys.executable, "-c", _KILLER, str(source), str(out), "40"], capture_output=True)
    with pytest.raises(OutputLocationError, match="other options"):
        convert(source, out, options=ConvertOptions(max_shard_bytes=SHARD * 2, resume=True))


def test_resume_without_journal_is_refused(preset_source, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputLocationError, match="nothing to resume"):
        convert(preset_source("moe-group-v1"), tmp_path / "out", options=ConvertOptions(resume=True))


def test_force_replaces_a_previous_output_only(preset_source, reference, tmp_path):
    source, out = preset_source("mixed-v1"), tmp_path / "out"
    convert(source, out, options=ConvertOptions(max_shard_bytes=SHARD // 2, workers=1))
    convert(source, out, options=ConvertOptions(max_shard_bytes=SHARD, workers=1, force=True))
    assert tree_hashes(out) == reference[1]  # the old, smaller shards are gone

    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputLocationError, match="notes.txt is not part of one"):
        convert(source, out, options=ConvertOptions(force=True))
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_output_location_must_be_apart_from_the_source(preset_source, tmp_path, where):
    source = preset_source("moe-group-v1")
    target = {"same": source, "inside": source / "npu", "parent": source.parent}[where]
    before = tree_hashes(source)
    with pytest.raises(OutputLocationError):
        convert(source, target)
    assert tree_hashes(source) == before and not (source / "npu").exists()


def test_dry_run_plans_without_writing(preset_source, tmp_path):
    report = convert(preset_source("mixed-v1"), tmp_path / "out",
                     options=ConvertOptions(max_shard_bytes=SHARD, workers=2, dry_run=True))
    plan = report.summary()["plan"]
    assert report.dry_run and not (tmp_path / "out").exists()
    assert len(plan["shards"]) >= 5 and plan["workers"] == 2
    assert sum(s["bytes"] for s in plan["shards"]) == plan["write_bytes"]
    assert plan["peak_worker_bytes"] > plan["write_bytes"] / len(plan["shards"]) / 100


def test_invalid_weight_found_mid_run_leaves_nothing(preset_source, tmp_path):
    """Version "0" weights are range-checked while packed; the run then removes what it wrote."""
    import torch
    from safetensors.torch import load_file, save_file

    source = tmp_path / "src"
    original = preset_source("moe-group-v0")
    source.mkdir()
    for f in original.iterdir():
        (source / f.name).write_bytes(f.read_bytes())
    weights = next(source.glob("*.safetensors"))
    tensors = load_file(weights)
    name = "model.layers.1.mlp.experts.5.down_proj.weight"
    tensors[name] = tensors[name].clone()
    tensors[name][3, 7] = 9
    save_file(tensors, weights, metadata={"format": "pt"})
    out = tmp_path / "out"
    with pytest.raises(Exception, match=r"experts\.5\.down_proj\.weight: int4 value 9 at \[3, 7\]"):
        convert(source, out, options=ConvertOptions(max_shard_bytes=50_000, workers=1))
    assert not out.exists() or not any(out.iterdir())
    assert torch.equal(load_file(weights)[name], tensors[name])


@pytest.mark.parametrize("preset", ["moe-group-v0", "moe-channel-v0", "linear-v0", "linear-v1", "mixed-v1"])
def test_workers_receive_every_source_tensor_their_shard_reads(preset_source, preset, tmp_path):
    """A worker is sent only the recipes' `sources()` of its shard's tensors; producing from that subset must
    give the same bytes as producing from the whole source."""
    from w4a8conv.plan import make_plan
    from w4a8conv.produce import Producer, produce
    from w4a8conv.source import TensorReader, open_source
    from w4a8conv.staging import StagedFile, StagingPool

    pool = StagingPool(4096)

    def produced(tensor, producer, tensors) -> bytes:
        path = tmp_path / "one"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            staged = StagedFile(pool, fd)
            produce(tensor, producer, tensors, staged)
            staged.finish()
        finally:
            os.close(fd)
        return path.read_bytes()

    src = open_source(preset_source(preset))
    with TensorReader() as reader:
        for tensor in make_plan(src).tensors:
            subset = {n: src.tensors[n] for n in tensor.recipe.sources().values()}
            whole = produced(tensor, Producer(reader), src.tensors)
            assert len(whole) == tensor.nbytes
            assert produced(tensor, Producer(reader), subset) == whole
