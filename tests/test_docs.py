"""Every Python and shell code block of README.md and docs/*.md runs here, against the shipped example,
so a snippet cannot go stale.

A block that cannot run in a test (it sets up the machine, runs the whole suite or a 10 GB benchmark,
needs a cluster or `vllm serve`, or is a synopsis with placeholders) starts with a visible marker line

    # doc-test: skip (the reason)

and is still checked: every `w4a8conv` command in it must exist with every option it names, every
script or file it runs must exist (and name the options it is given), and Python must compile and
import only names that exist. Blocks in other languages (json, text, none) are documentation only.

Blocks run in a scratch directory that holds `examples` (a link to the committed ones, read only:
the tests check the example is unchanged) and `.venv` (the running interpreter's), with that `bin`
first on PATH, so `w4a8conv ...` and `.venv/bin/w4a8conv ...` both work as the README says.
"""
from __future__ import annotations

import ast
import importlib
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer

from robustness_support import tree_digest
from w4a8conv.cli import app

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL = {"bash", "sh", "shell", "console"}
PYTHON = {"python", "py"}
MARKER = re.compile(r"#\s*doc-test:\s*skip\s*\((?P<reason>[^)]+)\)")
FENCE = re.compile(r"^```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^```\s*$", re.M | re.S)


@dataclass(frozen=True)
class Block:
    document: Path
    line: int
    lang: str
    body: str

    @property
    def name(self) -> str:
        return f"{self.document.relative_to(REPO)}:{self.line}"

    @property
    def skip_reason(self) -> str | None:
        first = self.body.lstrip("\n").splitlines()[0] if self.body.strip() else ""
        match = MARKER.fullmatch(first.strip())
        return match.group("reason").strip() if match else None


def code_blocks() -> list[Block]:
    blocks = []
    for document in DOCUMENTS:
        text = document.read_text()
        for match in FENCE.finditer(text):
            lang = match.group("lang").lower()
            if lang in SHELL | PYTHON:
                blocks.append(Block(document, text.count("\n", 0, match.start()) + 1, lang, match.group("body")))
    return blocks


BLOCKS = code_blocks()
RUN = [b for b in BLOCKS if b.skip_reason is None]
SKIPPED = [b for b in BLOCKS if b.skip_reason is not None]


# -- what a skipped block is still checked for ----------------------------------------------------------

def _command_options(path: list[str]) -> set[str]:
    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    ctx = typer.Context(command)
    return {opt for param in command.get_params(ctx) for opt in (*param.opts, *param.secondary_opts)}


def _shell_lines(body: str) -> list[str]:
    """Logical lines (continuations joined), comments dropped."""
    text = body.replace("\\\n", " ")
    return [line.split(" #")[0].strip() for line in text.splitlines() if line.strip() and
            not line.lstrip().startswith("#")]


def _segments(line: str) -> list[list[str]]:
    """The simple commands of a line, split at &&, ||, ; and |."""
    words = shlex.split(line, comments=True)
    segments, current = [], []
    for word in words:
        if word in ("&&", "||", ";", "|"):
            segments.append(current)
            current = []
        else:
            current.append(word)
    return [s for s in segments + [current] if s]


def _options(words: list[str]) -> list[str]:
    """`--name` and `-x` words (a `--name=value` counts as `--name`); [...] and | of a synopsis are unwrapped."""
    found = []
    for word in words:
        for piece in re.split(r"[\[\]|]", word):
            if re.fullmatch(r"--?[A-Za-z][\w-]*(=.*)?", piece):
                found.append(piece.split("=")[0])
    return found


def check_commands(block: Block) -> None:
    """Every command a block names exists, with every option it passes."""
    for line in _shell_lines(block.body):
        for words in _segments(line):
            program = words[0]
            if Path(program).name == "w4a8conv" or words[:3] == ["python", "-m", "w4a8conv"]:
                args = words[3:] if program == "python" else words[1:]
                command = typer.main.get_command(app)
                if args and not args[0].startswith("-"):
                    assert args[0] in command.commands, f"{block.name}: w4a8conv has no command {args[0]}"
                subcommand = [args[0]] if args and args[0] in command.commands else []
                known = _command_options(subcommand)
                for option in _options(args[len(subcommand):]):
                    assert option in known, f"{block.name}: w4a8conv {' '.join(subcommand)} has no {option}"
            elif program in ("bash", "sh") or Path(program).name.startswith("python"):
                script = next((w for w in words[1:] if not w.startswith("-")), None)
                if script is None or words[1:2] == ["-m"]:
                    continue
                assert (REPO / script).is_file(), f"{block.name}: {script} does not exist"
                text = (REPO / script).read_text()
                for option in _options(words[2:]):
                    assert f'"{option}"' in text, f"{block.name}: {script} takes no {option}"


def check_python(block: Block) -> None:
    """The block compiles and every `from w4a8conv... import name` names something that exists."""
    tree = ast.parse(block.body, filename=block.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("w4a8conv"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{block.name}: {node.module} has no {alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("w4a8conv"):
                    importlib.import_module(alias.name)


# -- running ---------------------------------------------------------------------------------------------

def run_block(block: Block, workdir: Path) -> subprocess.CompletedProcess:
    workdir.mkdir(parents=True)
    (workdir / "examples").symlink_to(REPO / "examples", target_is_directory=True)
    (workdir / ".venv").symlink_to(Path(sys.executable).parents[1], target_is_directory=True)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               COLUMNS="400", NO_COLOR="1", TERM="dumb")
    if block.lang in PYTHON:
        script = workdir / "block.py"
        script.write_text(block.body)
        argv = [sys.executable, str(script)]
    else:
        script = workdir / "block.sh"
        script.write_text(block.body)
        argv = ["bash", "-euo", "pipefail", str(script)]
    return subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """Every runnable block, concurrently (each pays for importing torch)."""
    base = tmp_path_factory.mktemp("docs")
    before = tree_digest(REPO / "examples")
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        futures = {b.name: pool.submit(run_block, b, base / f"block-{i}") for i, b in enumerate(RUN)}
        results = {name: future.result() for name, future in futures.items()}
    assert tree_digest(REPO / "examples") == before, "a documented block modified the committed example"
    return results


def test_the_readme_has_runnable_python_and_shell():
    assert any(b.document.name == "README.md" and b.lang in PYTHON for b in RUN)
    assert len(BLOCKS) >= 4  # the collector finds the blocks at all


@pytest.mark.parametrize("block", RUN, ids=lambda b: b.name)
def test_block_runs(ran, block):
    done = ran[block.name]
    assert done.returncode == 0, f"{block.name} exit {done.returncode}\n{block.body}\nstdout:\n{done.stdout}\n" \
                                 f"stderr:\n{done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.name)
def test_block_names_only_what_exists(block):
    if block.lang in PYTHON:
        check_python(block)
    else:
        check_commands(block)


@pytest.mark.parametrize("block", SKIPPED, ids=lambda b: b.name)
def test_skipped_blocks_say_why(block):
    assert len(block.skip_reason) >= 10, f"{block.name}: say why the block cannot run here"


def test_the_checks_catch_what_they_are_for():
    """The checker itself: an unknown option, command, script or import is found."""
    def fails(lang: str, body: str) -> bool:
        try:
            (check_python if lang in PYTHON else check_commands)(Block(REPO / "README.md", 1, lang, body))
        except (AssertionError, ImportError, KeyError):
            return True
        return False

    assert fails("bash", "w4a8conv convert SRC OUT --max-shrad-size 4GB")
    assert fails("bash", "# doc-test: skip (synopsis)\nw4a8conv convert SRC OUT [--no-such-flag]")
    assert fails("bash", "w4a8conv conver SRC OUT --json")
    assert fails("bash", "bash scripts/missing.sh")
    assert fails("bash", ".venv/bin/python benchmarks/bench_convert.py --sizes 1")
    assert fails("python", "from w4a8conv.api import convert, no_such_name")
    assert not fails("bash", "w4a8conv convert SRC OUT [--max-shard-size 4GB] -q && w4a8conv --version")
    assert not fails("bash", ".venv/bin/python benchmarks/bench_convert.py --sizes-gb 1 8")
    assert Block(REPO, 1, "bash", "# doc-test: skip (needs an NPU and CANN)\nw4a8conv selfcheck").skip_reason \
        == "needs an NPU and CANN"
    assert Block(REPO, 1, "bash", "w4a8conv selfcheck  # doc-test: skip (x)").skip_reason is None
