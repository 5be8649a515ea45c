"""The converted bytes of fixed sources, pinned: sha256 of every shard of every synthetic preset and of
the committed example, recorded before the single-pass data path replaced the per-piece one.

A change that alters output on purpose updates tests/golden_shard_digests.json in the same commit and
says why; the failure message prints the new values.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from w4a8conv.api import ConvertOptions, convert
from w4a8conv.synthetic import PRESETS

GOLDEN = json.loads((Path(__file__).with_name("golden_shard_digests.json")).read_text())
EXAMPLE = Path(__file__).parents[1] / "examples" / "tiny-w4a8-moe"
SHARD = 400_000  # several shards per preset, so shard boundaries are pinned too


def shard_digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("model-*.safetensors"))}


def test_every_preset_is_pinned():
    assert set(GOLDEN) == set(PRESETS) | {"examples/tiny-w4a8-moe"}


@pytest.mark.parametrize("name", [*sorted(PRESETS), "examples/tiny-w4a8-moe"])
def test_shard_digests_match_the_recorded_ones(name, preset_source, tmp_path):
    source = EXAMPLE if name.startswith("examples/") else preset_source(name)
    out = tmp_path / "out"
    convert(source, out, options=ConvertOptions(max_shard_bytes=SHARD, workers=1))
    actual = shard_digests(out)
    assert actual == GOLDEN[name], f"{name}: shard digests changed to {json.dumps(actual, indent=1)}"
