"""The conventions every neighbouring CLI (hf, vllm) has: -h, --version, `python -m w4a8conv`, shell
completion, switches shown without a value type, -q/-v, usage errors as one line, and output that stays
one line per record off a terminal whatever COLUMNS says.

Subprocess runs pay ~3 s each for importing torch, so they run concurrently once (fixture `runs`).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from robustness_support import REPO, Run, assert_clean_failure, run_main
from w4a8conv import __version__
from w4a8conv.constants import ExitCode


def run(*args: str | Path, module: str = "w4a8conv.cli", columns: int = 400, env: dict | None = None) -> Run:
    """The CLI in a subprocess with pipes for stdout and stderr (not a terminal)."""
    full_env = dict(os.environ, COLUMNS=str(columns), NO_COLOR="1", TERM="dumb", **(env or {}))
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          env=full_env, cwd=REPO, timeout=300)
    return Run([str(a) for a in args], proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture(scope="module")
def runs(converted):
    source, output = converted("moe-group-v1")
    calls = {
        "help-short": dict(args=["-h"]),
        "help-long": dict(args=["--help"]),
        "convert-help": dict(args=["convert", "-h"], columns=120),
        "version": dict(args=["--version"], module="w4a8conv"),
        "version-command": dict(args=["version"]),
        "complete": dict(args=[], env={"_W4A8CONV_COMPLETE": "complete_bash", "COMP_WORDS": "w4a8conv ver",
                                       "COMP_CWORD": "1"}),
        "missing-argument": dict(args=["convert", source]),
        "bad-size": dict(args=["convert", source, "unused-out", "--max-shard-size", "4X"], columns=40),
        "quiet-and-verbose": dict(args=["inspect", source, "-q", "-v"]),
        "verify-40": dict(args=["verify", output, "--source", source], columns=40),
        "verify-400": dict(args=["verify", output, "--source", source]),
        "inspect-40": dict(args=["inspect", output], columns=40),
        "inspect-400": dict(args=["inspect", output]),
    }
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(run, *call.pop("args"), **call) for name, call in calls.items()}
        return {name: future.result() for name, future in futures.items()}


def test_short_help_is_the_long_help(runs):
    short, long = runs["help-short"], runs["help-long"]
    assert short.returncode == long.returncode == 0, short.describe()
    assert short.stdout == long.stdout
    for command in ("convert", "inspect", "verify", "selfcheck"):
        assert command in short.stdout


def test_version_option_and_python_dash_m_package(runs):
    assert runs["version"].returncode == 0, runs["version"].describe()
    assert runs["version"].stdout == f"{__version__}\n"
    assert runs["version-command"].stdout == runs["version"].stdout


def test_shell_completion_completes_commands(runs):
    completed = runs["complete"]
    assert completed.returncode == 0, completed.describe()
    assert completed.stdout.split() == ["verify", "version"]


def test_switches_are_shown_without_a_value_type(runs):
    help_text = runs["convert-help"].stdout
    for switch in ("--resume", "--force", "--dry-run", "--json", "--quiet", "--verbose"):
        (line,) = [text for text in help_text.splitlines() if f"{switch} " in text]
        assert "<" not in line, line
    (line,) = [text for text in help_text.splitlines() if "--max-shard-size " in text]
    assert "<str>" in line, line  # an option that takes a value still says so


@pytest.mark.parametrize("name, pieces", [
    ("missing-argument", ["w4a8conv convert: Missing argument 'output'", "(see w4a8conv convert -h)"]),
    ("bad-size", ["'4X' is not a size like 4GB"]),
    ("quiet-and-verbose", ["--quiet and --verbose exclude each other"]),
])
def test_usage_errors_are_one_line(runs, name, pieces):
    failed = runs[name]
    assert_clean_failure(failed, ExitCode.USAGE, pieces)
    assert failed.stderr.count("\n") == 1, failed.describe()  # no usage block, no boxed panel
    assert failed.stdout == ""


def _records(text: str) -> list[str]:
    return [re.sub(r"\d+(\.\d+)?", "N", line) for line in text.splitlines()]


@pytest.mark.parametrize("command", ["verify", "inspect"])
def test_narrow_columns_do_not_wrap_output_off_a_terminal(runs, command):
    narrow, wide = runs[f"{command}-40"], runs[f"{command}-400"]
    assert narrow.returncode == wide.returncode == 0, narrow.describe()
    assert _records(narrow.stdout) == _records(wide.stdout)
    assert _records(narrow.stderr) == _records(wide.stderr)
    for line in (narrow.stdout + narrow.stderr).splitlines():
        assert line == line.rstrip(), f"trailing spaces: {line!r}"
    if command == "verify":
        (verdict,) = narrow.stdout.splitlines()
        assert re.fullmatch(r"ok: \d+ shard\(s\), .* hashed, \d+ tensors compared; worst relative error: .*, "
                            r"bias \S+", verdict), verdict


def test_quiet_keeps_the_result_and_drops_progress(converted, tmp_path):
    source, _ = converted("moe-group-v1")
    normal = run_main("convert", source, tmp_path / "normal")
    quiet = run_main("convert", source, tmp_path / "quiet", "-q")
    assert normal.returncode == quiet.returncode == 0, quiet.describe()
    assert "progress: 100%" in normal.stderr
    assert "progress:" not in quiet.stderr
    assert quiet.stdout.startswith("converted ") and quiet.stdout.count("\n") == 1


def test_internal_error_is_one_line_and_verbose_adds_the_traceback(converted, monkeypatch):
    from w4a8conv import api

    def broken(*_args, **_kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(api, "inspect", broken)
    source, _ = converted("moe-group-v1")
    plain = run_main("inspect", source)
    assert_clean_failure(plain, ExitCode.INTERNAL, ["internal error: RuntimeError: a bug", "please report it"])
    verbose = run_main("inspect", source, "-v")
    assert verbose.returncode == ExitCode.INTERNAL
    assert "Traceback" in verbose.stderr and "RuntimeError: a bug" in verbose.stderr


@pytest.mark.parametrize("command, module, function, note", [
    ("verify", "w4a8conv.verify", "verify", "nothing was changed"),
    ("inspect", "w4a8conv.api", "inspect", "nothing was changed"),
    ("convert", "w4a8conv.api", "convert", "finished shards are kept: run the same command with --resume"),
])
def test_interrupt_message_fits_the_command(converted, tmp_path, monkeypatch, command, module, function, note):
    """A real SIGINT delivered while the command runs: exit 130 and one line saying what is left behind
    (only convert can be resumed)."""
    import importlib

    def interrupted(*_args, **_kwargs):
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(importlib.import_module(module), function, interrupted)
    source, output = converted("moe-group-v1")
    args = {"verify": [output], "inspect": [source], "convert": [source, tmp_path / "out"]}[command]
    stopped = run_main(command, *args)
    line = assert_clean_failure(stopped, 128 + signal.SIGINT, ["interrupted by SIGINT"])
    assert line.endswith(note), line
    if command != "convert":
        assert "--resume" not in stopped.stderr
