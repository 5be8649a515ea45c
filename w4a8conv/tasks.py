"""A distributed run's plan: the output's shards cut into tasks, kept in the output directory as
`.w4a8conv-plan.json` with what the tasks must agree on (tool version, source fingerprint and files,
plan fingerprint, options), and the lock a task holds while it runs.

A task is a set of whole shards; each shard is written by exactly one task, byte for byte as a
single-host run writes it, so the union of the tasks is the single-host output (`scaleout.py`).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import OutputLocationError, UsageError
from .files import write_json_atomic
from .journal import PLAN_NAME
from .plan import Plan
from .resources import estimate_resources
from .writer import ShardPlan

__all__ = ["Task", "TaskPlan", "cut_tasks", "hold_task", "PLAN_FORMAT", "PLAN_OPTIONS"]

PLAN_FORMAT = 1
PLAN_OPTIONS = ("max_shard_bytes", "model_dtype", "group_size")  # the options that decide the output bytes
_READ_BLOCK = 2**20


@dataclass(frozen=True)
class Task:
    index: int
    shards: tuple[str, ...]  # file names, in plan order
    bytes: int
    peak_memory_bytes: int  # one worker converting this task's shards (resources.estimate_resources)

    def to_json(self) -> dict:
        return {"index": self.index, "shards": list(self.shards), "bytes": self.bytes,
                "peak_memory_bytes": self.peak_memory_bytes}


def cut_tasks(plan: Plan, shards: list[ShardPlan], count: int) -> tuple[Task, ...]:
    """`count` tasks of whole shards balanced by bytes: largest shard first, each to the task holding
    the fewest bytes so far (the lowest index on a tie). Depends on the shard list alone."""
    if not 1 <= count <= len(shards):
        raise UsageError(f"--tasks {count}: the output has {len(shards)} shard(s), so from 1 to {len(shards)} "
                         "tasks (a smaller --max-shard-size makes more shards)")
    groups: list[list[ShardPlan]] = [[] for _ in range(count)]
    sizes = [0] * count
    position = {s.file_name: i for i, s in enumerate(shards)}
    for shard in sorted(shards, key=lambda s: (-s.data_bytes, position[s.file_name])):
        task = min(range(count), key=lambda i: (sizes[i], i))
        groups[task].append(shard)
        sizes[task] += shard.data_bytes
    tasks = []
    for index, group in enumerate(groups):
        group.sort(key=lambda s: position[s.file_name])
        tasks.append(Task(index, tuple(s.file_name for s in group), sizes[index],
                          estimate_resources(plan, group, 1).peak_worker_bytes))
    return tuple(tasks)


@dataclass(frozen=True)
class TaskPlan:
    """What `w4a8conv plan` writes and every task and the commit check themselves against."""

    tool_version: str
    source: str  # the source directory as the plan was given it (absolute)
    source_fingerprint: str
    source_files: str  # journal.source_files_identity of the weight files
    plan_fingerprint: str
    options: dict  # max_shard_bytes, model_dtype, group_size: what decides the output bytes
    tasks: tuple[Task, ...]

    def to_json(self) -> dict:
        return {"format": PLAN_FORMAT, "tool_version": self.tool_version, "source": self.source,
                "source_fingerprint": self.source_fingerprint, "source_files": self.source_files,
                "plan_fingerprint": self.plan_fingerprint, "options": self.options,
                "tasks": [t.to_json() for t in self.tasks]}

    def save(self, output: Path) -> None:
        write_json_atomic(output / PLAN_NAME, self.to_json())

    @classmethod
    def parse(cls, text: str, path: Path) -> "TaskPlan":
        try:
            raw = json.loads(text)
            if raw["format"] != PLAN_FORMAT:
                raise ValueError(f"format {raw['format']!r}, this w4a8conv reads {PLAN_FORMAT}")
            tasks = tuple(Task(int(t["index"]), tuple(str(n) for n in t["shards"]), int(t["bytes"]),
                               int(t["peak_memory_bytes"])) for t in raw["tasks"])
            if [t.index for t in tasks] != list(range(len(tasks))):
                raise ValueError("task indices are not 0 to N-1 in order")
            if sorted(raw["options"]) != sorted(PLAN_OPTIONS):
                raise ValueError(f"options {sorted(raw['options'])}, not {list(PLAN_OPTIONS)}")
            return cls(str(raw["tool_version"]), str(raw["source"]), str(raw["source_fingerprint"]),
                       str(raw["source_files"]), str(raw["plan_fingerprint"]), dict(raw["options"]), tasks)
        except (ValueError, KeyError, TypeError) as exc:
            raise OutputLocationError(f"{path}: unreadable plan ({exc}); make it again with w4a8conv plan "
                                      "--force") from None

    @classmethod
    def load(cls, output: Path) -> "TaskPlan":
        path = output / PLAN_NAME
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise OutputLocationError(f"{output}: no plan ({PLAN_NAME}): run w4a8conv plan first (a committed "
                                      "output has none left)") from None
        except OSError as exc:
            raise OutputLocationError(f"{path}: cannot read: {exc.strerror or exc}") from None
        return cls.parse(text, path)

    def check_agrees(self, output: Path, tool_version: str, keys: tuple[str, str, str],
                     options: Mapping[str, object]) -> None:
        """Refuse a task or commit that would not write what the plan planned: another w4a8conv, a source
        changed since the plan, other options."""
        if tool_version != self.tool_version:
            raise OutputLocationError(f"{output}: planned by w4a8conv {self.tool_version}, this is {tool_version}; "
                                      "every task and the commit must run the version that made the plan")
        fingerprint, files, plan_fingerprint = keys
        if fingerprint != self.source_fingerprint:
            raise OutputLocationError(f"{output}: the source changed since the plan (fingerprint mismatch); make the "
                                      "plan again with w4a8conv plan --force")
        if files != self.source_files:
            raise OutputLocationError(f"{output}: the source changed since the plan (its weight files were modified "
                                      "or replaced); make the plan again with w4a8conv plan --force")
        differing = [f"{name} {options.get(name)!r} (the plan's: {value!r})" for name, value in self.options.items()
                     if options.get(name) != value]
        if differing or plan_fingerprint != self.plan_fingerprint:
            raise OutputLocationError(f"{output}: other options than the plan's: "
                                      f"{', '.join(differing) or 'another shard cut'}; run with the plan's options")


@contextlib.contextmanager
def hold_task(output: Path, index: int) -> Iterator[TaskPlan]:
    """The plan, read under an fcntl lock on byte `index` of the plan file, held for the whole `with`: a
    second process running the same task is refused at once, the other tasks run alongside. The
    kernel drops the lock when the process dies (SIGKILL included)."""
    path = output / PLAN_NAME
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        raise OutputLocationError(f"{output}: no plan ({PLAN_NAME}): run w4a8conv plan first (a committed output "
                                  "has none left)") from None
    except OSError as exc:
        raise OutputLocationError(f"{path}: cannot open: {exc.strerror or exc}") from None
    try:
        # The plan is read through this descriptor: closing any other one on the file would drop the lock.
        blocks = []
        while block := os.pread(fd, _READ_BLOCK, sum(map(len, blocks))):
            blocks.append(block)
        plan = TaskPlan.parse(b"".join(blocks).decode("utf-8", "replace"), path)
        if not 0 <= index < len(plan.tasks):
            raise UsageError(f"--task {index}: the plan in {output} has tasks 0 to {len(plan.tasks) - 1}")
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, index)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):  # held by another process
                raise OutputLocationError(f"{path}: cannot lock task {index}: {exc.strerror or exc}") from None
            raise OutputLocationError(f"{output}: task {index} is being run by another process (it holds the "
                                      "task's lock); wait for it to end") from None
        yield plan
    finally:
        os.close(fd)
