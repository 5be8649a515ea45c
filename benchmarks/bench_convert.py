"""Conversion throughput against `cp -r` (with and without an fsync of the copies), side by side.

    .venv/bin/python benchmarks/bench_convert.py --sizes-gb 1 --work-dir /tmp/w4a8bench
    .venv/bin/python benchmarks/bench_convert.py --sizes-gb 10 --work-dir /tmp/w4a8bench --no-runtime

For each source variant ("1.0.0" per-group, "1.0.0" per-channel, "0" per-group) it writes a synthetic
DeepSeek-shaped W4A8_DYNAMIC checkpoint of about the size asked (hidden 7168, MoE intermediate 2048,
group size 256, 16 experts per layer, as many MoE layers as the size needs), then, for a warm page
cache (the source read once before each run) and a cold one (the source's pages dropped with
posix_fadvise DONTNEED before each run), runs `--repeats` rounds of: `cp -r`, `cp -r` then an fsync of
every copied file, `w4a8conv convert --workers 1` and `--workers 2`, one after another in each round
(so a load change on a shared machine hits them alike). Each run records its wall seconds, user + system
seconds (getrusage of the children), peak RSS and the load average when it started; the table gives
medians. Only one source is on disk at a time; it is deleted after its variant.

It also measures the rates that decide the bar (one core's sha256 over a 256 MiB buffer; the
interpreter start-up of `python -m w4a8conv.cli`, which every convert's wall time includes: "conversion
only" is the `seconds` its `--json` summary reports, from opening the source to the stamped
description), and, unless `--no-runtime`, the time vllm-ascend
0.11.0's own post-processing (the test harness on CPU, tests/vllm_ascend_harness.py) takes for one
DeepSeek-V3-shaped "1.0.0" layer against the time `NpuReadyCheckpoint.moe_layer` takes to hand the
same rank's six tensors from the converted checkpoint (a subset of the 256 experts, scaled per expert).

Prints Markdown for docs/benchmarks.md and writes every run's figures as JSON (`--json-out`).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

HIDDEN, INTERMEDIATE, EXPERTS, GROUP = 7168, 2048, 16, 256
VARIANTS = {  # name -> (version, group size)
    "v1-group": ("1.0.0", GROUP),
    "v1-channel": ("1.0.0", 0),
    "v0-group": ("0", GROUP),
}
KINDS = ("cp", "cp+fsync", "convert-w1", "convert-w2")


def spec_for(size_gb: float, version: str, group: int):
    from w4a8conv.synthetic import SyntheticSpec

    per_int4 = 0.5 if version == "1.0.0" else 1.0
    per_layer = 3 * EXPERTS * HIDDEN * INTERMEDIATE * per_int4
    layers = max(1, round(size_gb * 1e9 / per_layer))
    return replace(SyntheticSpec(), version=version, group_size=group, hidden=HIDDEN, intermediate=INTERMEDIATE,
                   num_experts=EXPERTS, dense_layers=0, moe_layers=layers, attention=False, shared_experts=False,
                   vocab=1024, shard_bytes=2 * 10**9, seed=1)


def files_of(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in files_of(root))


def warm(root: Path) -> None:
    for path in files_of(root):
        with open(path, "rb", buffering=0) as f:
            while f.read(64 * 2**20):
                pass


def cold(root: Path) -> None:
    """Drop the source's pages from the page cache (they are clean: the source was fsynced once)."""
    for path in files_of(root):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def fsync_tree(root: Path) -> None:
    for path in files_of(root):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def children_cpu() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime, usage.ru_stime


def run_once(kind: str, source: Path, work: Path) -> dict:
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    load = os.getloadavg()[0]
    user0, sys0 = children_cpu()
    start = time.perf_counter()
    rss = None
    if kind.startswith("cp"):
        proc = subprocess.run(["cp", "-r", str(source), str(out)], capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"cp failed: {proc.stderr}")
        if kind == "cp+fsync":
            fsync_tree(out)
        inner = None
    else:
        workers = kind.removeprefix("convert-w")
        proc = subprocess.run([sys.executable, "-m", "w4a8conv.cli", "convert", str(source), str(out),
                               "--workers", workers, "--json"], capture_output=True, text=True, cwd=REPO)
        if proc.returncode:
            raise SystemExit(f"convert failed:\n{proc.stderr}")
        summary = json.loads(proc.stdout)
        rss, inner = summary["peak_rss_bytes"], summary["seconds"]
    seconds = time.perf_counter() - start
    user1, sys1 = children_cpu()
    written = tree_bytes(out)
    shutil.rmtree(out)
    return {"kind": kind, "seconds": seconds, "convert_seconds": inner, "user": user1 - user0, "sys": sys1 - sys0,
            "peak_rss_bytes": rss, "load": load, "written_bytes": written}


def sha256_rate() -> float:
    data = os.urandom(256 * 2**20)
    rates = []
    for _ in range(3):
        start = time.perf_counter()
        hashlib.sha256(data).digest()
        rates.append(len(data) / (time.perf_counter() - start))
    return statistics.median(rates)


def startup_seconds() -> float:
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import w4a8conv.cli, w4a8conv.api, w4a8conv.transforms.kernels, torch"], check=True, cwd=REPO)
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def make_source(path: Path, size_gb: float, variant: str) -> float:
    import torch

    from w4a8conv.synthetic import write_checkpoint

    version, group = VARIANTS[variant]
    start = time.perf_counter()
    torch.set_num_threads(1)  # the generator's small ops: a thread pool only spins on a busy machine
    write_checkpoint(path, spec_for(size_gb, version, group))
    fsync_tree(path)
    return time.perf_counter() - start


def bench_variant(variant: str, size_gb: float, work: Path, repeats: int, caches: list[str]) -> dict:
    source = work / f"src-{variant}"
    shutil.rmtree(source, ignore_errors=True)
    generated = make_source(source, size_gb, variant)
    nbytes = tree_bytes(source)
    print(f"{variant}: {nbytes / 1e9:.2f} GB generated in {generated:.0f} s", file=sys.stderr)
    runs = []
    try:
        for cache in caches:
            for repeat in range(repeats):
                for kind in KINDS:
                    (warm if cache == "warm" else cold)(source)
                    run = {**run_once(kind, source, work), "cache": cache, "repeat": repeat}
                    runs.append(run)
                    print(f"  {cache} #{repeat} {kind}: {run['seconds']:.2f} s (load {run['load']:.2f})",
                          file=sys.stderr)
    finally:
        shutil.rmtree(source, ignore_errors=True)
    return {"variant": variant, "source_bytes": nbytes, "runs": runs}


def median_of(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r[key] is not None]
    return statistics.median(values) if values else None


def table(rows: list[dict]) -> list[str]:
    lines = ["| source | cache | run | wall s (median) | GB/s | vs cp -r + fsync | same, conversion only | "
             "user + sys s | sys s/GB | peak RSS | load (min-max) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        gb = row["source_bytes"] / 1e9
        for cache in ("warm", "cold"):
            of = {k: [r for r in row["runs"] if r["cache"] == cache and r["kind"] == k] for k in KINDS}
            if not of["cp"]:
                continue
            base = median_of(of["cp+fsync"], "seconds")
            for kind in KINDS:
                runs = of[kind]
                wall = median_of(runs, "seconds")
                cpu = median_of([{**r, "cpu": r["user"] + r["sys"]} for r in runs], "cpu")
                rss = median_of(runs, "peak_rss_bytes")
                loads = [r["load"] for r in runs]
                inner = median_of(runs, "convert_seconds")
                label = kind + (f" ({inner:.1f} s converting)" if inner is not None else "")
                only = "-" if inner is None else f"{base / inner:.2f}x"
                lines.append(f"| {gb:.2f} GB {row['variant']} | {cache} | {label} | {wall:.2f} | {gb / wall:.2f} | "
                             f"{base / wall:.2f}x | {only} | {cpu:.1f} | {median_of(runs, 'sys') / gb:.2f} | "
                             f"{'-' if rss is None else f'{rss / 2**20:.0f} MiB'} | "
                             f"{min(loads):.1f}-{max(loads):.1f} |")
    return lines


def runtime_versus_vllm_ascend(work: Path, experts: int) -> dict:
    """vllm-ascend 0.11.0's load + post-processing of one DeepSeek-V3-shaped "1.0.0" layer (TP 1, EP 1)
    against the runtime's read of the same six rank tensors from the converted checkpoint."""
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    import vllm_ascend_harness as harness

    from w4a8conv.api import ConvertOptions, convert
    from w4a8conv.runtime import NpuReadyCheckpoint
    from w4a8conv.synthetic import SyntheticSpec, write_checkpoint

    torch.set_num_threads(1)
    source, out = work / "layer-src", work / "layer-out"
    for path in (source, out):
        shutil.rmtree(path, ignore_errors=True)
    spec = replace(SyntheticSpec(), version="1.0.0", group_size=GROUP, hidden=HIDDEN, intermediate=INTERMEDIATE,
                   num_experts=experts, dense_layers=0, moe_layers=1, attention=False, shared_experts=False,
                   vocab=1024, seed=2)
    write_checkpoint(source, spec)
    convert(source, out, options=ConvertOptions(workers=1))
    prefix = "model.layers.0.mlp"
    harness_runs, runtime_runs = [], []
    try:
        for _ in range(3):
            start = time.perf_counter()
            want = harness.moe_rank_tensors(source, prefix)
            harness_runs.append(time.perf_counter() - start)
            start = time.perf_counter()
            with contextlib.closing(NpuReadyCheckpoint.open(out)) as ckpt:
                got = ckpt.moe_layer(prefix)
            runtime_runs.append(time.perf_counter() - start)
            if not all(torch.equal(want[k], got[k]) for k in harness.MOE_KEYS):
                raise SystemExit("the runtime's tensors differ from vllm-ascend's")
    finally:
        for path in (source, out):
            shutil.rmtree(path, ignore_errors=True)
    per_expert = {"vllm_ascend": statistics.median(harness_runs) / experts,
                  "runtime": statistics.median(runtime_runs) / experts}
    return {"experts_measured": experts, "per_expert_seconds": per_expert,
            "layer_256_seconds": {k: v * 256 for k, v in per_expert.items()}, "harness_runs": harness_runs,
            "runtime_runs": runtime_runs}


def kernels_name() -> str:
    return subprocess.run([sys.executable, "-c", "from w4a8conv.transforms import kernels; print(kernels.NAME)"],
                          capture_output=True, text=True, check=True, cwd=REPO).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-gb", type=float, nargs="+", default=[1.0],
                        help="source sizes, one after another (one source on disk at a time)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--caches", nargs="+", choices=["warm", "cold"], default=["warm", "cold"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/w4a8conv-bench"))
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--no-runtime", action="store_true", help="skip the vllm-ascend post-processing comparison")
    parser.add_argument("--runtime-experts", type=int, default=16)
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    uptime_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    rates = {"sha256_bytes_per_s": sha256_rate(), "startup_seconds": startup_seconds()}
    rows = [bench_variant(v, size, args.work_dir, args.repeats, args.caches)
            for size in args.sizes_gb for v in args.variants]
    runtime = None if args.no_runtime else runtime_versus_vllm_ascend(args.work_dir, args.runtime_experts)
    uptime_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "?")
    print(f"run {started}; machine: {platform.machine()} {model}, {os.cpu_count()} CPUs "
          f"({len(os.sched_getaffinity(0))} usable), SHA-NI: {'yes' if ' sha_ni' in cpuinfo else 'no'}, "
          f"python {platform.python_version()}, kernels: {kernels_name()}")
    print(f"uptime before: {uptime_before}\nuptime after: {uptime_after}")
    print(f"one core's sha256: {rates['sha256_bytes_per_s'] / 1e9:.2f} GB/s; interpreter + imports start-up: "
          f"{rates['startup_seconds']:.2f} s (in every convert's wall time)\n")
    print("\n".join(table(rows)))
    if runtime:
        layer = runtime["layer_256_seconds"]
        print(f"\nOne DeepSeek-V3 \"1.0.0\" MoE layer (256 experts, scaled from {runtime['experts_measured']}): "
              f"vllm-ascend 0.11.0 load + post-processing {layer['vllm_ascend']:.2f} s, runtime hand-over of the "
              f"converted rank tensors {layer['runtime']:.2f} s ({layer['vllm_ascend'] / layer['runtime']:.1f}x)")
    if args.json_out:
        args.json_out.write_text(json.dumps({"started": started, "uptime": [uptime_before, uptime_after],
                                             "rates": rates, "rows": rows, "runtime": runtime}, indent=1))


if __name__ == "__main__":
    main()
