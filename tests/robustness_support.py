"""Shared by the robustness tests (bad inputs, faults, fuzzing): tiny synthetic sources, raw safetensors
surgery, tree digests that never open special files, and the two ways of running the CLI.

Every bad input is generated here from a synthetic checkpoint; nothing binary is committed.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import stat
import struct
import subprocess
import sys
import traceback
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, replace
from pathlib import Path

from safetensors.torch import load_file, save_file

from w4a8conv.constants import DESCRIPTION_NAME
from w4a8conv.synthetic import SyntheticSpec, write_checkpoint

REPO = Path(__file__).resolve().parents[1]
MOE = "model.layers.1.mlp"
WEIGHTS = "quant_model_weights.safetensors"          # one-file presets
INDEX = "quant_model_weights.safetensors.index.json"  # sharded presets
DESCRIPTION = "quant_model_description.json"


def shard(k: int, n: int = 5) -> str:
    return f"quant_model_weights-{k:05d}-of-{n:05d}.safetensors"


def expert(e: int, proj: str, suffix: str) -> str:
    return f"{MOE}.experts.{e}.{proj}.{suffix}"


# Small enough that a conversion takes ~0.1 s, big enough for every rule (H % G, I % 16, out % 8).
TINY = SyntheticSpec(version="1.0.0", group_size=32, hidden=64, intermediate=32, dense_intermediate=64,
                     num_experts=4, vocab=32, attention=False, shared_experts=False)
SPECS: dict[str, SyntheticSpec] = {
    "v1": TINY,
    "v1-sharded": replace(TINY, shard_bytes=12_000),  # 5 files and an index
    "v0": replace(TINY, version="0"),
    "v0-channel": replace(TINY, version="0", group_size=0),
    "v1-linear": replace(TINY, w4a8_linear=True),
    "v1-linear-fp16": replace(TINY, w4a8_linear=True, model_dtype="float16"),
    "v0-channel-linear": replace(TINY, version="0", group_size=0, w4a8_linear=True),
    # for the fault tests: about ten output shards at --max-shard-size 40000
    "v1-multi": replace(TINY, hidden=128, intermediate=64, dense_intermediate=128, num_experts=8, moe_layers=2,
                        shard_bytes=60_000),
}


def build(preset: str, root: Path) -> Path:
    return write_checkpoint(root, SPECS[preset])


# -- raw safetensors surgery ------------------------------------------------------------------------


def read_raw(path: Path) -> tuple[dict, bytes]:
    """(header dict in file order, data bytes)."""
    blob = path.read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + length]), blob[8 + length:]


def write_raw(path: Path, header: dict | bytes, data: bytes, *, declared: int | None = None) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(raw) if declared is None else declared
    path.write_bytes(struct.pack("<Q", length) + raw + data)


def edit_header(path: Path, change) -> None:
    header, data = read_raw(path)
    change(header)
    write_raw(path, header, data)


def rewrite_tensors(path: Path, change) -> None:
    """Load a safetensors file, let `change(tensors)` edit the dict in place, save it back."""
    tensors = {k: v.clone() for k, v in load_file(str(path)).items()}
    change(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


# -- digests ----------------------------------------------------------------------------------------


def tree_digest(*roots: Path) -> dict[str, str]:
    """Every entry under `roots`: sha256 of regular files, the target of links, the type of the rest.

    Uses lstat and never follows links or opens special files (a FIFO would block)."""
    digest: dict[str, str] = {}
    for root in roots:
        if not os.path.lexists(root):
            digest[str(root)] = "absent"
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            for name in sorted(dirnames + filenames):
                path = Path(dirpath) / name
                info = os.lstat(path)
                if stat.S_ISLNK(info.st_mode):
                    digest[str(path)] = "link:" + os.readlink(path)
                elif stat.S_ISREG(info.st_mode):
                    digest[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest() + f":{info.st_mode:o}"
                elif not stat.S_ISDIR(info.st_mode):
                    digest[str(path)] = f"special:{info.st_mode:o}"
    return digest


def file_hashes(root: Path) -> dict[str, str]:
    """Top-level files of a conversion output (hidden ones included), for byte-identity checks."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir()) if p.is_file()}


# -- running the CLI --------------------------------------------------------------------------------


@dataclass
class Run:
    args: list[str]
    returncode: int | None
    stdout: str
    stderr: str

    def describe(self) -> str:
        return f"w4a8conv {' '.join(self.args)}\nexit {self.returncode}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"


CLI_ENV = dict(os.environ, COLUMNS="400", NO_COLOR="1", TERM="dumb")


def run_cli(*args: str | Path, timeout: float = 300, env: dict | None = None) -> Run:
    """`python -m w4a8conv.cli ARGS` in a subprocess: the real exit code and stderr."""
    argv = [sys.executable, "-m", "w4a8conv.cli", *map(str, args)]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env or CLI_ENV, cwd=REPO, timeout=timeout)
    return Run([str(a) for a in args], proc.returncode, proc.stdout, proc.stderr)


def run_main(*args: str | Path) -> Run:
    """`w4a8conv.cli.main()` in this process (main thread only): the same code path as the console script,
    without the ~3 s interpreter and torch start-up. An exception escaping `main` is recorded as a
    traceback on stderr with exit code None, exactly what a user would see."""
    from w4a8conv import cli

    saved = {s: signal.getsignal(s) for s in cli.STOP_SIGNALS}
    argv, out, err = sys.argv, io.StringIO(), io.StringIO()
    code: int | None
    try:
        sys.argv = ["w4a8conv", *map(str, args)]
        with redirect_stdout(out), redirect_stderr(err):
            try:
                cli.main()
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:  # noqa: BLE001 - a traceback is what the test must catch
                traceback.print_exc()
                code = None
    finally:
        sys.argv = argv
        for signum, handler in saved.items():
            signal.signal(signum, handler)
    return Run([str(a) for a in args], code, out.getvalue(), err.getvalue())


def error_lines(run: Run) -> list[str]:
    return [line for line in run.stderr.splitlines() if line.startswith("error:")]


def assert_clean_failure(run: Run, code: int, pieces) -> str:
    """Exit `code`, exactly one `error:` line holding every piece, no traceback anywhere."""
    assert "Traceback" not in run.stderr and "Traceback" not in run.stdout, run.describe()
    assert run.returncode == code, run.describe()
    lines = error_lines(run)
    assert len(lines) == 1, run.describe()
    for piece in pieces:
        assert piece in lines[0], f"{piece!r} not in {lines[0]!r}"
    return lines[0]


def assert_nothing_complete(out: Path) -> None:
    """No completion marker, and `verify` does not accept whatever is left."""
    from w4a8conv.verify import verify

    assert not os.path.exists(out / DESCRIPTION_NAME), sorted(p.name for p in out.iterdir())
    assert verify(out).ok is False
