"""The CLI's one output sink. On a terminal: rich (tables that fit, a progress bar). Anywhere else
(CI logs, pipes, files): plain lines that are never wrapped and carry no trailing spaces, one line
per record, whatever COLUMNS says.

stdout carries results (a summary, a table, one JSON object); stderr carries phases, progress,
warnings and errors. `--quiet` keeps results, warnings and errors; `--verbose` adds detail lines;
`--json` keeps stdout to the one JSON object and stderr to warnings and errors.
"""
from __future__ import annotations

import json
import sys
from enum import IntEnum
from typing import IO, Sequence, TextIO

__all__ = ["Verbosity", "Sink", "Progress", "human_bytes", "sink"]


class Verbosity(IntEnum):
    QUIET = 0
    NORMAL = 1
    VERBOSE = 2


def human_bytes(n: float) -> str:
    """Decimal units (1 GB = 10^9 bytes), as `--max-shard-size` reads "GB"."""
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1000
        if n < 1000:
            return f"{n:.2f} {unit}"
    return f"{n / 1000:.2f} TB"


def _is_terminal(stream: IO[str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class Sink:
    """Where every line the CLI prints goes. Streams are looked up at each write (tests swap them)."""

    def __init__(self) -> None:
        self.verbosity = Verbosity.NORMAL
        self.as_json = False

    def configure(self, *, quiet: bool = False, verbose: bool = False, as_json: bool = False) -> None:
        self.verbosity = Verbosity.QUIET if quiet else Verbosity.VERBOSE if verbose else Verbosity.NORMAL
        self.as_json = as_json

    @property
    def chatty(self) -> bool:
        """Phases and progress are shown: neither --quiet nor --json."""
        return self.verbosity >= Verbosity.NORMAL and not self.as_json

    # -- stdout: results ------------------------------------------------------------------------
    def result(self, text: str) -> None:
        """One result line (a summary, a verdict)."""
        if not self.as_json:
            self._write(sys.stdout, text)

    def rows(self, rows: Sequence[tuple[str, str]]) -> None:
        """A two-column key/value table: rich on a terminal, `key  value` lines otherwise."""
        if self.as_json:
            return
        if _is_terminal(sys.stdout):
            from rich.console import Console
            from rich.table import Table

            table = Table(show_header=False, box=None, pad_edge=False)
            for key, value in rows:
                table.add_row(key, value)
            Console(file=sys.stdout, highlight=False).print(table)
            return
        width = max((len(key) for key, _ in rows), default=0)
        for key, value in rows:
            self._write(sys.stdout, f"{key:<{width}}  {value}")

    def data(self, obj: object) -> None:
        """The one JSON object of --json (indented, so a failing CI step is readable)."""
        sys.stdout.write(json.dumps(obj, indent=2) + "\n")
        sys.stdout.flush()

    # -- stderr: what happens -------------------------------------------------------------------
    def phase(self, text: str) -> None:
        """What the tool is doing now ("validating 1,234 tensors in 12 files")."""
        if self.chatty:
            self._write(sys.stderr, text)

    def detail(self, text: str) -> None:
        """A line only --verbose shows."""
        if self.verbosity >= Verbosity.VERBOSE and not self.as_json:
            self._write(sys.stderr, text)

    def warning(self, text: str) -> None:
        if not self.as_json:
            self._write(sys.stderr, f"warning: {text}")

    def problem(self, text: str) -> None:
        self._write(sys.stderr, f"problem: {text}")

    def error(self, text: str) -> None:
        self._write(sys.stderr, f"error: {text}")

    def progress(self, label: str) -> "Progress":
        return Progress(label, enabled=self.chatty)

    @staticmethod
    def _write(stream: TextIO, text: str) -> None:
        for line in text.splitlines() or [""]:
            stream.write(line.rstrip() + "\n")
        stream.flush()


class Progress:
    """Bytes done: a rich bar on a terminal, a plain line per 10 % otherwise (stderr)."""

    def __init__(self, label: str, *, enabled: bool):
        self.label, self.done, self.enabled, self.next_line = label, 0, enabled, 10
        self.bar = self.task = None
        if enabled and _is_terminal(sys.stderr):
            from rich.console import Console
            from rich.progress import BarColumn, DownloadColumn, TimeRemainingColumn, TransferSpeedColumn
            from rich.progress import Progress as Bar

            self.bar = Bar(label, BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                           console=Console(file=sys.stderr), transient=True)

    def __enter__(self) -> "Progress":
        if self.bar:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar:
            self.bar.stop()

    def __call__(self, nbytes: int, total: int) -> None:
        self.done += nbytes
        if self.bar:
            if self.task is None:
                self.task = self.bar.add_task(self.label, total=total)
            self.bar.update(self.task, completed=self.done)
        elif self.enabled and total and self.done * 100 >= self.next_line * total:
            Sink._write(sys.stderr, f"progress: {self.done * 100 // total}% "
                                    f"({human_bytes(self.done)} of {human_bytes(total)})")
            self.next_line = self.done * 100 // total // 10 * 10 + 10


sink = Sink()
