"""route.py: the output directory's steps run one by one give what `convert` gives, and each leaves
the directory visibly incomplete until `commit` writes the description."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from w4a8conv.api import ConvertOptions, build_stamp, convert
from w4a8conv.constants import DESCRIPTION_NAME, INDEX_NAME
from w4a8conv.errors import OutputLocationError
from w4a8conv.journal import JOURNAL_NAME
from w4a8conv.plan import make_plan
from w4a8conv.route import OutputRoute
from w4a8conv.source import open_source

SHARD = 400_000


def tree(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())}


def test_the_steps_one_by_one_write_what_convert_writes(preset_source, tmp_path):
    source = preset_source("mixed-v1")
    convert(source, tmp_path / "whole", options=ConvertOptions(max_shard_bytes=SHARD, workers=1))
    plan = make_plan(open_source(source))
    route = OutputRoute.of(plan, tmp_path / "steps", SHARD)
    route.check(resume=False, force=False)
    assert not route.output.exists()  # the first look writes nothing
    with route.prepare(resume=False, force=False, warnings=[]) as prepared:
        assert [p.name for p in route.output.iterdir()] == [JOURNAL_NAME]
        assert prepared.created and prepared.disk_free_bytes is not None
        written = prepared.write(1, lambda _n: None)
        assert [w.file_name for w in written] == [s.file_name for s in route.shards] and len(written) > 1
        assert not (route.output / INDEX_NAME).exists() and not (route.output / DESCRIPTION_NAME).exists()
        assert set(prepared.journal.done) == {w.file_name for w in written}
        prepared.commit(build_stamp(plan, written, prepared.journal.source_fingerprint))
    assert tree(route.output) == tree(tmp_path / "whole")
    assert not (route.output / JOURNAL_NAME).exists()


def test_prepare_holds_the_directory_against_a_second_run(preset_source, tmp_path):
    route = OutputRoute.of(make_plan(open_source(preset_source("moe-group-v1"))), tmp_path / "out", SHARD)
    with route.prepare(resume=False, force=False, warnings=[]):
        with pytest.raises(OutputLocationError, match="another w4a8conv run is writing into this directory"):
            with route.prepare(resume=True, force=False, warnings=[]):
                pass


def test_check_refuses_the_source_directory_itself(preset_source):
    source = preset_source("moe-group-v1")
    route = OutputRoute.of(make_plan(open_source(source)), source, SHARD)
    with pytest.raises(OutputLocationError, match="must not be the source directory or inside it"):
        route.check(resume=False, force=False)
