"""Command line: parse, call `api`, print through `output.sink`. Only `main` turns errors into exit codes."""
from __future__ import annotations

import math
import os
import re
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer

from .version import __version__
from .constants import MAX_OPTION_VALUE, ExitCode
from .errors import W4A8Error
from .output import human_bytes as _human, sink

try:  # newer typer releases ship their own copy of click
    from typer._click import exceptions as _click_exceptions
except ImportError:
    from click import exceptions as _click_exceptions

__all__ = ["app", "main", "parse_size", "SIZE_UNITS"]

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Convert msModelSlim W4A8_DYNAMIC checkpoints into vllm-ascend's NPU-ready layout.")


def _flag(*names: str, help: str) -> typer.models.OptionInfo:
    """A boolean switch; an empty metavar keeps typer from showing it as taking a value."""
    return typer.Option(*names, help=help, metavar="")


SrcArg = Annotated[Path, typer.Argument(help="Source checkpoint directory, msModelSlim or llm-compressor (read only).",
                                                 show_default=False)]
JsonOpt = Annotated[bool, _flag("--json", help="Print one machine-readable JSON object on stdout "
                                               "(on failure too: exit code, error class, message, file, tensor).")]
QuietOpt = Annotated[bool, _flag("-q", "--quiet", help="Print only results, warnings and errors (no phases, "
                                                       "no progress).")]
VerboseOpt = Annotated[bool, _flag("-v", "--verbose", help="Also print detail lines, and a traceback on an "
                                                           "internal error.")]
def _model_dtype(value: Optional[str]) -> Optional[str]:
    from .source.checkpoint import MODEL_DTYPE_ALIASES, MODEL_DTYPES, canonical_model_dtype

    if value is None:
        return None
    name = canonical_model_dtype(value)
    if name is None:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join([*MODEL_DTYPES, *MODEL_DTYPE_ALIASES])}")
    return name


DtypeOpt = Annotated[Optional[str], typer.Option(
    "--model-dtype", callback=_model_dtype, metavar="DTYPE",
    help="Model dtype: bfloat16 (bf16), float16 (fp16, half) or float32 (fp32, float); "
         "default: config.json's torch_dtype.")]
GroupOpt = Annotated[Optional[int], typer.Option(
    "--group-size", min=0, help="Group size of a description that names none (checked against the shapes; "
                                "default: inferred from them).")]
WorkersDefault: int | None = None  # one per two usable CPUs, one per shard at most (resources.default_workers)
_IMPORTED = time.monotonic()

# What an interrupted command leaves behind, by what it does.
INTERRUPT_NOTES = {
    "convert": "finished shards are kept: run the same command with --resume",
    "task": "the task's finished shards are kept: run the same command again",
    "ray": "finished shards are kept: run the same command with --resume",
    "plan": "run the same command with --force",
    "commit": "nothing is lost: run the same command again",
    "dry-run": "nothing was written",
    "read-only": "nothing was changed",
}


@dataclass
class _Running:
    """The command under way, for the error lines `main` prints after it unwound."""

    command: str = "w4a8conv"
    interrupt_note: str = INTERRUPT_NOTES["read-only"]
    as_json: bool = False

    def reset(self, *, as_json: bool) -> None:
        self.command, self.interrupt_note, self.as_json = "w4a8conv", INTERRUPT_NOTES["read-only"], as_json


_running = _Running()


def _begin(command: str, effect: str, *, quiet: bool, verbose: bool, as_json: bool) -> None:
    """Configure the sink for one command and remember what an interrupt would leave behind."""
    _running.command, _running.interrupt_note = f"w4a8conv {command}", INTERRUPT_NOTES[effect]
    _running.as_json = as_json
    if quiet and verbose:
        raise typer.BadParameter("--quiet and --verbose exclude each other", param_hint="-q/-v")
    sink.configure(quiet=quiet, verbose=verbose, as_json=as_json)


def seconds_since_process_start() -> float:
    """Wall time since this process started (interpreter and imports included), from /proc on Linux;
    elsewhere since the CLI module was imported."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _IMPORTED


def _print_version(value: bool) -> None:
    if value:
        sink.result(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the tool version and exit.", metavar="",
                                          callback=_print_version, is_eager=True)] = False,
) -> None:
    """Convert msModelSlim W4A8_DYNAMIC checkpoints into vllm-ascend's NPU-ready layout."""


# --max-shard-size units, case-insensitive: KB/MB/GB/TB are powers of 10 (as huggingface_hub's
# max_shard_size="5GB"), KiB/MiB/GiB/TiB powers of 2, and the bare K/M/G/T powers of 2 as well (as
# `split -b 4G` and `truncate -s 4G` read them).
SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*")


def parse_size(text: str) -> int:
    """Bytes of a size like 4GB (4·10^9), 4GiB or 4G (4·2^30), 500MiB or 1000000."""
    match = _SIZE.fullmatch(text)
    unit = SIZE_UNITS.get(match.group(2).lower()) if match else None
    if unit is None:
        raise typer.BadParameter(f"{text!r} is not a size like 4GB (10^9 bytes), 4GiB or 4G (2^30), "
                                 "500MiB or 1000000")
    value = float(match.group(1)) * unit
    if not math.isfinite(value):  # 400 digits
        raise typer.BadParameter(f"{text!r} is not a finite size")
    if value < 1:
        raise typer.BadParameter("the shard size must be at least 1 byte")
    if value > MAX_OPTION_VALUE:
        raise typer.BadParameter(f"the shard size must be at most {MAX_OPTION_VALUE} bytes, not {text!r}")
    return int(value)


SizeOpt = Annotated[int, typer.Option("--max-shard-size", parser=parse_size, metavar="SIZE", show_default="4GB",
                                      help="Largest output shard: 4GB = 4·10^9 bytes; 4GiB = 4G = 4·2^30 bytes; "
                                           "also KB, MB, TB, MiB, M and plain bytes.")]


def _capped(summary: dict) -> str:
    """How the worker count was chosen: the default rule, or why fewer ran than were asked for (one per
    shard at most, one per usable CPU at most)."""
    if summary["workers_requested"] is None:
        return f" ({summary['workers_choice']}; {summary['usable_cpus']} usable CPU(s))"
    if summary["workers"] == summary["workers_requested"]:
        return ""
    return (f" (of {summary['workers_requested']} requested: {summary['shards']} shard(s), "
            f"{summary['usable_cpus']} usable CPU(s))")


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


ForceOpt = Annotated[bool, _flag("--force", help="Replace a previous w4a8conv output in OUTPUT.")]
OutArg = Annotated[Path, typer.Argument(help="New or empty output directory.", show_default=False)]
ENGINES = ("local", "ray")


@app.command()
def convert(
    source: SrcArg,
    output: OutArg,
    max_shard_size: SizeOpt = "4GB",
    workers: Annotated[int | None, typer.Option(min=1, show_default="one per two usable CPUs",
                                                help="Shards converted in parallel processes.")] = WorkersDefault,
    resume: Annotated[bool, _flag("--resume", help="Finish an interrupted conversion in OUTPUT.")] = False,
    force: ForceOpt = False,
    dry_run: Annotated[bool, _flag("--dry-run", help="Validate and print the plan; write nothing.")] = False,
    model_dtype: DtypeOpt = None,
    group_size: GroupOpt = None,
    task: Annotated[Optional[int], typer.Option(
        "--task", min=0, metavar="I", help="Run task I of the plan in OUTPUT (w4a8conv plan), with the plan's "
                                           "options; a re-run resumes it.")] = None,
    engine: Annotated[str, typer.Option(
        "--engine", metavar="ENGINE", help="local (this host) or ray: the plan's tasks as Ray tasks on a "
                                           "cluster (pip install 'w4a8conv[ray]'), then the commit.")] = "local",
    ray_address: Annotated[Optional[str], typer.Option(
        "--ray-address", metavar="ADDR", help="With --engine ray: the cluster to join (default: ray's own "
                                              "choice, RAY_ADDRESS or a new local one).")] = None,
    tasks: Annotated[Optional[int], typer.Option(
        "--tasks", min=1, metavar="N", help="With --engine ray: tasks to plan (default: one per shard).")] = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Write an NPU-ready checkpoint: packed int4 weights, int64 scales, MSD biases."""
    effect = "dry-run" if dry_run else "task" if task is not None else "ray" if engine == "ray" else "convert"
    _begin("convert", effect, quiet=quiet, verbose=verbose, as_json=as_json)
    if engine not in ENGINES:
        raise typer.BadParameter(f"{engine!r} is not one of {', '.join(ENGINES)}", param_hint="--engine")
    if resume and force:
        raise typer.BadParameter("--resume and --force exclude each other", param_hint="--resume/--force")
    if engine != "ray" and (ray_address is not None or tasks is not None):
        raise typer.BadParameter("--ray-address and --tasks go with --engine ray", param_hint="--engine")
    if task is not None and (engine == "ray" or resume or force or dry_run):
        raise typer.BadParameter("--task runs one task of a plan (resuming it by itself): not with --engine ray, "
                                 "--resume, --force or --dry-run", param_hint="--task")
    if engine == "ray" and dry_run:
        raise typer.BadParameter("--dry-run plans on this host: not with --engine ray", param_hint="--engine")
    sink.phase(f"reading {source}")
    from .api import ConvertOptions

    options = ConvertOptions(max_shard_bytes=max_shard_size, model_dtype=model_dtype, group_size=group_size,
                             workers=workers, resume=resume, force=force, dry_run=dry_run)
    if task is not None:
        _convert_task(source, output, task, options, as_json)
    elif engine == "ray":
        _convert_on_ray(source, output, options, ray_address, tasks, as_json)
    else:
        _convert_here(source, output, options, as_json)


def _convert_here(source: Path, output: Path, options, as_json: bool) -> None:
    from .api import convert as run

    with sink.progress("converting") as progress:
        report = run(source, output, options=options, on_progress=progress, on_phase=sink.phase)
    summary = {**report.summary(), "wall_seconds": round(seconds_since_process_start(), 3)}
    if as_json:
        sink.data(summary)
        return
    if options.dry_run:
        sink.result(f"plan for {output} (dry run, nothing written):")
        sink.rows(_plan_rows(summary["plan"]))
    else:
        sink.result(f"converted {summary['modules_converted']} W4A8 modules, passed "
                    f"{summary['tensors_passed_through']} tensors through: {summary['tensors']} tensors in "
                    f"{summary['shards']} shard(s), {_human(summary['source_bytes'])} -> "
                    f"{_human(summary['output_bytes'])} in {summary['seconds']:.1f} s ({summary['wall_seconds']:.1f} s "
                    f"since start) with {summary['workers']} "
                    f"worker(s){_capped(summary)}, {summary['kernels']} kernels, "
                    f"peak RSS {_human(summary['peak_rss_bytes'])} -> "
                    f"{summary['output']}")
    for note in summary["warnings"]:
        sink.warning(note)


def _convert_task(source: Path, output: Path, index: int, options, as_json: bool) -> None:
    from .scaleout import run_task

    with sink.progress(f"task {index}") as progress:
        report = run_task(source, output, index, options=options, on_progress=progress, on_phase=sink.phase)
    summary = report.summary()
    if as_json:
        sink.data(summary)
    else:
        before = summary["finished_before"]
        kept = f" ({before} finished before, re-hashed and kept)" if before else ""
        sink.result(f"task {index} of 0-{summary['tasks'] - 1} done: {len(summary['shards'])} shard(s), "
                    f"{_human(summary['output_bytes'])}{kept} in {summary['seconds']:.1f} s with "
                    f"{summary['workers']} worker(s), peak RSS {_human(summary['peak_rss_bytes'])} -> "
                    f"{summary['output']} (w4a8conv commit {output} when every task is done)")
    for note in summary["warnings"]:
        sink.warning(note)


def _convert_on_ray(source: Path, output: Path, options, address: Optional[str], tasks: Optional[int],
                    as_json: bool) -> None:
    from .ray_engine import convert_on_ray

    with sink.progress("converting on ray") as progress:
        summary = convert_on_ray(source, output, options=options, address=address, tasks=tasks,
                                 on_progress=progress, on_phase=sink.phase)
    if as_json:
        sink.data(summary)
        return
    sink.result(f"converted on ray: {summary['tasks']} task(s) on {summary['nodes']} node(s), {summary['shards']} "
                f"shard(s), {_human(summary['output_bytes'])} in {summary['seconds']:.1f} s -> {summary['output']}")
    for note in summary["warnings"]:
        sink.warning(note)


@app.command()
def plan(
    source: SrcArg,
    output: OutArg,
    tasks: Annotated[int, typer.Option("--tasks", min=1, metavar="N", show_default=False,
                                       help="Tasks to cut the conversion into (whole shards, balanced by "
                                            "bytes).")],
    max_shard_size: SizeOpt = "4GB",
    model_dtype: DtypeOpt = None,
    group_size: GroupOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Validate the source and write a distributed conversion's plan into OUTPUT; print its N tasks."""
    _begin("plan", "plan", quiet=quiet, verbose=verbose, as_json=as_json)
    sink.phase(f"reading {source}")
    from .api import ConvertOptions
    from .scaleout import plan as run

    options = ConvertOptions(max_shard_bytes=max_shard_size, model_dtype=model_dtype, group_size=group_size,
                             force=force)
    summary = run(source, output, tasks, options=options, on_phase=sink.phase).summary()
    if as_json:
        sink.data(summary)
        return
    sink.result(f"planned {len(summary['tasks'])} task(s), {summary['shards']} shard(s), "
                f"{_human(summary['write_bytes'])} -> {summary['plan_file']}")
    for item in summary["tasks"]:
        shards = item["shards"]
        sink.result(f"task {item['index']}: {len(shards)} shard(s), {_human(item['bytes'])}, "
                    f"~{_human(item['peak_memory_bytes'])} peak memory: {', '.join(shards[:3])}"
                    + (", ..." if len(shards) > 3 else ""))
    sink.result(f"run: w4a8conv convert {source} {output} --task I (I from 0 to {len(summary['tasks']) - 1}, "
                f"with the same options), then: w4a8conv commit {output}")
    for note in summary["warnings"]:
        sink.warning(note)


@app.command()
def commit(
    output: Annotated[Path, typer.Argument(help="The output directory of a plan whose tasks ran.",
                                           show_default=False)],
    source: Annotated[Optional[Path], typer.Option(
        help="The source, where this host sees it elsewhere than the plan recorded.")] = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Check every planned shard against its task's journal, then write the index and the stamped
    description; exit 6 naming the tasks not finished."""
    _begin("commit", "commit", quiet=quiet, verbose=verbose, as_json=as_json)
    from .scaleout import commit as run

    summary = run(output, source=source, on_phase=sink.phase).summary()
    if as_json:
        sink.data(summary)
        return
    sink.result(f"committed {summary['tasks']} task(s): {summary['shards']} shard(s), "
                f"{_human(summary['output_bytes'])} -> {summary['output']}")


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(
        help="An msModelSlim source directory (validated) or a directory w4a8conv converted.", show_default=False)],
    plan: Annotated[bool, _flag("--plan", help="Also print the conversion plan of a source.")] = False,
    max_shard_size: SizeOpt = "4GB",
    workers: Annotated[int | None, typer.Option(min=1, show_default="one per two usable CPUs",
                                                help="Workers the plan assumes.")] = WorkersDefault,
    model_dtype: DtypeOpt = None,
    group_size: GroupOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Describe a source checkpoint (validating it) or a converted directory."""
    _begin("inspect", "read-only", quiet=quiet, verbose=verbose, as_json=as_json)
    from .api import inspect as run

    info = run(path, model_dtype=model_dtype, group_size=group_size,
               plan_for=(max_shard_size, workers) if plan else None)
    if as_json:
        sink.data(info)
        return
    rows = [("path", info["path"]), ("kind", info["kind"])]
    if info["kind"] == "converted":
        source = info["source"]
        rows += [("layout", info["layout"]), ("tool", info["tool_version"]),
                 ("serving", "vllm-ascend " + ", ".join(info["serving_releases"])),
                 ("source", f"version {source['version']}, group_size {source['group_size']}, "
                            f"model dtype {source['model_dtype']}")]
    else:
        rows += [("files", f"{info['files']} ({info['description']}, index {info['index'] or 'none'})"),
                 ("version", info["version"]),
                 ("group_size", f"{info['group_size']}{'' if info['group_size_given'] else ' (from ' + info['group_size_from'] + ')'}"
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
    sink.rows(rows)


@app.command()
def verify(
    path: Annotated[Path, typer.Argument(help="Converted directory.", show_default=False)],
    source: Annotated[Optional[Path], typer.Option(help="Also compare decoded tensors with this source.")] = None,
    sample: Annotated[int, typer.Option(min=1, help="Experts per MoE layer compared with --source "
                                                    "(and MoE layers run with --numerics).")] = 2,
    all_tensors: Annotated[bool, _flag("--all", help="Compare every expert and tensor.")] = False,
    numerics: Annotated[bool, _flag(
        "--numerics", help="Also run sampled MoE layers through the reference backend and W4A8 Linear layers "
                           "through an A16W4 emulation, each compared with an fp32 forward of --source (relative "
                           "error per layer, against its bound); exit 5 when there is nothing to run.")] = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Check shards, hashes, index and stamp (and, with --source, the values); exit 5 on any problem."""
    _begin("verify", "read-only", quiet=quiet, verbose=verbose, as_json=as_json)
    from .verify import verify as run

    if numerics and source is None:
        raise typer.BadParameter("--numerics needs --source (the checkpoint it was converted from)",
                                 param_hint="--numerics")
    sink.phase(f"opening {path}")
    report = run(path, source=source, sample=None if all_tensors else sample, numerics=numerics,
                 on_phase=sink.phase)
    summary = report.summary()
    if as_json:
        sink.data(summary)
    else:
        worst = ", ".join(f"{k} {v:.3g}" for k, v in summary["worst_relative_error"].items())
        sink.result(f"{'ok' if report.ok else 'FAILED'}: {summary['shards_checked']} shard(s), "
                    f"{_human(summary['bytes_hashed'])} hashed, {summary['tensors_compared']} tensors compared"
                    + (f"; worst relative error: {worst}" if worst else ""))
        for layer in report.numerics:
            sink.result(f"numerics {layer.prefix}: relative error {layer.error:.2%}, bound {layer.bound:.2%} "
                        f"({'ok' if layer.ok else 'FAILED'}; {layer.inputs})")
    for problem in report.problems:
        sink.problem(problem)
    if not report.ok:
        raise typer.Exit(int(ExitCode.VERIFY_FAILED))


@app.command()
def selfcheck(
    require_npu: Annotated[bool, _flag("--require-npu", help="Fail (exit 5) when a device check is skipped "
                                                             "(no torch_npu or no NPU): for a CI gate.")] = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Compare torch_npu's int4 packing and A8W4 kernels with the CPU code (skipped without torch_npu);
    exit 5 when a check fails (or, with --require-npu, is skipped)."""
    _begin("selfcheck", "read-only", quiet=quiet, verbose=verbose, as_json=as_json)
    from .selfcheck import run_selfcheck

    report = run_selfcheck(require_device=require_npu)
    if as_json:
        sink.data(report.summary())
    else:
        for item in report.items:
            sink.result(f"{item.status:7} {item.name}: {item.checks}")
            sink.result(f"        {item.detail}")
        sink.result(("ok" if report.ok else "FAILED") + (f" ({report.skipped} skipped)" if report.skipped else ""))
    if require_npu and report.skipped:
        sink.problem(f"{report.skipped} device check(s) skipped and --require-npu was given")
    if not report.ok:
        raise typer.Exit(int(ExitCode.VERIFY_FAILED))


@app.command()
def version() -> None:
    """Print the tool version (as --version does)."""
    sink.result(__version__)


class Interrupted(Exception):
    """SIGINT, SIGTERM or SIGHUP as an exception, so partial files are removed on the way out (click
    would turn a KeyboardInterrupt into its own abort)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # SIGHUP: the terminal or ssh session closed


def _raise_interrupted(signum: int, _frame: object) -> None:
    raise Interrupted(signum)


def _usage_error_line(exc: _click_exceptions.UsageError) -> str:
    """click's usage error as one line: the command, the message, where help is."""
    command = exc.ctx.command_path if exc.ctx else _running.command
    return f"{command}: {exc.format_message()} (see {command} -h)"


def _failure(code: int, error: str, message: str, exc: BaseException | None = None) -> int:
    """Report a failure: one `error:` line on stderr and, under --json, one JSON object on stdout."""
    sink.error(message)
    if _running.as_json:
        file = getattr(exc, "file", None)
        record = {"ok": False, "exit_code": code, "error": error, "message": message,
                  "file": str(file) if file is not None else None, "tensor": getattr(exc, "tensor", None)}
        if hasattr(exc, "tasks"):  # a commit's unfinished tasks, by index
            record["tasks"] = exc.tasks
        sink.data(record)
    return code


def _without_value_display(group: typer.core.TyperGroup) -> typer.core.TyperGroup:
    """Typer gives its own switches (-h/--help, --install-completion, --show-completion) no metavar, so
    rich help shows them as taking a `<bool>` value; give them the empty one our own switches carry."""
    context = group.make_context("w4a8conv", [], resilient_parsing=True)
    for command in [group, *group.commands.values()]:
        switches = [param for param in command.params if getattr(param, "is_flag", False)]
        help_option = command.get_help_option(context)
        for switch in [*switches, *([help_option] if help_option is not None else [])]:
            if switch.metavar is None:
                switch.metavar = ""
    return group


def main(argv: list[str] | None = None) -> None:
    """Console entry point: usage errors exit 2 and w4a8conv errors their own code, each as one
    `error:` line on stderr (and one JSON object on stdout under --json); an unexpected exception
    exits 1 (its traceback with --verbose)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, _raise_interrupted)
    args = sys.argv[1:] if argv is None else list(argv)
    sink.configure()
    _running.reset(as_json="--json" in args)  # also for a usage error found before the command starts
    command = _without_value_display(typer.main.get_command(app))
    try:
        code = command.main(args=args, prog_name="w4a8conv", standalone_mode=False)
    except _click_exceptions.NoArgsIsHelpError as exc:
        sink.result(exc.format_message())  # typer's rich help may already be printed (then this is empty)
        code = int(ExitCode.USAGE)
    except _click_exceptions.UsageError as exc:
        code = _failure(int(ExitCode.USAGE), "UsageError", _usage_error_line(exc))
    except W4A8Error as exc:
        code = _failure(int(exc.exit_code), type(exc).__name__, str(exc), exc)
    except Interrupted as exc:
        code = _failure(128 + exc.signum, "Interrupted", f"interrupted by {exc}; {_running.interrupt_note}")
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, exit 1
        if sink.verbosity >= sink.verbosity.VERBOSE:
            traceback.print_exc()
        code = _failure(int(ExitCode.INTERNAL), "InternalError",
                        f"internal error: {type(exc).__name__}: {exc} (a bug: please report it; "
                        f"-v shows the traceback)")
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
