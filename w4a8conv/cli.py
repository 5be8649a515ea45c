"""Command line: parse, call `api`, print. Only `main` turns errors into exit codes."""
from __future__ import annotations

import json
import os
import signal
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


def _human(n: float) -> str:
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1000
        if n < 1000:
            return f"{n:.2f} {unit}"
    return f"{n / 1000:.2f} TB"


class _Progress:
    """Output bytes written: a rich bar on a terminal, a plain line per 10 % otherwise (stderr)."""

    def __init__(self, enabled: bool):
        self.done, self.enabled, self.next_line = 0, enabled, 10
        self.bar = self.task = None
        if enabled and err.is_terminal:
            from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

            self.bar = Progress("converting", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                                TimeRemainingColumn(), console=err, transient=True)

    def __enter__(self) -> "_Progress":
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
                self.task = self.bar.add_task("convert", total=total)
            self.bar.update(self.task, completed=self.done)
        elif self.enabled and total and self.done * 100 >= self.next_line * total:
            err.print(f"progress: {self.done * 100 // total}% ({_human(self.done)} of {_human(total)})")
            self.next_line = self.done * 100 // total // 10 * 10 + 10


def _plan_rows(plan: dict) -> list[tuple[str, str]]:
    free = plan["disk_free_bytes"]
    return [
        ("shards", f"{len(plan['shards'])}: " + ", ".join(f"{s['file']} ({_human(s['bytes'])}, {s['tensors']} tensors)"
                                                    for s in plan["shards"][:3])
         + (", ..." if len(plan["shards"]) > 3 else "")),
        ("read", _human(plan["read_bytes"])),
        ("write", _human(plan["write_bytes"]) + (f" (disk free: {_human(free)})" if free is not None else "")),
        ("memory", f"~{_human(plan['peak_worker_bytes'])} per worker x {plan['workers']} = "
                   f"~{_human(plan['peak_total_bytes'])} peak (estimate)"),
    ]


def _print_rows(rows: list[tuple[str, str]]) -> None:
    table = Table(show_header=False, box=None, pad_edge=False)
    for key, value in rows:
        table.add_row(key, value)
    out.print(table)


@app.command()
def convert(
    source: SrcArg,
    output: Annotated[Path, typer.Argument(help="New or empty output directory.")],
    max_shard_size: Annotated[str, typer.Option(help="Largest output shard, e.g. 4GB or 500MiB.")] = "4GB",
    workers: Annotated[int, typer.Option(min=1, help="Shards converted in parallel processes "
                                                     "(default: CPU cores).")] = os.cpu_count() or 1,
    resume: Annotated[bool, typer.Option("--resume", help="Finish an interrupted conversion in OUTPUT.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace a previous w4a8conv output in OUTPUT.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and print the plan; write nothing.")] = False,
    model_dtype: DtypeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write an NPU-ready checkpoint: packed int4 weights, int64 scales, MSD biases."""
    from .api import ConvertOptions, convert as run

    if resume and force:
        raise typer.BadParameter("--resume and --force exclude each other")
    options = ConvertOptions(max_shard_bytes=_parse_size(max_shard_size), model_dtype=model_dtype, workers=workers,
                             resume=resume, force=force, dry_run=dry_run)
    with _Progress(enabled=not as_json) as progress:
        report = run(source, output, options=options, on_progress=progress)
    summary = report.summary()
    if as_json:
        out.print_json(json.dumps(summary))
        return
    if dry_run:
        out.print(f"plan for {output} (dry run, nothing written):")
        _print_rows(_plan_rows(summary["plan"]))
    else:
        out.print(f"converted {summary['modules_converted']} W4A8 modules, passed {summary['tensors_passed_through']} "
                  f"tensors through: {summary['tensors']} tensors in {summary['shards']} shard(s), "
                  f"{_human(summary['source_bytes'])} -> {_human(summary['output_bytes'])} in "
                  f"{summary['seconds']:.1f} s with {summary['workers']} worker(s), "
                  f"peak RSS {_human(summary['peak_rss_bytes'])} -> {summary['output']}")
    for note in summary["warnings"]:
        err.print(f"warning: {note}", markup=False)


@app.command()
def inspect(
    path: SrcArg,
    plan: Annotated[bool, typer.Option("--plan", help="Also print the conversion plan of a source.")] = False,
    max_shard_size: Annotated[str, typer.Option(help="Shard size the plan assumes.")] = "4GB",
    workers: Annotated[int, typer.Option(min=1, help="Workers the plan assumes.")] = os.cpu_count() or 1,
    model_dtype: DtypeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Describe a source checkpoint (validating it) or a converted directory."""
    from .api import inspect as run

    info = run(path, model_dtype=model_dtype, plan_for=(_parse_size(max_shard_size), workers) if plan else None)
    if as_json:
        out.print_json(json.dumps(info))
        return
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
    rows += [("warning", note) for note in info["warnings"]]
    if info.get("plan"):
        rows += _plan_rows(info["plan"])
    _print_rows(rows)


@app.command()
def verify(
    path: Annotated[Path, typer.Argument(help="Converted directory.")],
    source: Annotated[Optional[Path], typer.Option(help="Also compare decoded tensors with this source.")] = None,
    sample: Annotated[int, typer.Option(min=1, help="Experts per MoE layer compared with --source "
                                                    "(and MoE layers run with --numerics).")] = 2,
    all_tensors: Annotated[bool, typer.Option("--all", help="Compare every expert and tensor.")] = False,
    numerics: Annotated[bool, typer.Option(
        "--numerics", help="Also run sampled MoE layers through the reference backend and compare with an "
                           "fp32 forward of --source (relative error per layer, against its bound).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Check shards, hashes, index and stamp (and, with --source, the values); exit 5 on any problem."""
    from .verify import verify as run

    if numerics and source is None:
        raise typer.BadParameter("--numerics needs --source (the checkpoint it was converted from)",
                                 param_hint="--numerics")
    report = run(path, source=source, sample=None if all_tensors else sample, numerics=numerics)
    summary = report.summary()
    if as_json:
        out.print_json(json.dumps(summary))
    else:
        worst = ", ".join(f"{k} {v:.3g}" for k, v in summary["worst_relative_error"].items())
        out.print(f"{'ok' if report.ok else 'FAILED'}: {summary['shards_checked']} shard(s), "
                  f"{_human(summary['bytes_hashed'])} hashed, {summary['tensors_compared']} tensors compared"
                  + (f"; worst relative error: {worst}" if worst else ""))
        for layer in report.numerics:
            out.print(f"numerics {layer.prefix}: relative error {layer.error:.2%}, bound {layer.bound:.2%} "
                      f"({'ok' if layer.ok else 'FAILED'}; experts [{layer.expert_start}, "
                      f"{layer.expert_start + layer.experts}), {layer.tokens} tokens, top-{layer.top_k})")
    for problem in report.problems:
        err.print(f"problem: {problem}", markup=False, soft_wrap=True)
    if not report.ok:
        raise typer.Exit(int(ExitCode.VERIFY_FAILED))


@app.command()
def selfcheck(as_json: JsonOpt = False) -> None:
    """Compare torch_npu's int4 packing and A8W4 kernels with the CPU code (skipped without torch_npu);
    exit 5 when a check fails."""
    from .selfcheck import run_selfcheck

    report = run_selfcheck()
    if as_json:
        out.print_json(json.dumps(report.summary()))
    else:
        for item in report.items:
            out.print(f"{item.status:7} {item.name}: {item.checks}", markup=False, soft_wrap=True)
            out.print(f"        {item.detail}", markup=False, soft_wrap=True)
        skipped = sum(item.status == "skipped" for item in report.items)
        out.print(("ok" if report.ok else "FAILED") + (f" ({skipped} skipped)" if skipped else ""))
    if not report.ok:
        raise typer.Exit(int(ExitCode.VERIFY_FAILED))


@app.command()
def version() -> None:
    """Print the tool version."""
    out.print(__version__)


class Interrupted(Exception):
    """SIGINT or SIGTERM as an exception, so partial files are removed on the way out (click would
    turn a KeyboardInterrupt into its own abort)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum: int, _frame: object) -> None:
    raise Interrupted(signum)


def main() -> None:
    """Console entry point: click handles usage errors (exit 2); w4a8conv errors print one line."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _raise_interrupted)
    try:
        app()
    except W4A8Error as exc:
        err.print(f"error: {exc}", markup=False, soft_wrap=True)
        sys.exit(int(exc.exit_code))
    except Interrupted as exc:
        err.print(f"error: interrupted by {exc}; finished shards are kept: run the same command with --resume")
        sys.exit(128 + exc.signum)


if __name__ == "__main__":
    main()
