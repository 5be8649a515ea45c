"""Command line: parse, call `api`, print. Only `main` turns errors into exit codes."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .constants import ExitCode
from .errors import W4A8Error

__all__ = ["app", "main"]

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Convert msModelSlim W4A8_DYNAMIC checkpoints into vllm-ascend's NPU-ready layout.")
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

SrcArg = Annotated[Path, typer.Argument(help="msModelSlim checkpoint directory (read only).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one machine-readable JSON object.")]
DtypeOpt = Annotated[Optional[str], typer.Option(
    "--model-dtype", help="Model dtype (bfloat16, float16, float32); default: config.json's torch_dtype.")]


def _parse_size(text: str) -> int:
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    number = text.strip().upper().rstrip()
    digits = number.rstrip("KMGTIB")
    try:
        value = float(digits) * units[number[len(digits):]]
    except (ValueError, KeyError):
        raise typer.BadParameter(f"{text!r} is not a size like 4GB, 500MiB or 1000000") from None
    if value < 1:
        raise typer.BadParameter("the shard size must be positive")
    return int(value)


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError


@app.command()
def convert(
    source: SrcArg,
    output: Annotated[Path, typer.Argument(help="New or empty output directory.")],
    max_shard_size: Annotated[str, typer.Option(help="Largest output shard, e.g. 4GB or 500MiB.")] = "4GB",
    model_dtype: DtypeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write an NPU-ready checkpoint: packed int4 weights, int64 scales, MSD biases."""
    from .api import ConvertOptions, convert as run

    report = run(source, output, options=ConvertOptions(max_shard_bytes=_parse_size(max_shard_size),
                                                         model_dtype=model_dtype))
    summary = report.summary()
    if as_json:
        out.print_json(json.dumps(summary))
        return
    out.print(f"converted {summary['modules_converted']} W4A8 modules, passed {summary['tensors_passed_through']} "
              f"tensors through: {summary['tensors']} tensors in {summary['shards']} shard(s), "
              f"{_human(summary['source_bytes'])} -> {_human(summary['output_bytes'])} "
              f"in {summary['seconds']:.1f} s -> {summary['output']}")
    for note in summary["notes"]:
        out.print(f"note: {note}")


@app.command()
def inspect(path: SrcArg, model_dtype: DtypeOpt = None, as_json: JsonOpt = False) -> None:
    """Describe a source checkpoint (validating it) or a converted directory."""
    from .api import inspect as run

    info = run(path, model_dtype=model_dtype)
    if as_json:
        out.print_json(json.dumps(info))
        return
    table = Table(show_header=False, box=None, pad_edge=False)
    rows = [("path", info["path"]), ("kind", info["kind"])]
    if info["kind"] == "converted":
        source = info["source"]
        rows += [("layout", info["layout"]), ("tool", info["tool_version"]),
                 ("vllm-ascend", info["vllm_ascend"]),
                 ("source", f"version {source['version']}, group_size {source['group_size']}, "
                            f"model dtype {source['model_dtype']}")]
    else:
        rows += [("files", f"{info['files']} ({info['description']}, index {info['index'] or 'none'})"),
                 ("version", info["version"]),
                 ("group_size", f"{info['group_size']}{'' if info['group_size_given'] else ' (absent: default)'}"
                                f"{' per-channel' if info['group_size'] == 0 else ''}"),
                 ("model dtype", str(info["model_dtype"]))]
    rows.append(("variants", ", ".join(f"{v} x{n}" for v, n in info["variants"].items()) or "none"))
    for layer in info["moe_layers"][:4]:
        rows.append(("moe", f"{layer['prefix']}: {layer['experts']} experts, H {layer['hidden']}, "
                            f"I {layer['intermediate']}"))
    if len(info["moe_layers"]) > 4:
        rows.append(("moe", f"... {len(info['moe_layers'])} MoE layers in all"))
    for layer in info["linear_layers"][:4]:
        rows.append(("linear", f"{layer['prefix']}: out {layer['out']}, in {layer['in']}"))
    if len(info["linear_layers"]) > 4:
        rows.append(("linear", f"... {len(info['linear_layers'])} W4A8 Linear layers in all"))
    if info["kind"] == "source":
        kinds = ", ".join(f"{k} x{n}" for k, n in info["passthrough_types"].items())
        rows += [("tensors", f"{info['tensors']}: {info['tensors_converted']} converted, "
                             f"{info['tensors_passed_through']} passed through ({kinds or 'none'})"),
                 ("size", f"{_human(info['source_bytes'])} -> {_human(info['output_bytes'])} "
                          f"(W4A8 part {_human(info['converted_source_bytes'])} -> "
                          f"{_human(info['converted_output_bytes'])})")]
    else:
        rows += [("tensors", f"{info['tensors']} ({info['tensors_converted']} converted) in {info['files']} shard(s)"),
                 ("size", _human(info["output_bytes"]))]
    rows += [("note", note) for note in info["notes"]]
    for key, value in rows:
        table.add_row(key, value)
    out.print(table)


@app.command()
def version() -> None:
    """Print the tool version."""
    out.print(__version__)


def main() -> None:
    try:
        app(standalone_mode=False)
    except W4A8Error as exc:
        err.print(f"error: {exc}", markup=False, soft_wrap=True)
        sys.exit(int(exc.exit_code))
    except (typer.Abort, KeyboardInterrupt):
        err.print("aborted")
        sys.exit(130)
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(int(ExitCode.USAGE))
        raise


if __name__ == "__main__":
    main()
