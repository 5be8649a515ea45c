"""Sources in a Hugging Face cache snapshot: every file of `models--org--name/snapshots/<revision>` is a
link to `../../blobs/<hash>`. Those links are followed (the output is byte-identical to converting a
plain copy); every other link that leaves the directory is still refused."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from robustness_support import assert_clean_failure, file_hashes, run_main, tree_digest
from w4a8conv.constants import ExitCode

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "tiny-w4a8-moe"
SHARD = "quant_model_weights-00002-of-00003.safetensors"
ESCAPE = "is a link to a file outside the checkpoint directory"


def cache_snapshot(cache: Path, source: Path, repository: str = "models--org--tiny") -> Path:
    """Lay `source` out as the Hugging Face cache does: blobs by content hash, a snapshot of relative links."""
    repo = cache / repository
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    for file in sorted(source.iterdir()):
        blob = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, repo / "blobs" / blob)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob))
    return snapshot


def relink(link: Path, target: Path) -> None:
    link.unlink()
    link.symlink_to(os.path.relpath(target, link.parent))


def test_snapshot_of_the_cache_converts_like_a_plain_copy(tmp_path):
    snapshot = cache_snapshot(tmp_path / "hub", EXAMPLE)
    before = tree_digest(tmp_path / "hub")
    plain = run_main("convert", EXAMPLE, tmp_path / "plain")
    cached = run_main("convert", snapshot, tmp_path / "cached")
    assert plain.returncode == cached.returncode == 0, cached.describe()
    assert file_hashes(tmp_path / "cached") == file_hashes(tmp_path / "plain")
    assert not any(p.is_symlink() for p in (tmp_path / "cached").iterdir())  # copies, not links into the cache
    assert tree_digest(tmp_path / "hub") == before


def _outside_the_repository(snapshot: Path, tmp_path: Path) -> Path:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copyfile(snapshot / SHARD, elsewhere / SHARD)
    relink(snapshot / SHARD, elsewhere / SHARD)
    return snapshot / SHARD


def _another_repositorys_blob(snapshot: Path, tmp_path: Path) -> Path:
    other = cache_snapshot(tmp_path / "hub", EXAMPLE, "models--org--other")
    relink(snapshot / SHARD, (other / SHARD).resolve())
    return snapshot / SHARD


def _config_outside(snapshot: Path, tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text("{}")
    relink(snapshot / "config.json", tmp_path / "config.json")
    return snapshot / "config.json"


def _nested_in_blobs(snapshot: Path, tmp_path: Path) -> Path:
    blobs = snapshot.parents[1] / "blobs"
    (blobs / "sub").mkdir()
    shutil.copyfile(snapshot / SHARD, blobs / "sub" / "x")
    relink(snapshot / SHARD, blobs / "sub" / "x")
    return snapshot / SHARD


@pytest.mark.parametrize("escape", [_outside_the_repository, _another_repositorys_blob, _config_outside,
                                    _nested_in_blobs])
def test_other_escapes_from_a_snapshot_are_refused(tmp_path, escape):
    snapshot = cache_snapshot(tmp_path / "hub", EXAMPLE)
    link = escape(snapshot, tmp_path)
    before = tree_digest(tmp_path / "hub")
    failed = run_main("convert", snapshot, tmp_path / "out")
    # the index is checked first: a weights file is named by it, any other file by its own path
    pieces = [f"weight_map names {link.name!r}, which lies outside the checkpoint directory"] \
        if link.name == SHARD else [str(link), ESCAPE, "cp -rL"]
    assert_clean_failure(failed, ExitCode.INVALID_INPUT, pieces)
    assert not (tmp_path / "out").exists()
    assert tree_digest(tmp_path / "hub") == before


def test_blob_links_count_only_inside_a_snapshot_directory(tmp_path):
    """The same links from a directory that is not `snapshots/<revision>` of a `models--` repository."""
    snapshot = cache_snapshot(tmp_path / "hub", EXAMPLE)
    not_a_snapshot = snapshot.parents[1] / "copies" / "0123abcd"
    not_a_snapshot.parent.mkdir()
    shutil.copytree(snapshot, not_a_snapshot, symlinks=True)
    failed = run_main("convert", not_a_snapshot, tmp_path / "out")
    assert_clean_failure(failed, ExitCode.INVALID_INPUT, [ESCAPE])


def test_index_cannot_name_a_blob_directly(tmp_path):
    """Only links are followed into blobs: a weight_map entry `../../blobs/<hash>` still lies outside."""
    snapshot = cache_snapshot(tmp_path / "hub", EXAMPLE)
    index = snapshot / "quant_model_weights.safetensors.index.json"
    text = index.read_text()
    blob = os.readlink(snapshot / SHARD)
    index.unlink()
    index.write_text(text.replace(f'"{SHARD}"', f'"{blob}"'))
    (snapshot / SHARD).unlink()
    failed = run_main("inspect", snapshot)
    assert_clean_failure(failed, ExitCode.INVALID_INPUT, [f"weight_map names {blob!r}",
                                                          "which lies outside the checkpoint directory"])
