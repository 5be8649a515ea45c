"""The output directory's route, every step of it in one place and in order:

1. `OutputRoute.check`: the first look, before the source's data is read: an unsafe location (the
   source, inside it, around it) or an occupied one is refused; nothing is written.
2. `OutputRoute.prepare`: create the directory and hold its exclusive lock; look again under it and
   clear a previous output (`--force`); measure the free disk once and refuse a run that cannot fit;
   start the journal (or resume it). Yields the `PreparedOutput` the next steps run on.
3. `PreparedOutput.write`: the shards, through the engine, each journaled as it lands; a source found
   bad on the way removes what the run wrote (nothing of it is worth resuming).
4. `PreparedOutput.commit`: the copied files, the rewritten JSON, the index, then the stamped
   description last (the completion marker); the journal goes.

A single-host conversion runs the steps in this order in one process. Each is its own call with its
inputs explicit (the plan, the journal, the written shards' records), so a distributed run can call
them as its plan (1-2), tasks (3) and commit (4), carrying the journal and those records between hosts.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .constants import DESCRIPTION_NAME, INDEX_NAME, LAYOUT_NAME, LAYOUT_VERSION, STAMP_KEY
from .engine import run_shards
from .errors import InvalidCheckpointError, OutputLocationError, WriteError
from .files import copy_file_atomic, write_json_atomic
from .journal import JOURNAL_NAME, Journal, WrittenShard, source_files_identity
from .plan import Plan
from .resources import free_disk_bytes
from .stamp import Stamp
from .writer import ShardPlan, assign_shards, plan_fingerprint

__all__ = ["OutputRoute", "PreparedOutput"]

_OWN_FILE = re.compile(r"^(model-\d{5}-of-\d{5}\.safetensors|\..+\.partial)$")


@dataclass(frozen=True)
class OutputRoute:
    """What the output directory will hold, from the plan alone (building it writes nothing)."""

    output: Path
    plan: Plan
    shards: list[ShardPlan]
    copied: list[Path]  # the source's other files, copied as they are

    @classmethod
    def of(cls, plan: Plan, output: Path, max_shard_bytes: int) -> "OutputRoute":
        return cls(output, plan, assign_shards(plan.tensors, max_shard_bytes), plan.source.non_weight_files())

    @property
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
    def prepare(self, *, resume: bool, force: bool, warnings: list[str]) -> Iterator["PreparedOutput"]:
        """Step 2: the directory created, locked for the whole `with`, cleared or resumed, its disk checked."""
        created = not self.output.exists()
        try:
            self.output.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputLocationError(f"{self.output}: cannot create: {exc.strerror or exc}") from None
        with _exclusive_lock(self.output, warnings):
            # Under the lock, look again: another run may have filled the directory since the first look.
            self._check_location(resume=resume, force=force, remove=True)
            free = self._check_disk(created)
            yield PreparedOutput(self, self._journal(resume), created, free)

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
        ours = {INDEX_NAME, DESCRIPTION_NAME, JOURNAL_NAME, *(p.name for p in self.copied),
                *self.plan.source.rewritten_json}
        foreign = [p.name for p in entries
                   if (p.name not in ours and not _OWN_FILE.match(p.name)) or (p.is_dir() and not p.is_symlink())]
        if foreign:
            raise OutputLocationError(f"{output}: --force replaces only a previous w4a8conv output, and "
                                      f"{', '.join(foreign[:5])} is not part of one")
        if remove:
            for entry in entries:
                _remove(entry, "the previous output's file (--force)", OutputLocationError)

    def _check_disk(self, created: bool) -> int | None:
        """The free bytes, measured once; refused (and a directory this run made removed) when short."""
        free = free_disk_bytes(self.output)
        present = sum((self.output / s.file_name).stat().st_size for s in self.shards
                      if (self.output / s.file_name).is_file())
        if free is not None and free < self.write_bytes - present:
            if created:
                self.output.rmdir()
            raise WriteError(f"{self.output}: needs {self.write_bytes - present} more bytes, the file system has "
                             f"{free} free")
        return free

    def _journal(self, resume: bool) -> Journal:
        source = self.plan.source
        keys = (self.output, source.fingerprint(), source_files_identity(list(source.weight_files)),
                plan_fingerprint(self.shards, self.metadata))
        if not resume:
            return Journal.start(*keys)
        journal = Journal.resume(*keys)
        for stale in self.output.glob(".*.partial"):
            _remove(stale, "a partial file of the interrupted run", WriteError)
        return journal


@dataclass(frozen=True)
class PreparedOutput:
    """The output directory after step 2: locked (while `prepare`'s `with` lasts), journaled, disk checked."""

    route: OutputRoute
    journal: Journal
    created: bool  # this run made the directory
    disk_free_bytes: int | None  # as measured by the disk check

    def write(self, workers: int, on_bytes: Callable[[int], None]) -> list[WrittenShard]:
        """Step 3: every shard the journal does not hold yet; all of them returned in plan order."""
        route = self.route
        try:
            return run_shards(route.output, route.shards, route.metadata, route.plan.source.tensors, self.journal,
                              workers, on_bytes)
        except InvalidCheckpointError:
            # The source itself is bad (a weight found out of range): nothing here is worth resuming.
            with contextlib.suppress(OSError):  # best effort: the error to report is the source's
                for name in [s.file_name for s in route.shards] + [JOURNAL_NAME]:
                    (route.output / name).unlink(missing_ok=True)
                if self.created:
                    route.output.rmdir()
            raise

    def commit(self, stamp: Stamp) -> None:
        """Step 4: the copied files, the index, then the description carrying `stamp`; the journal removed."""
        route, output = self.route, self.route.output
        for extra in route.copied:
            copy_file_atomic(extra, output / extra.name)
        for name, content in route.plan.source.rewritten_json.items():
            write_json_atomic(output / name, content)
        weight_map = {t.name: shard.file_name for shard in route.shards for t in shard.tensors}
        write_json_atomic(output / INDEX_NAME, {"metadata": {"total_size": route.write_bytes},
                                                "weight_map": weight_map})
        description = route.plan.output_description()
        description[STAMP_KEY] = stamp.to_json()
        write_json_atomic(output / DESCRIPTION_NAME, description)
        _remove(self.journal.path, "the journal of the finished run", WriteError)


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


@contextlib.contextmanager
def _exclusive_lock(output: Path, warnings: list[str]) -> Iterator[None]:
    """flock(2) on the output directory for the whole run: a second run into it is refused at once.

    The kernel drops the lock when the process dies (SIGKILL included). On a file system without
    flock support the run goes on unlocked and says so (docs/reliability.md, "Concurrent runs")."""
    try:
        fd = os.open(output, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise OutputLocationError(f"{output}: cannot open: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputLocationError(f"{output}: another w4a8conv run is writing into this directory (it holds "
                                      "the directory's lock); wait for it to end, or stop it and use "
                                      "--resume") from None
        except OSError as exc:
            warnings.append(f"{output}: the file system does not support locks ({exc.strerror or exc}); a second "
                            "run into this directory is not excluded")
        yield
    finally:
        os.close(fd)


def _remove(path: Path, what: str, error: type[OutputLocationError] | type[WriteError]) -> None:
    """Remove one file of ours; an OS error (read-only file system, a directory in its place) names the path."""
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        raise error(f"{path}: cannot remove {what}: {exc.strerror or exc}") from None
