"""The command line end to end, in subprocesses: convert, inspect, the README's first command, and
exit codes with one `error:` line naming the file, the tensor and the rule.

Every CLI process pays for importing torch (~3 s), so the module builds all inputs first and runs
all invocations concurrently once (fixture `runs`); the tests then only look at the results.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from safetensors.torch import load_file

from robustness_support import edit_json, rewrite_tensors, tree_digest
from w4a8conv.constants import ExitCode
from w4a8conv.synthetic import PRESETS, write_checkpoint

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "tiny-w4a8-moe"
MOE = "model.layers.1.mlp"


@dataclass
class Run:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str


def cli(*args: str | Path, cwd: Path | None = None) -> Run:
    env = dict(os.environ, COLUMNS="400", NO_COLOR="1", TERM="dumb")
    argv = [sys.executable, "-m", "w4a8conv.cli", *map(str, args)]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd or REPO, timeout=300)
    return Run(argv, proc.returncode, proc.stdout, proc.stderr)


def header_bytes(root: Path) -> int:
    total = 0
    for f in root.glob("*.safetensors"):
        with open(f, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
        header.pop("__metadata__", None)
        total += sum(info["data_offsets"][1] - info["data_offsets"][0] for info in header.values())
    return total


# -- invalid inputs: (preset, how to break it, exit code, pieces the error line must contain) -------------

V0_FILE = "quant_model_weight_w8a8_dynamic.safetensors"   # moe-group-v0: one file, typed description
V0_DESCRIPTION = "quant_model_description_w8a8_dynamic.json"
CHANNEL_V0_FILE = "quant_model_weights.safetensors"       # moe-channel-v0


def _int4_nine(root: Path) -> None:
    def change(t):
        t[f"{MOE}.experts.3.down_proj.weight"][5, 7] = 9
    rewrite_tensors(root / CHANNEL_V0_FILE, change)


def _offset(root: Path) -> None:
    def change(t):
        t[f"{MOE}.experts.2.up_proj.weight_offset"][4, 0] = 0.5
    rewrite_tensors(root / V0_FILE, change)


def _missing_second(root: Path) -> None:
    rewrite_tensors(root / V0_FILE, lambda t: t.pop(f"{MOE}.experts.5.gate_proj.weight_scale_second"))


def _untyped(root: Path) -> None:
    edit_json(root / V0_DESCRIPTION, lambda d: d.pop(f"{MOE}.experts.0.up_proj.weight_scale"))


def _group_sizes_disagree(root: Path) -> None:
    edit_json(root / V0_DESCRIPTION, lambda d: d.pop("group_size"))
    rewrite_tensors(root / V0_FILE, lambda t: t.update({f"{MOE}.experts.5.gate_proj.weight_scale_second":
                                                        t[f"{MOE}.experts.5.gate_proj.weight_scale_second"]
                                                        .repeat_interleave(2, dim=1)}))


INVALID = {
    "int4-nine": ("moe-channel-v0", _int4_nine, [
        CHANNEL_V0_FILE, f"{MOE}.experts.3.down_proj.weight", "int4 value 9 at [5, 7] outside [-8, 7]"]),
    "nonzero-offset": ("moe-group-v0", _offset, [
        V0_FILE, f"{MOE}.experts.2.up_proj.weight_offset", "non-zero offset 0.5 at [4, 0]",
        "asymmetric quantization"]),
    "missing-second": ("moe-group-v0", _missing_second, [
        f"{MOE}.experts.5.gate_proj.weight_scale_second", "missing",
        f"W4A8_DYNAMIC module {MOE}.experts.5.gate_proj needs it"]),
    "untyped": ("moe-group-v0", _untyped, [
        V0_DESCRIPTION, f"{MOE}.experts.0.up_proj.weight_scale",
        "tensor has no quantization type in the description"]),
    "group-sizes-disagree": ("moe-group-v0", _group_sizes_disagree, [
        V0_DESCRIPTION, "the description has no group_size and the shapes disagree",
        f"{MOE}.experts.5.gate_proj.weight_scale_second means group size 16",
        "_proj.weight_scale_second means 32"]),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Build every input, then run every CLI invocation concurrently; name -> list of Runs."""
    base = tmp_path_factory.mktemp("cli")
    ctx: dict[str, object] = {"base": base}
    tasks: dict[str, list[list]] = {}

    def src(name: str, preset: str, **overrides) -> Path:
        return write_checkpoint(base / f"src-{name}", replace(PRESETS[preset], **overrides))

    # convert --json, then inspect the output (human table and --json)
    good = src("good", "moe-channel-v0")
    ctx["good"] = good
    tasks["convert"] = [["convert", good, base / "good-out", "--json"], ["inspect", base / "good-out"]]
    # inspect a source as JSON: group_size absent (256 from the shapes), version absent (read as "0")
    tasks["inspect-default-group"] = [["inspect", src("dg", "moe-group-v0-default-group"), "--json"]]
    # the README's first command, run from a directory whose examples/ is the committed one
    readme = (REPO / "README.md").read_text()
    line = next(text for text in readme.splitlines() if "w4a8conv convert" in text)
    commands = [shlex.split(c) for c in re.findall(r"w4a8conv ((?:convert|inspect) [^&\n]*?)\s*(?=&&|$)", line)]
    ctx["readme_commands"] = commands
    workdir = base / "readme"
    workdir.mkdir()
    (workdir / "examples").symlink_to(REPO / "examples", target_is_directory=True)
    ctx["readme_workdir"] = workdir
    ctx["example_digest"] = tree_digest(EXAMPLE)
    tasks["readme"] = [[*c, {"cwd": workdir}] for c in commands]
    # invalid inputs
    for name, (preset, breaker, _pieces) in INVALID.items():
        root = src(name, preset)
        breaker(root)
        ctx[f"{name}-src"] = root
        tasks[name] = [["convert", root, base / f"{name}-out"]]
    # output location errors
    inside = src("inside", "moe-group-v0")
    ctx["inside-digest"] = tree_digest(inside)
    ctx["inside"] = inside
    tasks["output-inside-source"] = [["convert", inside, inside / "out"]]
    busy = base / "busy-out"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine\n")
    ctx["busy"] = busy
    tasks["output-not-empty"] = [["convert", good, busy]]

    def run_task(commands: list[list]) -> list[Run]:
        results = []
        for command in commands:
            kwargs = command[-1] if isinstance(command[-1], dict) else {}
            args = command[:-1] if kwargs else command
            results.append(cli(*args, **kwargs))
        return results

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        futures = {name: pool.submit(run_task, commands) for name, commands in tasks.items()}
        results = {name: f.result() for name, f in futures.items()}
    results["ctx"] = ctx
    return results


def describe(run: Run) -> str:
    return f"{' '.join(run.args[2:])}\nexit {run.returncode}\nstdout:\n{run.stdout}\nstderr:\n{run.stderr}"


def error_lines(run: Run) -> list[str]:
    return [line for line in run.stderr.splitlines() if line.startswith("error:")]


def assert_clean_failure(run: Run, code: int, pieces: list[str]) -> str:
    assert run.returncode == code, describe(run)
    lines = error_lines(run)
    assert len(lines) == 1, describe(run)
    assert "Traceback" not in run.stderr and "Traceback" not in run.stdout, describe(run)
    for piece in pieces:
        assert piece in lines[0], f"{piece!r} not in {lines[0]!r}"
    return lines[0]


def assert_nothing_complete(out: Path) -> None:
    assert not (out / "quant_model_description.json").exists()
    assert not (out / "model.safetensors.index.json").exists()
    if out.exists():
        assert not list(out.glob("*.safetensors")), sorted(p.name for p in out.iterdir())


# ---------------------------------------------------------------------------------------------
# success paths


def test_convert_json_then_inspect(runs):
    convert, inspect_human = runs["convert"]
    assert convert.returncode == 0, describe(convert)
    assert "error:" not in convert.stderr
    summary = json.loads(convert.stdout)
    src, out = runs["ctx"]["good"], runs["ctx"]["base"] / "good-out"
    assert Path(summary["output"]) == out
    assert summary["modules_converted"] == 1
    assert summary["shards"] == len(list(out.glob("*.safetensors"))) == 1
    assert summary["source_bytes"] == header_bytes(src)
    assert summary["output_bytes"] == sum(p.stat().st_size for p in out.glob("*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert summary["tensors"] == len(index["weight_map"])
    description = json.loads((src / "quant_model_description.json").read_text())
    passthrough = sum(1 for n in load_file(str(src / CHANNEL_V0_FILE)) if description[n] != "W4A8_DYNAMIC")
    assert summary["tensors_passed_through"] == passthrough
    assert summary["tensors"] == passthrough + 9 * 8  # 8 experts x 3 projections x (weight, weight_scale, scale_bias)
    assert len(summary["warnings"]) == 1 and "per-channel" in summary["warnings"][0]
    assert summary["peak_rss_bytes"] > 0 and summary["workers"] >= 1
    assert isinstance(summary["seconds"], (int, float)) and summary["seconds"] >= 0
    assert (out / "quant_model_description.json").is_file()

    assert inspect_human.returncode == 0, describe(inspect_human)
    text = inspect_human.stdout
    assert re.search(r"^kind\s+converted\s*$", text, re.M), text
    assert re.search(r"^layout\s+w4a8conv-npu-ready/2\s*$", text, re.M), text
    assert re.search(r"^source\s+version 0, group_size 0, model dtype bfloat16\s*$", text, re.M), text
    assert re.search(r"^variants\s+moe-channel-v0 x1\s*$", text, re.M), text
    assert re.search(rf"^moe\s+{re.escape(MOE)}: 8 experts, H 256, I 128\s*$", text, re.M), text


def test_inspect_source_json(runs):
    (run,) = runs["inspect-default-group"]
    assert run.returncode == 0, describe(run)
    info = json.loads(run.stdout)
    assert info["kind"] == "source"
    assert info["version"] == "0"
    assert info["group_size"] == 256
    assert info["group_size_given"] is False
    assert info["group_size_from"] == "shapes"
    assert info["warnings"] == ["quant_model_description_w4a8_dynamic.json has no group_size: group size 256 "
                                "inferred from the weight_scale_second shapes (vllm-ascend would have used 256)"]
    assert info["description"] == "quant_model_description_w4a8_dynamic.json"
    assert (info["files"], info["index"]) == (1, None)
    assert info["model_dtype"] == "bfloat16"
    assert info["variants"] == {"moe-group-v0": 1}
    assert info["linear_layers"] == []
    assert info["moe_layers"] == [{"prefix": MOE, "variant": "moe-group-v0", "experts": 4, "hidden": 512,
                                   "intermediate": 256}]
    # 4 experts x 3 projections x (weight, scale, offset, scale_second, offset_second)
    assert info["tensors_converted"] == 4 * 3 * 5
    assert info["passthrough_types"]["W8A8_DYNAMIC"] > 0 and info["passthrough_types"]["FLOAT"] > 0
    assert info["tensors"] == info["tensors_converted"] + info["tensors_passed_through"]
    # int8 values [out, in] -> int32 [in, out/8]: half the bytes
    weights = 4 * 3 * 512 * 256
    assert info["converted_output_bytes"] < info["converted_source_bytes"]
    assert info["converted_output_bytes"] >= weights // 2


def test_readme_first_command_on_committed_example(runs):
    commands = runs["ctx"]["readme_commands"]
    assert [c[0] for c in commands] == ["convert", "inspect"]
    assert commands[0][1] == "examples/tiny-w4a8-moe"
    assert commands[1][1] == commands[0][2]
    convert, inspect_run = runs["readme"]
    assert convert.returncode == 0, describe(convert)
    assert inspect_run.returncode == 0, describe(inspect_run)
    out = runs["ctx"]["readme_workdir"] / commands[0][2]
    assert (out / "quant_model_description.json").is_file()
    assert re.search(r"^kind\s+converted\s*$", inspect_run.stdout, re.M), inspect_run.stdout
    assert re.search(r"^layout\s+w4a8conv-npu-ready/2\s*$", inspect_run.stdout, re.M), inspect_run.stdout
    # a "1.0.0" export with W4A8 dense MLP and shared experts: 1 MoE layer + 6 Linear layers
    assert re.search(r"^variants\s+moe-group-v1 x1, linear-group-v1 x6\s*$", inspect_run.stdout, re.M), \
        inspect_run.stdout
    assert tree_digest(EXAMPLE) == runs["ctx"]["example_digest"], "convert modified the committed example"


# ---------------------------------------------------------------------------------------------
# failures


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_input_exit_3(runs, name):
    (run,) = runs[name]
    _preset, _breaker, pieces = INVALID[name]
    line = assert_clean_failure(run, ExitCode.INVALID_INPUT, pieces)
    src = runs["ctx"][f"{name}-src"]
    assert str(src) in line, line  # the file or directory is named by path
    assert_nothing_complete(runs["ctx"]["base"] / f"{name}-out")


def test_output_inside_source_exit_2(runs):
    (run,) = runs["output-inside-source"]
    inside = runs["ctx"]["inside"]
    assert_clean_failure(run, ExitCode.USAGE, [str(inside / "out"),
                                               "must not be the source directory or inside it"])
    assert not (inside / "out").exists()
    assert tree_digest(inside) == runs["ctx"]["inside-digest"]


def test_existing_non_empty_output_exit_2(runs):
    (run,) = runs["output-not-empty"]
    busy = runs["ctx"]["busy"]
    assert_clean_failure(run, ExitCode.USAGE, [str(busy), "exists and is not empty"])
    assert sorted(p.name for p in busy.iterdir()) == ["keep.txt"]
    assert (busy / "keep.txt").read_text() == "mine\n"
    assert_nothing_complete(busy)


def test_exit_codes_are_the_documented_numbers():
    assert (ExitCode.OK, ExitCode.USAGE, ExitCode.INVALID_INPUT) == (0, 2, 3)
