"""Durable file steps shared by everything that writes into the output directory: a temporary name,
fsync, rename, then fsync of the directory, so a crash leaves either the old file or the new one."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from .errors import WriteError

__all__ = ["partial_name", "discard", "fsync_dir", "write_json_atomic", "copy_file_atomic", "make_directories"]


def partial_name(file_name: str) -> str:
    """The temporary name a file is written under until it is complete."""
    return f".{file_name}.partial"


def discard(temp: Path) -> None:
    """Remove a temporary file after a failure; if even that fails (a file system remounted read-only
    on errors), the error to report is the first one, and `--resume` removes stale partial files."""
    with contextlib.suppress(OSError):
        temp.unlink(missing_ok=True)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: object) -> None:
    temp = path.with_name(partial_name(path.name))
    try:
        with open(temp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        discard(temp)
        raise WriteError(f"{path}: cannot write: {exc.strerror or exc}") from None


def copy_file_atomic(source: Path, target: Path) -> None:
    temp = target.with_name(partial_name(target.name))
    try:
        shutil.copyfile(source, temp)
        with open(temp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(temp, target)
    except OSError as exc:
        discard(temp)
        raise WriteError(f"{target}: cannot copy from {source}: {exc.strerror or exc}") from None


def make_directories(directory: Path) -> None:
    """A sub-directory of the output (and those above it) for copied files."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteError(f"{directory}: cannot create: {exc.strerror or exc}") from None
