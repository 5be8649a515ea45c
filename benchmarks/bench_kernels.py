"""The expert-weight byte kernels side by side: compiled (numba, extra `fast`) against the numpy/torch
paths they replace, and torch's plain `.t().contiguous()`, interleaved call by call on one thread.

    .venv/bin/python benchmarks/bench_kernels.py --calls 100

DeepSeek-V3 shapes: gate/up "1.0.0" pairs int8 [1024, 7168] and down [3584, 2048] for the transpose,
version "0" values int8 [2048, 7168] and [7168, 2048] for the pair-packing. Prints GB/s of source
bytes (median of the calls) as Markdown for docs/benchmarks.md; every path's bytes are checked equal.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100)
    args = parser.parse_args()

    import torch

    from w4a8conv.transforms import kernels
    from w4a8conv.transforms.int4 import pack_int4_rows_to_pairs, transpose_bytes
    from w4a8conv.transforms.workspace import Workspace

    if not kernels.AVAILABLE:
        raise SystemExit(f"the compiled kernels are off ({kernels.NAME}): pip install 'w4a8conv[fast]'")
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    workspace = Workspace()

    def numpy_path(function):
        def run(*call_args):
            with mock.patch.object(kernels, "AVAILABLE", False):
                return function(*call_args)
        return run

    cases = []
    for shape in ((1024, 7168), (3584, 2048)):
        matrix = torch.randint(-128, 128, shape, dtype=torch.int8, generator=generator)
        out = torch.empty(shape[::-1], dtype=torch.int8)
        cases.append((f"transpose int8 {list(shape)}", matrix, {
            kernels.NAME: lambda m=matrix, o=out: transpose_bytes(m, o, workspace),
            "numpy two-step": lambda m=matrix, o=out: numpy_path(transpose_bytes)(m, o, workspace),
            "torch .t().contiguous()": lambda m=matrix, o=out: o.copy_(m.t()),
        }))
    for shape in ((2048, 7168), (7168, 2048)):
        values = torch.randint(-8, 8, shape, dtype=torch.int8, generator=generator)
        out = torch.empty((shape[0] // 2, shape[1]), dtype=torch.int8)
        cases.append((f"pair-pack rows int8 {list(shape)}", values, {
            kernels.NAME: lambda v=values, o=out: pack_int4_rows_to_pairs(v, o, workspace),
            "numpy blocked": lambda v=values, o=out: numpy_path(pack_int4_rows_to_pairs)(v, o, workspace),
        }))

    print(f"kernels: {kernels.NAME}; {args.calls} interleaved calls per path, medians, one thread\n")
    print("| operation | path | GB/s | vs numpy/torch path |")
    print("|---|---|---|---|")
    for name, source, paths in cases:
        results = {path: run().clone() for path, run in paths.items()}
        first = next(iter(results.values()))
        assert all(torch.equal(first, r) for r in results.values()), name
        times: dict[str, list[float]] = {path: [] for path in paths}
        for _ in range(args.calls):
            for path, run in paths.items():
                start = time.perf_counter()
                run()
                times[path].append(time.perf_counter() - start)
        rates = {path: source.numel() / statistics.median(t) / 1e9 for path, t in times.items()}
        baseline = list(rates.values())[1]
        for path, rate in rates.items():
            print(f"| {name} | {path} | {rate:.2f} | {rate / baseline:.2f}x |")


if __name__ == "__main__":
    main()
