"""The conventions every neighbouring CLI (hf, vllm) has: -h, --version, `python -m w4a8conv`, shell
completion, switches shown without a value type, -q/-v, usage errors as one line, and output that stays
one line per record off a terminal whatever COLUMNS says.

Subprocess runs pay ~3 s each for importing torch, so they run concurrently once (fixture `runs`).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from robustness_support import MOE, REPO, WEIGHTS, Run, assert_clean_failure, rewrite_tensors, run_main
from w4a8conv import __version__
from w4a8conv.constants import ExitCode


def run(*args: str | Path, module: str = "w4a8conv.cli", columns: int = 400, env: dict | None = None) -> Run:
    """The CLI in a subprocess with pipes for stdout and stderr (not a terminal)."""
    full_env = dict(os.environ, COLUMNS=str(columns), NO_COLOR="1", TERM="dumb", **(env or {}))
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          env=full_env, cwd=REPO, timeout=300)
    return Run([str(a) for a in args], proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture(scope="module")
def runs(converted, preset_source, tmp_path_factory):
    source, output = converted("moe-group-v1")
    channel = preset_source("moe-channel-v0")  # its conversion warns (a long line)
    base = tmp_path_factory.mktemp("conventions")
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
        "convert-40": dict(args=["convert", channel, base / "40" / "out"], columns=40),
        "convert-400": dict(args=["convert", channel, base / "400" / "out"]),
        "verify-40": dict(args=["verify", output, "--source", source, "--numerics"], columns=40),
        "verify-400": dict(args=["verify", output, "--source", source, "--numerics"]),
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
    for switch in ("--resume", "--force", "--dry-run", "--json", "--quiet", "--verbose", "--help"):
        (line,) = [text for text in help_text.splitlines() if f"{switch} " in text]
        assert "<" not in line, line
    top_help = runs["help-long"].stdout  # typer's own switches: help and shell completion
    for switch in ("--help", "--install-completion", "--show-completion", "--version"):
        (line,) = [text for text in top_help.splitlines() if text.lstrip("│ ").startswith(f"{switch} ")]
        assert "<" not in line, line
    (line,) = [text for text in help_text.splitlines() if "--max-shard-size " in text]
    assert "SIZE" in line, line  # an option that takes a value still says so


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


@pytest.mark.parametrize("command", ["convert", "verify", "inspect"])
def test_narrow_columns_do_not_wrap_output_off_a_terminal(runs, command):
    narrow, wide = runs[f"{command}-40"], runs[f"{command}-400"]
    assert narrow.returncode == wide.returncode == 0, narrow.describe()
    assert _records(narrow.stdout) == _records(wide.stdout)
    assert _records(narrow.stderr) == _records(wide.stderr)
    for line in (narrow.stdout + narrow.stderr).splitlines():
        assert line == line.rstrip(), f"trailing spaces: {line!r}"
    if command == "verify":
        verdict, numerics = narrow.stdout.splitlines()
        assert re.fullmatch(r"ok: \d+ shard\(s\), .* hashed, \d+ tensors compared; worst relative error: .*, "
                            r"bias \S+, numerics \S+", verdict), verdict
        assert re.fullmatch(r"numerics \S+: relative error .*, bound .* \(ok; experts .*, top-2\)", numerics), numerics
    if command == "convert":
        (summary,) = narrow.stdout.splitlines()
        assert re.fullmatch(r"converted \d+ W4A8 modules, .* s since start\) with \d+ worker\(s\)"
                            r"( \(of \d+ requested: \d+ shard\(s\), \d+ usable CPU\(s\)\)"
                            r"| \(default: one per two usable CPUs, one per shard at most; \d+ usable CPU\(s\)\))?, "
                            r"(numba \S+|numpy) kernels, peak RSS .* -> "
                            r"\S+/40/out", summary), summary
        (warning,) = [line for line in narrow.stderr.splitlines() if line.startswith("warning:")]
        assert warning.endswith("w4a8conv computes it (8·Σ W·s)"), warning


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


def _one_json_object(text: str) -> dict:
    return json.loads(text)  # raises on anything but exactly one JSON document


def test_json_failure_is_one_object_naming_file_and_tensor(preset_source, tmp_path):
    source = shutil.copytree(preset_source("moe-channel-v0"), tmp_path / "src")
    tensor = f"{MOE}.experts.3.down_proj.weight"

    def nine(tensors):
        tensors[tensor][5, 7] = 9
    rewrite_tensors(source / WEIGHTS, nine)
    failed = run_main("convert", source, tmp_path / "out", "--json")
    line = assert_clean_failure(failed, ExitCode.INVALID_INPUT, [tensor])
    report = _one_json_object(failed.stdout)
    assert report == {"ok": False, "exit_code": 3, "error": "InvalidCheckpointError",
                      "message": line.removeprefix("error: "), "file": str(source / WEIGHTS), "tensor": tensor}


def test_json_usage_failure_is_one_object(preset_source, tmp_path):
    failed = run_main("convert", preset_source("moe-group-v1"), tmp_path / "out", "--max-shard-size", "4X",
                      "--json")
    assert failed.returncode == ExitCode.USAGE, failed.describe()
    report = _one_json_object(failed.stdout)
    assert (report["ok"], report["exit_code"], report["error"]) == (False, 2, "UsageError")
    assert "'4X' is not a size" in report["message"]
    assert (report["file"], report["tensor"]) == (None, None)
    missing = run_main("inspect", "--json")
    assert _one_json_object(missing.stdout)["message"].startswith("w4a8conv inspect: Missing argument")


@pytest.mark.parametrize("text, expected", [
    ("4GB", 4 * 10**9), ("4gb", 4 * 10**9), ("4 GB", 4 * 10**9), ("1.5GB", 1_500_000_000),
    ("4GiB", 4 * 2**30), ("4G", 4 * 2**30), ("4g", 4 * 2**30), (".5G", 2**29), ("500MiB", 500 * 2**20),
    ("500M", 500 * 2**20), ("500MB", 500 * 10**6), ("64K", 64 * 2**10), ("64KB", 64_000), ("1TB", 10**12),
    ("1T", 2**40), ("1000000", 1_000_000), ("1000000B", 1_000_000),
])
def test_shard_sizes_read_as_documented(text, expected):
    from w4a8conv.cli import parse_size

    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["4X", "4GBs", "inf", "nan", "-1G", "0", "0.1", "1e9", "\uff14GB", "", "G", "9" * 400])
def test_bad_shard_sizes_are_usage_errors(preset_source, tmp_path, text):
    failed = run_main("inspect", preset_source("moe-group-v1"), "--plan", "--max-shard-size", text)
    assert_clean_failure(failed, ExitCode.USAGE, ["--max-shard-size"])


def test_shard_size_units_change_the_plan(preset_source):
    source = preset_source("moe-group-v1")
    plans = {}
    for text in ("1MB", "1MiB", "1M"):
        done = run_main("inspect", source, "--plan", "--max-shard-size", text, "--json")
        assert done.returncode == 0, done.describe()
        plans[text] = json.loads(done.stdout)["plan"]["shards"]
    assert plans["1MiB"] == plans["1M"] != plans["1MB"]
    assert max(s["bytes"] for s in plans["1MB"]) <= 10**6 < max(s["bytes"] for s in plans["1M"]) <= 2**20


@pytest.mark.parametrize("alias, name", [("bf16", "bfloat16"), ("BF16", "bfloat16"), ("fp16", "float16"),
                                         ("half", "float16"), ("fp32", "float32"), ("float32", "float32")])
def test_model_dtype_aliases(preset_source, alias, name):
    done = run_main("inspect", preset_source("moe-group-v1"), "--model-dtype", alias, "--json")
    assert done.returncode == 0, done.describe()
    assert json.loads(done.stdout)["model_dtype"] == name


def test_bad_model_dtype_is_a_usage_error(preset_source, tmp_path):
    for args in (["inspect", preset_source("moe-group-v1")], ["convert", preset_source("moe-group-v1"), tmp_path / "o"]):
        failed = run_main(*args, "--model-dtype", "bf17")
        assert_clean_failure(failed, ExitCode.USAGE, ["--model-dtype", "'bf17' is not one of bfloat16"])
    assert not (tmp_path / "o").exists()


def test_python_api_refuses_a_bad_model_dtype_as_usage(preset_source, tmp_path):
    from w4a8conv.api import ConvertOptions, convert
    from w4a8conv.errors import UsageError

    with pytest.raises(UsageError, match="'int8' is not one of"):
        convert(preset_source("moe-group-v1"), tmp_path / "o", options=ConvertOptions(model_dtype="int8"))


def test_inspect_converted_refuses_source_only_options(converted):
    _source, output = converted("moe-group-v1")
    for option in (["--plan"], ["--model-dtype", "bf16"]):
        failed = run_main("inspect", output, *option)
        assert_clean_failure(failed, ExitCode.USAGE, [str(output), "is already converted", option[0],
                                                      "applies to a source checkpoint"])


def test_convert_shows_each_phase_before_progress_and_wall_time(preset_source, tmp_path):
    source = preset_source("moe-group-v1")
    done = run_main("convert", source, tmp_path / "out")
    assert done.returncode == 0, done.describe()
    lines = done.stderr.splitlines()
    from w4a8conv.source import open_source

    opened = open_source(source)
    expected = [f"reading {source}", f"validating {len(opened.tensors):,} tensors in {len(opened.headers)} file(s)"]
    assert lines[:2] == expected, done.stderr
    assert re.fullmatch(r"writing \d+ shard\(s\), \S+ \S+, with \d+ worker\(s\)", lines[2]), lines[2]
    assert lines[3].startswith("progress: ")
    assert re.search(r" in \d+\.\d s \(\d+\.\d s since start\) with ", done.stdout), done.stdout
    as_json = run_main("convert", source, tmp_path / "json", "--json")
    summary = json.loads(as_json.stdout)
    assert summary["wall_seconds"] >= summary["seconds"] > 0
    assert as_json.stderr == ""  # --json: no phases, no progress


def test_verify_shows_each_phase_before_its_result(converted):
    source, output = converted("moe-group-v1")
    done = run_main("verify", output, "--source", source, "--numerics")
    assert done.returncode == 0, done.describe()
    assert done.stderr.splitlines() == [
        f"opening {output}", "hashing 1 shard(s)", f"reading the source {source}",
        "comparing 2 sampled expert(s) per layer with the source",
        "running the numerics check against an fp32 forward of the source"], done.stderr
    quiet = run_main("verify", output, "--source", source, "--all", "-q")
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.describe()


def test_selfcheck_require_npu_fails_when_device_checks_are_skipped():
    from w4a8conv.selfcheck import run_selfcheck

    if run_selfcheck().skipped == 0:
        pytest.skip("an NPU is present: nothing is skipped")
    plain = run_main("selfcheck")
    assert plain.returncode == 0, plain.describe()
    required = run_main("selfcheck", "--require-npu")
    assert required.returncode == ExitCode.VERIFY_FAILED, required.describe()
    assert "device check(s) skipped and --require-npu was given" in required.stderr
    assert required.stdout.splitlines()[-1].startswith("FAILED (")
    as_json = json.loads(run_main("selfcheck", "--require-npu", "--json").stdout)
    assert (as_json["ok"], as_json["require_device"]) == (False, True) and as_json["skipped"] > 0
