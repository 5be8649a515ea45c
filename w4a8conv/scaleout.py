"""One conversion as many tasks on many machines sharing a file system, byte-identical to one host:

- `plan`: validates the source once (as `convert` does before writing), cuts the output's shards into
  tasks (`tasks.cut_tasks`) and writes the plan into the output directory; nothing else is written.
- `run_task`: writes one task's shards exactly as a single-host run writes them, journaled in the
  task's own journal; a re-run resumes it (a finished task re-hashes its shards and writes nothing).
- `commit`: every planned shard re-hashed against its task's journal, then `OutputRoute.commit`, the
  same step a single-host run ends with: copied files, index, stamped description last; the plan and
  the task journals removed after it.

docs/scale-out.md describes the model; `ray_engine.py` runs the tasks on a Ray cluster.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .api import ConvertOptions, _check_options, _warnings, build_stamp
from .errors import IncompleteOutputError
from .journal import PLAN_NAME, Journal, WrittenShard, task_journal_name
from .output import human_bytes
from .plan import Plan, make_plan
from .produce import check_small_tensors
from .resources import estimate_resources, peak_rss_bytes
from .route import OutputRoute
from .source import TensorReader, open_source
from .tasks import PLAN_OPTIONS, TaskPlan, cut_tasks, hold_task
from .version import __version__

__all__ = ["PlanReport", "TaskReport", "CommitReport", "plan", "run_task", "commit", "plan_options"]


@dataclass
class PlanReport:
    output: Path
    plan: TaskPlan
    shards: int
    write_bytes: int
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {"output": str(self.output), "plan_file": str(self.output / PLAN_NAME), "source": self.plan.source,
                "shards": self.shards, "write_bytes": self.write_bytes, "options": self.plan.options,
                "tasks": [t.to_json() for t in self.plan.tasks], "warnings": self.warnings}


@dataclass
class TaskReport:
    output: Path
    task: int
    tasks: int
    shards: list[WrittenShard]
    finished_before: int  # shards a previous run of this task had written (re-hashed and kept)
    workers: int
    seconds: float
    peak_rss_bytes: int
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {"output": str(self.output), "task": self.task, "tasks": self.tasks,
                "shards": [{"file": s.file_name, "bytes": s.nbytes, "sha256": s.sha256} for s in self.shards],
                "output_bytes": sum(s.nbytes for s in self.shards), "finished_before": self.finished_before,
                "workers": self.workers, "seconds": round(self.seconds, 3), "peak_rss_bytes": self.peak_rss_bytes,
                "warnings": self.warnings}


@dataclass
class CommitReport:
    output: Path
    tasks: int
    shards: int
    output_bytes: int
    seconds: float

    def summary(self) -> dict:
        return {"output": str(self.output), "tasks": self.tasks, "shards": self.shards,
                "output_bytes": self.output_bytes, "seconds": round(self.seconds, 3)}


def plan_options(options: ConvertOptions) -> dict:
    """The options that decide the output bytes, as the plan records them and every task must repeat them."""
    return {name: getattr(options, name) for name in PLAN_OPTIONS}


def _route(source: Path, output: Path, options: ConvertOptions) -> tuple[Plan, OutputRoute]:
    src = open_source(source, model_dtype=options.model_dtype, group_size=options.group_size)
    plan = make_plan(src)
    return plan, OutputRoute.of(plan, output, options.max_shard_bytes)


def plan(source: Path | str, output: Path | str, tasks: int | None, *, options: ConvertOptions | None = None,
         on_phase: Callable[[str], None] | None = None) -> PlanReport:
    """Validate the source and write the plan of `tasks` tasks (None: one per shard) into `output`
    (created; `options.force` replaces a previous w4a8conv output, a previous plan included)."""
    options = options or ConvertOptions()
    _check_options(options)
    phase = on_phase or (lambda _text: None)
    conversion, route = _route(Path(source), Path(output), options)
    phase(f"validating {len(conversion.source.tensors):,} tensors in {len(conversion.source.headers):,} file(s)")
    cut = cut_tasks(conversion, route.shards, len(route.shards) if tasks is None else tasks)
    route.check(resume=False, force=options.force)
    warnings = _warnings(conversion)
    with TensorReader() as reader:
        check_small_tensors(conversion, reader)
    with route.claim(resume=False, force=options.force, warnings=warnings):
        task_plan = TaskPlan(__version__, str(Path(source).absolute()), *route.journal_keys(),
                             plan_options(options), cut)
        task_plan.save(route.output)
    return PlanReport(route.output, task_plan, len(route.shards), route.write_bytes, warnings)


def run_task(source: Path | str, output: Path | str, index: int, *, options: ConvertOptions | None = None,
             on_progress: Callable[[int, int], None] | None = None,
             on_phase: Callable[[str], None] | None = None) -> TaskReport:
    """Write task `index` of the plan in `output`: its shards, each journaled in the task's journal.

    Refused when the plan was made by another w4a8conv, for a source that changed since, or with other
    options, and when another process runs the same task. Resumes a previous run of the task."""
    options = options or ConvertOptions()
    _check_options(options)
    started, phase, progress = time.monotonic(), on_phase or (lambda _text: None), on_progress or (lambda *_: None)
    conversion, route = _route(Path(source), Path(output), options)
    warnings = _warnings(conversion)
    with hold_task(route.output, index) as task_plan:
        task_plan.check_agrees(route.output, __version__, route.journal_keys(), plan_options(options))
        names = set(task_plan.tasks[index].shards)
        shards = [s for s in route.shards if s.file_name in names]
        workers = estimate_resources(conversion, shards, options.workers).workers
        total = sum(s.data_bytes for s in shards)
        with route.prepare_part(shards, task_journal_name(index), warnings) as prepared:
            before = len(prepared.journal.done)
            phase(f"task {index} of 0-{len(task_plan.tasks) - 1}: writing {len(shards):,} shard(s), "
                  f"{human_bytes(total)}, with {workers} worker(s)"
                  + (f" ({before:,} finished before: re-hashed and kept)" if before else ""))
            written = prepared.write(workers, lambda n: progress(n, total))
    return TaskReport(route.output, index, len(task_plan.tasks), written, before, workers,
                      time.monotonic() - started, peak_rss_bytes(), warnings)


def _task_state(output: Path, index: int, names: tuple[str, ...], keys: tuple[str, str, str],
                written: dict[str, WrittenShard]) -> str | None:
    """What keeps task `index` from being committed (None: nothing); its valid shards go into `written`."""
    journal_name = task_journal_name(index)
    if not (output / journal_name).is_file():
        return f"task {index}: not started (no {journal_name})"
    journal = Journal.resume(output, *keys, name=journal_name)
    missing, altered = [], []
    for name in names:
        if (shard := journal.still_valid(output, name)) is not None:
            written[name] = shard
        elif name in journal.done and (output / name).is_file():
            altered.append(name)
        else:
            missing.append(name)
    notes = ([f"{', '.join(altered)} altered since the task wrote it (size or sha256 differs from its journal)"]
             if altered else []) + ([f"{', '.join(missing)} missing"] if missing else [])
    return f"task {index}: {'; '.join(notes)}" if notes else None


def commit(output: Path | str, *, source: Path | str | None = None,
           on_phase: Callable[[str], None] | None = None) -> CommitReport:
    """Finish a distributed run: every planned shard present with its journaled size and sha256, then the
    copied files, the index and the stamped description (exactly a single-host run's), and the plan and
    task journals removed. `source` stands for the plan's source path where this host mounts it elsewhere.

    Raises `IncompleteOutputError` naming every task not finished or whose shards were altered."""
    started, phase, output = time.monotonic(), on_phase or (lambda _text: None), Path(output)
    recorded = TaskPlan.load(output)
    options = ConvertOptions(**recorded.options)
    conversion, route = _route(Path(source or recorded.source), output, options)
    with route.locked(_warnings(conversion)):
        task_plan = TaskPlan.load(output)  # again, under the lock
        keys = route.journal_keys()
        task_plan.check_agrees(output, __version__, keys, plan_options(options))
        phase(f"checking {len(route.shards):,} shard(s) of {len(task_plan.tasks):,} task(s)")
        written: dict[str, WrittenShard] = {}
        problems = {t.index: state for t in task_plan.tasks
                    if (state := _task_state(output, t.index, t.shards, keys, written)) is not None}
        if problems:
            raise IncompleteOutputError(
                f"{output}: not committed: {len(problems)} of {len(task_plan.tasks)} task(s) not finished: "
                f"{'; '.join(problems.values())}; run each again (w4a8conv convert SRC OUT --task I: a re-run "
                f"writes what is missing or altered), then commit again; tasks to run: "
                f"{', '.join(map(str, problems))}", tasks=list(problems))
        shards = [written[s.file_name] for s in route.shards]
        phase("writing the copied files, the index and the description")
        route.commit(build_stamp(conversion, shards, keys[0]),
                     [output / PLAN_NAME, *(output / task_journal_name(t.index) for t in task_plan.tasks)])
    return CommitReport(output, len(task_plan.tasks), len(shards), sum(s.nbytes for s in shards),
                        time.monotonic() - started)
