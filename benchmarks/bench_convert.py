"""Conversion throughput against `cp -r`, worker scaling, and peak RSS at two source sizes.

    .venv/bin/python benchmarks/bench_convert.py --sizes-gb 1 8 --work-dir /tmp/w4a8bench

For each size it writes a synthetic DeepSeek-shaped W4A8_DYNAMIC checkpoint (hidden 7168, MoE
intermediate 2048, group size 256, 16 experts per layer, as many MoE layers as the size needs),
warms the page cache, times `cp -r` of it, then `w4a8conv convert` with 1 and 2 workers, each in a
fresh process whose `--json` summary gives its peak RSS (the process or its largest worker).
Prints a Markdown table for docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from w4a8conv.synthetic import SyntheticSpec, write_checkpoint

HIDDEN, INTERMEDIATE, EXPERTS, GROUP = 7168, 2048, 16, 256


def spec_for(size_gb: float, version: str) -> SyntheticSpec:
    per_int4 = 0.5 if version == "1.0.0" else 1.0
    per_layer = 3 * EXPERTS * HIDDEN * INTERMEDIATE * per_int4
    layers = max(1, round(size_gb * 1e9 / per_layer))
    return replace(SyntheticSpec(), version=version, group_size=GROUP, hidden=HIDDEN, intermediate=INTERMEDIATE,
                   num_experts=EXPERTS, dense_layers=0, moe_layers=layers, attention=False, shared_experts=False,
                   vocab=1024, shard_bytes=2 * 10**9, seed=1)


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def warm(root: Path) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                while f.read(64 * 2**20):
                    pass


def timed(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if run.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{run.stderr}")
    return seconds, run.stdout


def bench(size_gb: float, version: str, work: Path, workers: list[int]) -> dict:
    source = work / f"src-{size_gb:g}gb-v{version}"
    if not source.exists():
        t = time.perf_counter()
        write_checkpoint(source, spec_for(size_gb, version))
        print(f"generated {source} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    nbytes = tree_bytes(source)
    warm(source)
    copy = work / "cp-out"
    shutil.rmtree(copy, ignore_errors=True)
    cp_seconds, _ = timed(["cp", "-r", str(source), str(copy)])
    shutil.rmtree(copy)
    row = {"size_gb": size_gb, "version": version, "source_bytes": nbytes, "cp_seconds": cp_seconds,
           "cp_gbps": nbytes / cp_seconds / 1e9, "runs": []}
    for n in workers:
        out = work / f"out-{n}"
        shutil.rmtree(out, ignore_errors=True)
        warm(source)
        seconds, stdout = timed([sys.executable, "-m", "w4a8conv.cli", "convert", str(source), str(out),
                                 "--workers", str(n), "--json"])
        summary = json.loads(stdout)
        row["runs"].append({"workers": n, "seconds": seconds, "gbps": nbytes / seconds / 1e9,
                            "vs_cp": cp_seconds / seconds, "peak_rss_mib": summary["peak_rss_bytes"] / 2**20,
                            "output_bytes": summary["output_bytes"]})
        shutil.rmtree(out)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-gb", type=float, nargs="+", default=[1.0, 8.0])
    parser.add_argument("--version", choices=["0", "1.0.0"], default="1.0.0")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/w4a8conv-bench"))
    parser.add_argument("--keep-sources", action="store_true")
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    rows = [bench(size, args.version, args.work_dir, args.workers) for size in args.sizes_gb]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
    print("| source | cp -r | workers | convert | throughput | vs cp -r | peak RSS |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        for run in row["runs"]:
            print(f"| {row['source_bytes'] / 1e9:.2f} GB v{row['version']} | {row['cp_seconds']:.1f} s "
                  f"({row['cp_gbps']:.2f} GB/s) | {run['workers']} | {run['seconds']:.1f} s | "
                  f"{run['gbps']:.2f} GB/s | {run['vs_cp']:.2f}x | {run['peak_rss_mib']:.0f} MiB |")
    if len(rows) >= 2:
        small, large = rows[0]["runs"][0], rows[-1]["runs"][0]
        print(f"\npeak RSS ratio {rows[-1]['source_bytes'] / 1e9:.1f} GB vs {rows[0]['source_bytes'] / 1e9:.1f} GB "
              f"(1 worker): {large['peak_rss_mib'] / small['peak_rss_mib']:.3f}")
    print(json.dumps(rows), file=sys.stderr)
    if not args.keep_sources:
        for row in rows:
            shutil.rmtree(args.work_dir / f"src-{row['size_gb']:g}gb-v{row['version']}", ignore_errors=True)


if __name__ == "__main__":
    main()
