"""The error tree: every failure the tool reports carries the exit code the CLI maps it to."""
from __future__ import annotations

from pathlib import Path

from .constants import ExitCode

__all__ = [
    "W4A8Error", "UsageError", "InvalidCheckpointError", "UnsupportedSplitError",
    "OutputLocationError", "WriteError", "NotConvertedError", "ServingError", "IncompleteOutputError",
]


class W4A8Error(Exception):
    """Base of every error w4a8conv raises on purpose."""

    exit_code: ExitCode = ExitCode.INTERNAL


class UsageError(W4A8Error):
    """The call itself is wrong (bad option value, unknown prefix)."""

    exit_code = ExitCode.USAGE


class InvalidCheckpointError(W4A8Error):
    """The input breaks a rule; the message names the file, the tensor and the rule."""

    exit_code = ExitCode.INVALID_INPUT

    def __init__(self, rule: str, *, file: Path | str | None = None, tensor: str | None = None):
        self.rule, self.file, self.tensor = rule, file, tensor
        where = ": ".join(str(p) for p in (file, tensor) if p)
        super().__init__(f"{where}: {rule}" if where else rule)


class NotConvertedError(InvalidCheckpointError):
    """A directory the runtime cannot serve: no stamp, a foreign layout, a version it does not know."""


class UnsupportedSplitError(W4A8Error):
    """A tensor/expert-parallel split the layout cannot serve exactly."""

    exit_code = ExitCode.USAGE


class OutputLocationError(W4A8Error):
    """The output directory is unusable (exists, inside the source, not writable)."""

    exit_code = ExitCode.USAGE


class WriteError(W4A8Error):
    """Writing the output failed (disk full, permissions); nothing complete was left behind."""

    exit_code = ExitCode.IO_FAILURE


class IncompleteOutputError(W4A8Error):
    """A distributed run's commit found planned tasks unfinished or their shards altered (`tasks`: their indices)."""

    exit_code = ExitCode.INCOMPLETE

    def __init__(self, message: str, *, tasks: list[int]):
        super().__init__(message)
        self.tasks = tasks


class ServingError(W4A8Error):
    """The serving stack would not hold exactly the converted model: an unsupported release, a layer
    the stamp does not describe, or a parameter left (partly) unloaded."""
