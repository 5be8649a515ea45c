"""What a run has finished, for `--resume`, and the hashes that prove it: each finished shard's size
and sha256, keyed to the source and the plan the run was made for.

The journal is recorded as soon as a shard's rename is durable; `--resume` re-hashes the journaled
files and keeps the ones that still match. `verify` uses `sha256_file` from here without the engine.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import OutputLocationError
from .files import write_json_atomic

__all__ = ["JOURNAL_NAME", "PLAN_NAME", "task_journal_name", "WrittenShard", "Journal", "sha256_file",
           "source_files_identity"]

JOURNAL_NAME = ".w4a8conv-journal.json"  # a single-host run's
PLAN_NAME = ".w4a8conv-plan.json"  # a distributed run's plan: its tasks, the source and the options (tasks.py)
_TASK_JOURNAL = ".w4a8conv-journal-task-{index:05d}.json"


def task_journal_name(index: int) -> str:
    """The journal of task `index` of a distributed run: each task records its own shards."""
    return _TASK_JOURNAL.format(index=index)
_HASH_BLOCK = 16 * 2**20


@dataclass(frozen=True)
class WrittenShard:
    """A shard file in place under its final name: what the journal, the index and the stamp record."""

    file_name: str
    nbytes: int
    sha256: str


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def source_files_identity(files: list[Path]) -> str:
    """sha256 over each weight file's name, size, modification time and inode: the fingerprint covers
    headers only, so this is what tells a resume that tensor bytes were edited in place."""
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"\0{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0{stat.st_ino}".encode())
    return "sha256:" + digest.hexdigest()


@dataclass
class Journal:
    """What a run has finished, keyed to the source and the plan it was made for."""

    path: Path
    source_fingerprint: str
    source_files: str  # identity of the weight files' contents on disk (see `source_files_identity`)
    plan_fingerprint: str
    done: dict[str, dict]

    @classmethod
    def start(cls, output: Path, source_fingerprint: str, source_files: str, plan_fp: str, *,
              name: str = JOURNAL_NAME) -> "Journal":
        journal = cls(output / name, source_fingerprint, source_files, plan_fp, {})
        journal.save()
        return journal

    @classmethod
    def resume(cls, output: Path, source_fingerprint: str, source_files: str, plan_fp: str, *,
               name: str = JOURNAL_NAME) -> "Journal":
        path = output / name
        try:
            raw = json.loads(path.read_text())
            journal = cls(path, raw["source_fingerprint"], raw["source_files"], raw["plan_fingerprint"],
                          {str(k): {"bytes": int(v["bytes"]), "sha256": str(v["sha256"])}
                           for k, v in raw["shards"].items()})
        except FileNotFoundError:
            raise OutputLocationError(f"{output}: nothing to resume (no {name}); "
                                      "start a new conversion") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise OutputLocationError(f"{path}: unreadable journal ({exc}); use --force to start over") from None
        if journal.source_fingerprint != source_fingerprint:
            raise OutputLocationError(f"{output}: the source changed since the interrupted run "
                                      "(fingerprint mismatch); use --force to start over")
        if journal.source_files != source_files:
            raise OutputLocationError(f"{output}: the source changed since the interrupted run (its weight files "
                                      "were modified or replaced); use --force to start over")
        if journal.plan_fingerprint != plan_fp:
            raise OutputLocationError(f"{output}: the interrupted run used other options (shard size or "
                                      "model dtype); resume with the same options or use --force")
        return journal

    def save(self) -> None:
        write_json_atomic(self.path, {"source_fingerprint": self.source_fingerprint,
                                      "source_files": self.source_files,
                                      "plan_fingerprint": self.plan_fingerprint, "shards": self.done})

    def record(self, shard: WrittenShard) -> None:
        self.done[shard.file_name] = {"bytes": shard.nbytes, "sha256": shard.sha256}
        self.save()

    def still_valid(self, output: Path, name: str) -> WrittenShard | None:
        """The journaled shard, if its file is still there with the recorded size and hash."""
        entry, path = self.done.get(name), output / name
        try:
            if entry is None or not path.is_file() or path.stat().st_size != entry["bytes"]:
                return None
            if sha256_file(path) != entry["sha256"]:
                return None
        except OSError:  # unreadable: written again (and a write that fails too names the path)
            return None
        return WrittenShard(name, entry["bytes"], entry["sha256"])
