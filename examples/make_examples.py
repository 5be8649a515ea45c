"""Write one synthetic msModelSlim checkpoint per known variant (see w4a8conv.synthetic.PRESETS).

    python examples/make_examples.py OUT_DIR            # every preset
    python examples/make_examples.py OUT_DIR moe-group-v0 linear-v1

`examples/tiny-w4a8-moe/` (committed) was written by `python examples/make_examples.py --tiny DIR`.
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from w4a8conv.synthetic import PRESETS, write_checkpoint

# The committed example: a "1.0.0" per-group export with a W4A8 dense MLP, W4A8 shared experts,
# one 8-expert W4A8 MoE layer, W8A8 attention and float embeddings, in two shards with an index.
TINY = replace(PRESETS["linear-v1"], vocab=128, shard_bytes=700_000, seed=7)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("presets", nargs="*", help=f"default: all of {', '.join(sorted(PRESETS))}")
    parser.add_argument("--tiny", action="store_true", help="write the committed tiny example instead")
    args = parser.parse_args()
    if args.tiny:
        print(write_checkpoint(args.output, TINY))
        return
    for name in args.presets or sorted(PRESETS):
        print(write_checkpoint(args.output / name, PRESETS[name]))


if __name__ == "__main__":
    main()
