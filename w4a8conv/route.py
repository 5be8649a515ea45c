"""The output directory's route, every step of it in one place and in order:

1. `OutputRoute.check`: the first look, before the source's data is read: an unsafe location (the
   source, inside it, around it) or an occupied one is refused; nothing is written.
2. `OutputRoute.prepare`: create the directory and hold its exclusive lock (`claim`); look again under
   it and clear a previous output (`--force`); measure the free disk once and refuse a run that cannot
   fit; start the journal (or resume it). Yields the `PreparedOutput` the next steps run on.
3. `PreparedOutput.write`: its shards, through the engine, each journaled as it lands; a source found
   bad on the way removes what the run wrote (nothing of it is worth resuming).
4. `OutputRoute.commit`: the copied files, the rewritten JSON, the index, then the stamped description
   last (the completion marker); the run's journal (or plan and task journals) removed after it.

A single-host conversion runs the steps in this order in one process. A distributed run (`tasks.py`,
`scaleout.py`) calls them apart: its plan `claim`s the directory without a journal, each task
`prepare_part`s its own shards (the directory shared with the other tasks, a journal of its own),
and its commit holds the directory `locked` and commits the records the task journals hold.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import re
import shutil
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .constants import DESCRIPTION_NAME, INDEX_NAME, LAYOUT_NAME, LAYOUT_VERSION, STAMP_KEY
from .engine import run_shards
from .errors import InvalidCheckpointError, OutputLocationError, WriteError
from .files import copy_file_atomic, make_directories, partial_name, write_json_atomic
from .journal import JOURNAL_NAME, PLAN_NAME, Journal, WrittenShard, source_files_identity
from .plan import Plan
from .resources import free_disk_bytes
from .stamp import Stamp
from .writer import ShardPlan, assign_shards, plan_fingerprint

__all__ = ["OutputRoute", "PreparedOutput"]

# What a previous run may have left (--force removes it): shards, partial files, a distributed run's task journals.
_OWN_FILE = re.compile(r"^(model-\d{5}-of-\d{5}\.safetensors|\..+\.partial|\.w4a8conv-journal-task-\d{5}\.json)$")
_PARTIAL = re.compile(r"^\..+\.partial$")  # a file being written (a copy a killed run left)


@dataclass(frozen=True)
class OutputRoute:
    """What the output directory will hold, from the plan alone (building it writes nothing)."""

    output: Path
    plan: Plan
    shards: list[ShardPlan]
    copied: list[Path]  # the source's other files, copied as they are (sub-directories' too)

    @classmethod
    def of(cls, plan: Plan, output: Path, max_shard_bytes: int) -> "OutputRoute":
        return cls(output, plan, assign_shards(plan.tensors, max_shard_bytes), plan.source.non_weight_files())

    @property
    def copied_names(self) -> list[str]:
        """The copied files' paths relative to the source, and so to the output ('optional/quarot.safetensors')."""
        return [p.relative_to(self.plan.source.root).as_posix() for p in self.copied]

    @functools.cached_property
    def write_bytes(self) -> int:
        return sum(s.data_bytes for s in self.shards)

    @property
    def metadata(self) -> dict[str, str]:
        """Every shard's safetensors `__metadata__`."""
        return {"format": "pt", STAMP_KEY: f"{LAYOUT_NAME}/{LAYOUT_VERSION}"}

    def free_disk_bytes(self) -> int | None:
        """Free bytes where the output goes (its nearest existing parent while it does not exist)."""
        return free_disk_bytes(self.output)

    def check(self, *, resume: bool, force: bool) -> None:
        """Step 1: refuse an unsafe or occupied location; writes nothing."""
        self._check_location(resume=resume, force=force, remove=False)

    @contextlib.contextmanager
    def claim(self, *, resume: bool, force: bool, warnings: list[str]) -> Iterator[tuple[bool, int | None]]:
        """Step 2 without a journal: the directory created, locked for the whole `with`, looked at again and
        cleared (`--force`), its disk checked for every shard; yields (created by this run, free bytes)."""
        created = not self.output.exists()
        try:
            self.output.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputLocationError(f"{self.output}: cannot create: {exc.strerror or exc}") from None
        with _directory_lock(self.output, warnings, shared=False):
            # Under the lock, look again: another run may have filled the directory since the first look.
            self._check_location(resume=resume, force=force, remove=True)
            yield created, self._check_disk(created, self.shards)

    @contextlib.contextmanager
    def prepare(self, *, resume: bool, force: bool, warnings: list[str]) -> Iterator["PreparedOutput"]:
        """Step 2: the directory claimed, the journal started or resumed."""
        with self.claim(resume=resume, force=force, warnings=warnings) as (created, free):
            stale = sorted(self.output.glob(".*.partial"))
            yield PreparedOutput(self, self._journal(resume, JOURNAL_NAME, stale), created, free, tuple(self.shards))

    @contextlib.contextmanager
    def prepare_part(self, shards: list[ShardPlan], journal_name: str,
                     warnings: list[str]) -> Iterator["PreparedOutput"]:
        """Step 2 for a part of the output (a task of a distributed run) in a directory its plan made: a
        shared lock (other parts run alongside; a single-host run or a commit, which lock it exclusively,
        are refused meanwhile), the disk checked for these shards, the part's own journal resumed when
        there is one (its own partial files removed, never another part's) or started."""
        with _directory_lock(self.output, warnings, shared=True):
            free = self._check_disk(False, shards)
            stale = [self.output / partial_name(name) for name in (*(s.file_name for s in shards), journal_name)]
            journal = self._journal((self.output / journal_name).is_file(), journal_name, stale)
            yield PreparedOutput(self, journal, False, free, tuple(shards))

    @contextlib.contextmanager
    def locked(self, warnings: list[str]) -> Iterator[None]:
        """The existing directory held exclusively (a distributed run's commit: no task may be running)."""
        if not self.output.is_dir():
            raise OutputLocationError(f"{self.output}: is not a directory")
        with _directory_lock(self.output, warnings, shared=False):
            yield

    def commit(self, stamp: Stamp, bookkeeping: list[Path]) -> None:
        """Step 4: the copied files, the index, then the description carrying `stamp`; then the run's
        `bookkeeping` files (its journal, or a distributed run's plan and task journals) removed."""
        output = self.output
        for extra, name in zip(self.copied, self.copied_names):
            target = output / name
            if target.parent != output:
                make_directories(target.parent)
            copy_file_atomic(extra, target)
        for name, content in self.plan.source.rewritten_json.items():
            write_json_atomic(output / name, content)
        weight_map = {t.name: shard.file_name for shard in self.shards for t in shard.tensors}
        write_json_atomic(output / INDEX_NAME, {"metadata": {"total_size": self.write_bytes},
                                                "weight_map": weight_map})
        description = self.plan.output_description()
        description[STAMP_KEY] = stamp.to_json()
        write_json_atomic(output / DESCRIPTION_NAME, description)
        for path in bookkeeping:
            _remove(path, "a record of the finished run", WriteError)

    def _check_location(self, *, resume: bool, force: bool, remove: bool) -> None:
        """Refuse unsafe locations; with --force and `remove`, clear a previous output's files (and nothing else)."""
        output = self.output
        src, dst = os.path.realpath(self.plan.source.root), os.path.realpath(output)
        if dst == src or os.path.commonpath([src, dst]) == src:
            raise OutputLocationError(f"{output}: the output directory must not be the source directory or inside "
                                      "it")
        if os.path.commonpath([src, dst]) == dst:
            raise OutputLocationError(f"{output}: the output directory must not contain the source directory")
        entries = _existing_entries(output) or []
        if not entries or resume:
            return
        if not force:
            raise OutputLocationError(f"{output}: exists and is not empty (use --resume to finish an interrupted "
                                      "conversion, or --force to replace a previous one)")
        copied = set(self.copied_names)
        ours = {INDEX_NAME, DESCRIPTION_NAME, JOURNAL_NAME, PLAN_NAME, *copied, *self.plan.source.rewritten_json}
        directories = {name.split("/")[0] for name in copied if "/" in name}
        foreign = [p.name for p in entries
                   if (p.name not in ours and not _OWN_FILE.match(p.name) and p.name not in directories)
                   or (p.is_dir() and not p.is_symlink()
                       and not (p.name in directories and _holds_only(output, p, copied)))]
        if foreign:
            raise OutputLocationError(f"{output}: --force replaces only a previous w4a8conv output, and "
                                      f"{', '.join(foreign[:5])} is not part of one")
        if remove:
            for entry in entries:
                if entry.is_dir() and not entry.is_symlink():
                    _remove_copied_directory(entry)
                else:
                    _remove(entry, "the previous output's file (--force)", OutputLocationError)

    def _check_disk(self, created: bool, shards: list[ShardPlan]) -> int | None:
        """The free bytes, measured once; refused (and a directory this run made removed) when short of
        what `shards` still need."""
        free = free_disk_bytes(self.output)
        present = sum((self.output / s.file_name).stat().st_size for s in shards
                      if (self.output / s.file_name).is_file())
        needed = sum(s.data_bytes for s in shards) - present
        if free is not None and free < needed:
            if created:
                self.output.rmdir()
            raise WriteError(f"{self.output}: needs {needed} more bytes, the file system has {free} free")
        return free

    def journal_keys(self) -> tuple[str, str, str]:
        """What a journal (and a distributed plan) is keyed to: the source's fingerprint, its weight files'
        identity on disk, and the plan fingerprint (shard cut, tensors, dtypes, recipes)."""
        source = self.plan.source
        return (source.fingerprint(), source_files_identity(list(source.weight_files)),
                plan_fingerprint(self.shards, self.metadata))

    def _journal(self, resume: bool, name: str, stale: list[Path]) -> Journal:
        if not resume:
            return Journal.start(self.output, *self.journal_keys(), name=name)
        journal = Journal.resume(self.output, *self.journal_keys(), name=name)
        for path in stale:
            _remove(path, "a partial file of the interrupted run", WriteError)
        return journal


@dataclass(frozen=True)
class PreparedOutput:
    """The output directory after step 2: locked (while the `with` lasts), journaled, disk checked."""

    route: OutputRoute
    journal: Journal
    created: bool  # this run made the directory
    disk_free_bytes: int | None  # as measured by the disk check
    shards: tuple[ShardPlan, ...]  # what this run writes: every shard, or one task's

    def write(self, workers: int, on_bytes: Callable[[int], None]) -> list[WrittenShard]:
        """Step 3: every shard of this run the journal does not hold yet; all of them returned in plan order."""
        route = self.route
        try:
            return run_shards(route.output, list(self.shards), route.metadata, route.plan.source.tensors,
                              self.journal, workers, on_bytes)
        except InvalidCheckpointError:
            # The source itself is bad (a weight found out of range): nothing here is worth resuming.
            with contextlib.suppress(OSError):  # best effort: the error to report is the source's
                for path in [route.output / s.file_name for s in self.shards] + [self.journal.path]:
                    path.unlink(missing_ok=True)
                if self.created:
                    route.output.rmdir()
            raise

    def commit(self, stamp: Stamp) -> None:
        """Step 4 of a single-host run: `OutputRoute.commit`, the journal removed last."""
        self.route.commit(stamp, [self.journal.path])


def _existing_entries(output: Path) -> list[Path] | None:
    """The output directory's entries, or None when it does not exist; exit 2 when it cannot be used."""
    try:
        info = os.stat(output)
    except (FileNotFoundError, NotADirectoryError):  # to be created (or refused by mkdir)
        return None
    except OSError as exc:  # a component over the name limit, a loop of links, no permission to look
        raise OutputLocationError(f"{output}: cannot use as the output directory: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise OutputLocationError(f"{output}: exists and is not a directory")
    try:
        return sorted(output.iterdir())
    except OSError as exc:
        raise OutputLocationError(f"{output}: cannot list: {exc.strerror or exc}") from None


_HELD = {  # who holds the lock a run could not take, by the lock that run wanted
    False: "another w4a8conv run is writing into this directory (it holds the directory's lock); wait for it "
           "to end, or stop it and use --resume",
    True: "a single-host run or a commit holds this directory's lock; wait for it to end",
}


@contextlib.contextmanager
def _directory_lock(output: Path, warnings: list[str], *, shared: bool) -> Iterator[None]:
    """flock(2) on the output directory for the whole run: exclusive for a run that owns the directory
    (a second run into it is refused at once), shared for the tasks of a distributed run.

    The kernel drops the lock when the process dies (SIGKILL included). On a file system without
    flock support the run goes on unlocked and says so (docs/reliability.md, "Concurrent runs")."""
    try:
        fd = os.open(output, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise OutputLocationError(f"{output}: cannot open: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputLocationError(f"{output}: {_HELD[shared]}") from None
        except OSError as exc:
            warnings.append(f"{output}: the file system does not support locks ({exc.strerror or exc}); a second "
                            "run into this directory is not excluded")
        yield
    finally:
        os.close(fd)


def _holds_only(output: Path, directory: Path, copied: set[str]) -> bool:
    """`directory` (in the output, links not followed) holds nothing but files this run copies."""
    for parent, dirs, files in os.walk(directory):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(parent, d))]:
            if Path(parent, name).relative_to(output).as_posix() not in copied and not _PARTIAL.match(name):
                return False
    return True


def _remove(path: Path, what: str, error: type[OutputLocationError] | type[WriteError]) -> None:
    """Remove one file of ours; an OS error (read-only file system, a directory in its place) names the path."""
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        raise error(f"{path}: cannot remove {what}: {exc.strerror or exc}") from None


def _remove_copied_directory(path: Path) -> None:
    """Remove a previous output's sub-directory of copied files (`_holds_only` checked it holds nothing else)."""
    try:
        shutil.rmtree(path)
    except OSError as exc:
        raise OutputLocationError(f"{path}: cannot remove the previous output's copied files (--force): "
                                  f"{exc.strerror or exc}") from None
