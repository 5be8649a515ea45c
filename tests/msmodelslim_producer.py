"""msModelSlim 26.1.0 as a test-time producer: its environment (one `ProducerEnv`, tests/producer_envs.py)
and cached exports.

The environment holds msModelSlim (an overlay, installed `--no-deps`) and what it imports, with
transformers 4.57 (the line its model adapters are written for; 5.x fuses Qwen3-MoE experts into 3-D
parameters). torch, numpy and safetensors come from the project's own environment, as for every producer
environment, so the cold install downloads no second torch.

Exports are written by tests/msmodelslim_produce.py inside that environment and cached under
~/.cache/w4a8conv/msmodelslim-exports/<key>/, the key hashing the producer script, the environment's
requirements and the exports asked for, so a change to any of them produces them again.

Environment:
  W4A8CONV_PRODUCER_CACHE       where the environment lives (tests/producer_envs.py)
  W4A8CONV_MSMODELSLIM_EXPORTS  the export cache (default ~/.cache/w4a8conv/msmodelslim-exports)
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from producer_envs import ProducerEnv, ProducerUnavailable, ensure_env, locked, run_python

__all__ = ["MSMODELSLIM", "MSMODELSLIM_VERSION", "ProducerUnavailable", "environment", "exports"]

MSMODELSLIM_VERSION = "26.1.0"
# msModelSlim's declared dependencies, and what its code imports beyond them; msModelSlim itself --no-deps.
MSMODELSLIM = ProducerEnv(
    f"msmodelslim-{MSMODELSLIM_VERSION}",
    ("easydict==1.13", "einops", "pydantic>=2.10.1", "wcmatch>=10.0", "accelerate>=0.28.0", "requests", "scipy",
     "pygtrie", "pyyaml", "transformers>=4.57,<4.58"),
    (f"msmodelslim=={MSMODELSLIM_VERSION}",))
SCRIPT = Path(__file__).with_name("msmodelslim_produce.py")
EXPORTS = Path.home() / ".cache" / "w4a8conv" / "msmodelslim-exports"
PRODUCE_TIMEOUT = 3600


def environment() -> Path:
    """The producer environment's python, installed on first use (about 3 minutes, ~170 MB downloaded)."""
    return ensure_env(MSMODELSLIM)[0]


def _key(names: list[str]) -> str:
    h = hashlib.sha256(SCRIPT.read_bytes())
    h.update(json.dumps([MSMODELSLIM.record["requirements"], MSMODELSLIM.record["overlays"], sorted(names)]).encode())
    return h.hexdigest()[:16]


def exports(names: list[str]) -> tuple[dict[str, Path], float]:
    """name -> export directory for every recipe named, produced (once, under a file lock) by msModelSlim;
    and the seconds spent producing now (0 when cached)."""
    root = Path(os.environ.get("W4A8CONV_MSMODELSLIM_EXPORTS") or EXPORTS) / _key(names)
    done = root / "complete"
    started = time.monotonic()
    with locked(root.with_name(f".{root.name}.lock")):
        if not done.is_file():
            python = environment()
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            # msModelSlim writes scratch files (features.npy) into its working directory
            run_python(python, SCRIPT, str(root), *names, timeout=PRODUCE_TIMEOUT, cwd=root)
            done.write_text("\n".join(names) + "\n")
    return {name: root / name for name in names}, time.monotonic() - started
