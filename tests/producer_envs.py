"""Cached Python environments for real checkpoint producers, installed from the package index at test time.

A producer (llm-compressor, or transformers of a given release writing a hub-style model) needs packages
that conflict with each other and with the project's own environment (llm-compressor 0.14 brings
transformers 5.x). Each gets its own virtual environment under the cache, created once and reused. The
environments see the project environment's packages (torch above all, a large wheel already installed)
through a `.pth` file placed after their own site-packages, so pip installs only what the producer adds
or pins differently; the project environment itself is never changed. An environment belongs to one
project environment (its directory name carries a hash of that environment's path), so test runs from
several clones never rebuild each other's; a file lock serialises runs that build the same one.

Environment:
  W4A8CONV_PRODUCER_CACHE   where the environments live (default ~/.cache/w4a8conv/producers)
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ProducerEnv", "ProducerUnavailable", "ensure_env", "run_python", "cache_root", "directory_bytes",
           "locked"]

CACHE_ENV = "W4A8CONV_PRODUCER_CACHE"
DEFAULT_CACHE = Path.home() / ".cache" / "w4a8conv" / "producers"
CONSTRAINTS = Path(__file__).resolve().parent.parent / ".ci" / "constraints.txt"
READY = "w4a8conv-env.json"
INSTALL_TIMEOUT = 1800


class ProducerUnavailable(RuntimeError):
    """The producer's environment could not be installed (no package index, a failed install)."""


@dataclass(frozen=True)
class ProducerEnv:
    """A named environment: `requirements` installed with their dependencies, then `overlays` with --no-deps
    (a package replaced over its dependents' pin)."""

    name: str
    requirements: tuple[str, ...]
    overlays: tuple[str, ...] = ()
    layered_on: ProducerEnv | None = None  # an environment whose packages this one sees under its own

    @property
    def record(self) -> dict:
        return {"requirements": list(self.requirements), "overlays": list(self.overlays),
                "python": sys.version.split()[0], "base": [str(p) for p in self.base_paths()]}

    def base_paths(self) -> list[Path]:
        """Site-packages this environment sees after its own: its base environment's, then the project's."""
        own = [] if self.layered_on is None else [_purelib(self.layered_on.directory)]
        return own + [Path(sysconfig.get_paths()["purelib"])]

    @property
    def directory(self) -> Path:
        project = hashlib.sha256(sysconfig.get_paths()["purelib"].encode()).hexdigest()[:8]
        return cache_root() / f"{self.name}-{project}"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


@contextlib.contextmanager
def locked(path: Path):
    """An exclusive lock on `path` (created) for the duration of the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _python(env_dir: Path) -> Path:
    return env_dir / "bin" / "python"


def _purelib(env_dir: Path) -> Path:
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    return env_dir / "lib" / version / "site-packages"


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _pip(python: Path, args: list[str], what: str) -> None:
    command = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-c", str(CONSTRAINTS),
               *args]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=INSTALL_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ProducerUnavailable(f"{what}: {exc}") from None
    if done.returncode:
        raise ProducerUnavailable(f"{what}: pip failed: {(done.stderr or done.stdout).strip()[-1500:]}")


def ensure_env(spec: ProducerEnv) -> tuple[Path, dict]:
    """The environment's python, creating it when missing or made for other requirements; and a record of
    the install (seconds and bytes added, 0 when it was cached)."""
    if spec.layered_on is not None:
        ensure_env(spec.layered_on)
    env_dir = spec.directory
    with locked(env_dir.with_name(f".{env_dir.name}.lock")):
        return _ensure(spec, env_dir)


def _ensure(spec: ProducerEnv, env_dir: Path) -> tuple[Path, dict]:
    ready = env_dir / READY
    if ready.is_file():
        try:
            if json.loads(ready.read_text()) == spec.record:
                return _python(env_dir), {"cached": True, "seconds": 0.0, "bytes": 0}
        except (OSError, json.JSONDecodeError):
            pass
    started = time.monotonic()
    shutil.rmtree(env_dir, ignore_errors=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True,
                       capture_output=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as exc:
        raise ProducerUnavailable(f"cannot create {env_dir}: {exc}") from None
    # pip itself, torch and the project's packages come from the environments below, after the env's own.
    (_purelib(env_dir) / "zz-w4a8conv-base.pth").write_text("".join(f"{p}\n" for p in spec.base_paths()))
    if spec.requirements:
        _pip(_python(env_dir), list(spec.requirements),
             f"installing {' '.join(spec.requirements)} into {env_dir}")
    if spec.overlays:
        _pip(_python(env_dir), ["--no-deps", *spec.overlays], f"installing {' '.join(spec.overlays)} into {env_dir}")
    ready.write_text(json.dumps(spec.record))
    return _python(env_dir), {"cached": False, "seconds": round(time.monotonic() - started, 1),
                              "bytes": directory_bytes(env_dir)}


def run_python(python: Path, script: Path, *args: str, timeout: int = 1200, cwd: Path | None = None) -> str:
    """Run `script` in the producer environment (in `cwd`); its stdout, or an AssertionError with its stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([str(python), str(script), *args], capture_output=True, text=True, timeout=timeout,
                          env=env, check=False, cwd=cwd)
    if done.returncode:
        raise AssertionError(f"{script.name} {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return done.stdout
