"""A distributed w4a8conv conversion on a Ray cluster, from a driver script (docs/scale-out.md):

    python examples/cluster/ray_driver.py SRC OUT --address HEAD:6379 [--tasks N] [--max-shard-size BYTES]

It does what `w4a8conv convert SRC OUT --engine ray --ray-address HEAD:6379` does (plan, one Ray task per
plan task with num_cpus=1 and memory= the plan's estimate, Ray's retries for a lost worker, commit), from
a process that joined the cluster itself, so a driver can pass its own `ray.init` settings (a
`runtime_env`, a namespace). Every node needs w4a8conv installed and SRC and OUT at the same paths.
"""
from __future__ import annotations

import argparse
import json

import ray

from w4a8conv.api import ConvertOptions
from w4a8conv.ray_engine import convert_on_ray


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("output")
    parser.add_argument("--address", default=None, help="the cluster's head (default: RAY_ADDRESS or a new local one)")
    parser.add_argument("--tasks", type=int, default=None, help="tasks to plan (default: one per shard)")
    parser.add_argument("--max-shard-size", type=int, default=4 * 10**9, help="bytes (default 4·10^9)")
    args = parser.parse_args()
    ray.init(address=args.address)
    summary = convert_on_ray(args.source, args.output, tasks=args.tasks,
                             options=ConvertOptions(max_shard_bytes=args.max_shard_size),
                             on_phase=lambda text: print(text, flush=True))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
