"""Peak memory is bounded by one expert's working set, not by the size of the model (small version
of the benchmark in benchmarks/bench_convert.py, with a generous bound)."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from w4a8conv.synthetic import SyntheticSpec, write_checkpoint

GENEROUS_GROWTH_BYTES = 96 * 2**20


def peak_rss(source: Path, output: Path) -> tuple[int, int]:
    run = subprocess.run([sys.executable, "-m", "w4a8conv.cli", "convert", str(source), str(output),
                          "--workers", "1", "--max-shard-size", "64MB", "--json"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    return summary["peak_rss_bytes"], summary["source_bytes"]


def test_peak_rss_does_not_grow_with_the_model(tmp_path):
    shape = replace(SyntheticSpec(), version="0", group_size=128, hidden=1024, intermediate=512, num_experts=32,
                    dense_layers=0, attention=False, shared_experts=False, vocab=64, shard_bytes=64 * 10**6)
    small = write_checkpoint(tmp_path / "small", replace(shape, moe_layers=1))
    large = write_checkpoint(tmp_path / "large", replace(shape, moe_layers=5))
    small_peak, small_bytes = peak_rss(small, tmp_path / "small-out")
    large_peak, large_bytes = peak_rss(large, tmp_path / "large-out")
    assert large_bytes - small_bytes > 2 * GENEROUS_GROWTH_BYTES  # the model grows by far more than the bound
    assert large_peak - small_peak < GENEROUS_GROWTH_BYTES, (small_peak, large_peak)
    assert large_peak < 2**30
