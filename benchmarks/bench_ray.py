"""`convert --engine ray` on a local Ray cluster of 1 and of 2 one-CPU nodes, against `convert` on one host.

    .venv/bin/python benchmarks/bench_ray.py --size-gb 8 --work-dir /tmp/w4a8bench

Writes (or reuses) bench_convert.py's synthetic DeepSeek-shaped source, starts a loopback-only Ray
cluster (tests/ray_cluster.py: its own network namespace, Ray from the cached test environment) of one
node, then of two, each with one CPU, and times `w4a8conv convert --engine ray` into a fresh directory
(plan, one Ray task per shard, commit; the driver started inside the namespace, its Python start-up
included), then `w4a8conv convert --workers 1` and `--workers 2` on the host. Every output is checked
byte-identical to the first. The machine is shared: the 1-minute load average is recorded before and
after each run. Prints a Markdown table for docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench_convert import GROUP, spec_for, tree_bytes, warm  # noqa: E402 - benchmarks/ is the script's directory
from ray_cluster import LoopbackCluster, ray_python  # noqa: E402
from w4a8conv.synthetic import write_checkpoint  # noqa: E402


def digest(out: Path) -> dict[str, str]:
    hashes = {}
    for path in sorted(out.iterdir()):
        sha = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(16 * 2**20):
                sha.update(block)
        hashes[path.name] = sha.hexdigest()
    return hashes


def timed(command: list[str], env: dict | None = None) -> tuple[float, dict, tuple[float, float]]:
    load = os.getloadavg()[0]
    start = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if run.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{run.stderr[-3000:]}")
    return seconds, json.loads(run.stdout), (load, os.getloadavg()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=8.0)
    parser.add_argument("--max-shard-size", default="1GB", help="output shards (so tasks) (default 1GB)")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/w4a8conv-bench"))
    parser.add_argument("--keep-source", action="store_true")
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    source = args.work_dir / f"src-{args.size_gb:g}gb-v1.0.0"
    if not source.exists():  # written under another name first: an interrupted run leaves no half source
        partial = source.with_name(source.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        write_checkpoint(partial, spec_for(args.size_gb, "1.0.0", GROUP))
        partial.rename(source)
    nbytes, python, rows, reference = tree_bytes(source), ray_python(), [], None
    for label, nodes, workers in (("ray, 1 node x 1 CPU", 1, None), ("ray, 2 nodes x 1 CPU", 2, None),
                                  ("one host, --workers 1", 0, 1), ("one host, --workers 2", 0, 2)):
        out = args.work_dir / "out-ray"
        shutil.rmtree(out, ignore_errors=True)
        warm(source)
        convert = ["-m", "w4a8conv.cli", "convert", str(source), str(out), "--max-shard-size", args.max_shard_size,
                   "--json"]
        if nodes:
            with LoopbackCluster(python, nodes=nodes) as cluster:
                seconds, summary, load = timed(cluster.command(python, *convert, "--engine", "ray", "--ray-address",
                                                               cluster.address), env=cluster.env)
        else:
            seconds, summary, load = timed([sys.executable, *convert, "--workers", str(workers)])
        hashes = digest(out)
        reference = reference or hashes
        if hashes != reference:
            raise SystemExit(f"{label}: the output differs from the first run's")
        rows.append({"run": label, "seconds": seconds, "gbps": nbytes / seconds / 1e9, "load": load,
                     "tasks": summary.get("tasks"), "shards": summary["shards"]})
        shutil.rmtree(out)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}; "
          f"source {nbytes / 1e9:.2f} GB, --max-shard-size {args.max_shard_size}; outputs byte-identical")
    print("| run | tasks | shards | wall time | throughput | load before → after |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['run']} | {row['tasks'] or '-'} | {row['shards']} | {row['seconds']:.1f} s | "
              f"{row['gbps']:.2f} GB/s | {row['load'][0]:.1f} → {row['load'][1]:.1f} |")
    print(json.dumps(rows), file=sys.stderr)
    if not args.keep_source:
        shutil.rmtree(source, ignore_errors=True)


if __name__ == "__main__":
    main()
