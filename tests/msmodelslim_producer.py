"""msModelSlim 26.1.0 as a test-time producer: a cached environment and cached exports.

The environment is a venv under ~/.cache/w4a8conv/producers/ holding msModelSlim (installed `--no-deps`)
and what it imports, with transformers 4.57 (the line its model adapters are written for; 5.x fuses
Qwen3-MoE experts into 3-D parameters). torch, numpy and safetensors come from the project's own
environment through a `.pth` file (pointed at the environment running the tests each time), so the cold
install downloads no second torch. An environment is used only once its marker file, written last, names
the same requirements.

Exports are written by tests/msmodelslim_produce.py inside that environment and cached under
~/.cache/w4a8conv/msmodelslim-exports/<key>/, the key hashing the producer script and the requirements,
so a change to either produces them again.

Environment:
  W4A8CONV_MSMODELSLIM_ENV      the producer venv (default ~/.cache/w4a8conv/producers/msmodelslim-26.1.0)
  W4A8CONV_MSMODELSLIM_EXPORTS  the export cache (default ~/.cache/w4a8conv/msmodelslim-exports)
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

__all__ = ["MSMODELSLIM_VERSION", "REQUIREMENTS", "ProducerUnavailable", "environment", "exports"]

MSMODELSLIM_VERSION = "26.1.0"
# msModelSlim's declared dependencies, and what its code imports beyond them.
REQUIREMENTS = ("easydict==1.13", "einops", "pydantic>=2.10.1", "wcmatch>=10.0", "accelerate>=0.28.0",
                "requests", "scipy", "pygtrie", "pyyaml", "transformers>=4.57,<4.58")
SCRIPT = Path(__file__).with_name("msmodelslim_produce.py")
CACHE = Path.home() / ".cache" / "w4a8conv"
MARKER = "w4a8conv-env.json"


class ProducerUnavailable(RuntimeError):
    """msModelSlim could not be installed or did not run."""


def _run(argv: list[str], what: str, timeout: int, cwd: Path | None = None) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ProducerUnavailable(f"{what}: {exc}") from None
    if done.returncode:
        raise ProducerUnavailable(f"{what} failed (exit {done.returncode}): {(done.stderr or done.stdout)[-2000:]}")
    return done


def _python(env: Path) -> Path:
    return env / "bin" / "python"


def _base_pth(env: Path) -> Path:
    return next((env / "lib").glob("python3*/site-packages")) / "w4a8conv-base.pth"


def environment() -> Path:
    """The producer venv's python, installed on first use (about 3 minutes, ~170 MB downloaded)."""
    env = Path(os.environ.get("W4A8CONV_MSMODELSLIM_ENV") or CACHE / "producers" / f"msmodelslim-{MSMODELSLIM_VERSION}")
    base = sysconfig.get_paths()["purelib"]
    wanted = {"msmodelslim": MSMODELSLIM_VERSION, "requirements": list(REQUIREMENTS), "python": sys.version.split()[0]}
    marker = env / MARKER
    try:
        if json.loads(marker.read_text()) == wanted and _python(env).exists():
            _base_pth(env).write_text(base + "\n")  # torch from whichever project environment runs the tests
            return _python(env)
    except (OSError, ValueError):
        pass
    shutil.rmtree(env, ignore_errors=True)
    env.parent.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "venv", str(env)], "creating the msModelSlim venv", 300)
    # torch & co. from the project's environment; the venv's own packages come first on sys.path
    _base_pth(env).write_text(base + "\n")
    pip = [str(_python(env)), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    _run(pip + ["--no-deps", f"msmodelslim=={MSMODELSLIM_VERSION}"], "pip install msmodelslim", 900)
    _run(pip + list(REQUIREMENTS), "pip install msModelSlim's imports", 1800)
    marker.write_text(json.dumps(wanted))
    return _python(env)


def _key(names: list[str]) -> str:
    h = hashlib.sha256(SCRIPT.read_bytes())
    h.update(json.dumps([MSMODELSLIM_VERSION, REQUIREMENTS, sorted(names)]).encode())
    return h.hexdigest()[:16]


def exports(names: list[str]) -> tuple[dict[str, Path], float]:
    """name -> export directory for every recipe named, produced (once) by msModelSlim; and the seconds
    spent producing now (0 when cached)."""
    root = Path(os.environ.get("W4A8CONV_MSMODELSLIM_EXPORTS") or CACHE / "msmodelslim-exports") / _key(names)
    done = root / "complete"
    started = time.monotonic()
    if not done.is_file():
        python = environment()
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        # msModelSlim writes scratch files (features.npy) into its working directory
        _run([str(python), str(SCRIPT), str(root), *names], "msModelSlim quantization", 3600, cwd=root)
        done.write_text("\n".join(names) + "\n")
    return {name: root / name for name in names}, time.monotonic() - started
