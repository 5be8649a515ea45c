"""`convert --engine ray`: a distributed run on a Ray cluster whose nodes all see SRC and OUT at the same
paths (a shared file system). The plan is made here (or, with `--resume`, the one in OUT is kept), each
of its tasks runs as one Ray task (`num_cpus=1`, `memory=` the plan's estimate for it) that Ray runs
again on another worker when its worker is lost (the task resumes its own journal), and the commit
runs here once every task returned. `ray` is imported only by this module, and only when it runs.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from .api import ConvertOptions
from .errors import UsageError, W4A8Error, WriteError
from .scaleout import commit, plan, run_task
from .tasks import TaskPlan

__all__ = ["convert_on_ray", "RAY_RETRIES"]

RAY_RETRIES = 3  # Ray runs a task again this many times when its worker process or node dies


def _task(source: str, output: str, index: int, options: ConvertOptions) -> str:
    """One task of the plan on a Ray worker; the id of the node it ran on."""
    import ray

    run_task(source, output, index, options=options)
    return ray.get_runtime_context().get_node_id()


def convert_on_ray(source: Path | str, output: Path | str, *, options: ConvertOptions, address: str | None = None,
                   tasks: int | None = None, on_progress: Callable[[int, int], None] | None = None,
                   on_phase: Callable[[str], None] | None = None) -> dict:
    """Plan (`tasks` tasks, default one per shard), run every task on the cluster, commit; the summary.

    Joins the cluster at `address` unless this process is connected to Ray already (a driver script
    that called `ray.init` itself), and leaves it again only if it joined."""
    try:
        import ray
    except ImportError:
        raise UsageError("--engine ray needs the ray package on this host and on every node "
                         "(pip install 'w4a8conv[ray]')") from None
    started, phase, progress = time.monotonic(), on_phase or (lambda _text: None), on_progress or (lambda *_: None)
    source, output = Path(source).absolute(), Path(output).absolute()
    warnings: list[str] = []
    if options.resume:
        task_plan = TaskPlan.load(output)
    else:
        planned = plan(source, output, tasks, options=options, on_phase=phase)
        task_plan, warnings = planned.plan, planned.warnings
    joined = not ray.is_initialized()
    if joined:
        phase(f"joining the Ray cluster at {address or 'the default address'}")
        ray.init(address=address)
    try:
        remote = ray.remote(num_cpus=1, max_retries=RAY_RETRIES, retry_exceptions=False)(_task)
        worker_options = replace(options, workers=1, resume=False, force=False, dry_run=False)
        total = sum(t.bytes for t in task_plan.tasks)
        refs = {remote.options(memory=t.peak_memory_bytes, name=f"w4a8conv-task-{t.index}")
                .remote(str(source), str(output), t.index, worker_options): t for t in task_plan.tasks}
        phase(f"running {len(refs):,} task(s) of {sum(len(t.shards) for t in task_plan.tasks):,} shard(s) on Ray, "
              "one CPU each")
        pending, nodes = list(refs), set()
        try:
            while pending:
                finished, pending = ray.wait(pending, num_returns=1)
                for ref in finished:
                    nodes.add(_result(ray, ref, refs[ref].index, output))
                    progress(refs[ref].bytes, total)
        except BaseException:
            for ref in pending:  # a failed or interrupted run stops its other tasks (their journals stay)
                ray.cancel(ref, force=True)
            raise
    finally:
        if joined:
            ray.shutdown()
    report = commit(output, on_phase=phase)
    return {"output": str(output), "engine": "ray", "tasks": report.tasks, "nodes": len(nodes),
            "shards": report.shards, "output_bytes": report.output_bytes,
            "seconds": round(time.monotonic() - started, 3), "warnings": warnings}


def _result(ray, ref, index: int, output: Path) -> str:
    """A finished task's node; its error as the w4a8conv error it was (its exit code kept)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, W4A8Error):
            raise exc.cause from None
        raise
    except ray.exceptions.RayError as exc:  # the worker or its node lost more often than Ray retries
        raise WriteError(f"{output}: task {index} was lost on Ray, {RAY_RETRIES + 1} attempt(s) ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); finished shards are kept: run "
                         "again with --resume") from None
