"""Faults while writing and damage after writing: a full disk, signals at several points, a dead worker,
a changed source under `--resume`, and converted directories the runtime must refuse.

Every interrupted run is finished with `--resume` and must then be byte-identical to an uninterrupted
run. The interruptions run the real CLI in subprocesses (tests/fault_wrapper.py injects the fault), all
started at once by one fixture; test_engine.py already covers SIGKILL in the middle of a shard.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from w4a8conv.api import ConvertOptions, convert
from w4a8conv.constants import DESCRIPTION_NAME, INDEX_NAME, ExitCode
from w4a8conv.journal import JOURNAL_NAME
from w4a8conv.errors import NotConvertedError, UnsupportedSplitError, W4A8Error
from w4a8conv.runtime import NpuReadyCheckpoint
from w4a8conv.verify import verify

from robustness_support import (CLI_ENV, DESCRIPTION, MOE, REPO, Run, assert_clean_failure, assert_nothing_complete,
                                build, edit_json, file_hashes, read_raw, rewrite_tensors, run_main)

WRAPPER = Path(__file__).with_name("fault_wrapper.py")
SHARD_BYTES = "40000"  # v1-multi -> 14 output shards
OPTIONS = ("--max-shard-size", SHARD_BYTES)


def out_shard(k: int) -> str:
    return f"model-{k:05d}-of-00014.safetensors"


# -- process helpers -------------------------------------------------------------------------------------


def live_in_group(pgid: int) -> list[int]:
    """Processes of a process group that are still running (zombies do not count)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def wait_until(predicate, timeout: float, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


@dataclass
class Outcome:
    """A faulted run and what its output directory held the moment it ended."""

    run: Run
    out: Path
    files: list[str]
    survivors_after: dict[float, list[int]] = field(default_factory=dict)  # seconds after the end -> live pids

    @property
    def partials(self) -> list[str]:
        return [f for f in self.files if f.endswith(".partial")]


def _snapshot(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir()) if out.is_dir() else []


def run_fault(fault: str, arg: str, src: Path, out: Path, *cli_args: str, signal_when=None, signum=None,
              to_group: bool = False, watch: tuple[float, ...] = ()) -> Outcome:
    """Run the CLI under a fault; optionally send `signum` from outside once `signal_when(out)` holds.

    The run gets its own session, so whatever it leaves running can be observed (`watch`: seconds after
    it ended) and is then killed by its process-group id. Output goes to files: orphans may hold pipes."""
    env = dict(CLI_ENV, W4A8_FAULT=fault, W4A8_FAULT_ARG=arg)
    argv = [sys.executable, str(WRAPPER), "convert", str(src), str(out), *OPTIONS, *cli_args]
    logs = out.parent / f"{out.name}.log"
    logs.mkdir()
    with open(logs / "stdout", "w") as stdout, open(logs / "stderr", "w") as stderr:
        proc = subprocess.Popen(argv, stdout=stdout, stderr=stderr, env=env, cwd=REPO, start_new_session=True)
    try:
        if signal_when is not None:
            assert wait_until(lambda: proc.poll() is not None or signal_when(out), 120), "trigger never came"
            assert proc.poll() is None, "the run ended before the signal:\n" + (logs / "stderr").read_text()
            (os.killpg if to_group else os.kill)(proc.pid, signum)
        proc.wait(timeout=120)
        ended = time.monotonic()
        files = _snapshot(out)
        if (out / JOURNAL_NAME).is_file():
            shutil.copyfile(out / JOURNAL_NAME, out.parent / f"{out.name}.journal")
        survivors = {}
        for at in watch:
            time.sleep(max(0.0, at - (time.monotonic() - ended)))
            survivors[at] = live_in_group(proc.pid)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if live_in_group(proc.pid):  # orphaned workers of this run: stop them before anyone resumes
            os.killpg(proc.pid, signal.SIGKILL)
            wait_until(lambda: not live_in_group(proc.pid), 10)
    run = Run(argv[2:], proc.returncode, (logs / "stdout").read_text(), (logs / "stderr").read_text())
    return Outcome(run, out, files, survivors)


def _shard_done_and_partial(out: Path) -> bool:
    """A shard is finished (renamed into place) and a worker is in the middle of another."""
    try:
        names = [p.name for p in out.iterdir()]
    except OSError:
        return False
    return (any(n.startswith("model-") for n in names)
            and any(n.startswith(".model-") and n.endswith(".partial") for n in names))


# -- fixtures ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return build("v1-multi", tmp_path_factory.mktemp("faults") / "src")


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("faults-ref") / "out"
    convert(source, out, options=ConvertOptions(max_shard_bytes=int(SHARD_BYTES), workers=1))
    hashes = file_hashes(out)
    assert len([n for n in hashes if n.endswith(".safetensors")]) == 14
    return hashes


# name -> (fault, arg, extra CLI args, external signal: (signum, to_group) or None, seconds to watch for survivors)
FAULTS = {
    "enospc-shard": ("enospc-shard", "model-00003-of-00014", ("--workers", "1"), None, ()),
    "enospc-index": ("enospc-index", "", ("--workers", "1"), None, ()),
    "sigkill-before-record": ("sigkill-before-record", "3", ("--workers", "1"), None, ()),
    "sigkill-before-description": ("sigkill-before-description", "", ("--workers", "1"), None, ()),
    "sigkill-after-description": ("sigkill-after-description", "", ("--workers", "1"), None, ()),
    "sigterm-mid-shard": ("sigterm-mid-shard", "40", ("--workers", "1"), None, ()),
    "kill-worker": ("kill-worker", "5", ("--workers", "2"), None, (3.0,)),
    "sigterm-parent": ("slow", "0.05", ("--workers", "2"), (signal.SIGTERM, False), (3.0,)),
    "sigterm-group": ("slow", "0.05", ("--workers", "2"), (signal.SIGTERM, True), (3.0,)),
    "sigkill-parent": ("slow", "0.4", ("--workers", "2"), (signal.SIGKILL, False), (1.5,)),
    "sighup-group": ("slow", "0.05", ("--workers", "2"), (signal.SIGHUP, True), (3.0,)),  # the terminal closed
}


@pytest.fixture(scope="module")
def faulted(source, tmp_path_factory) -> dict[str, Outcome]:
    base = tmp_path_factory.mktemp("faulted")

    def one(name: str) -> Outcome | BaseException:
        fault, arg, args, external, watch = FAULTS[name]
        kwargs = {}
        if external:
            kwargs = dict(signal_when=_shard_done_and_partial, signum=external[0], to_group=external[1])
        try:
            return run_fault(fault, arg, source, base / name, *args, watch=watch, **kwargs)
        except Exception as exc:  # noqa: BLE001 - reported by the test that uses this run
            return exc

    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(one, name) for name in FAULTS}
        return _Outcomes({name: f.result() for name, f in futures.items()})


class _Outcomes(dict):
    """A failure to run one fault fails only the tests that look at it."""

    def __getitem__(self, name: str) -> Outcome:
        value = super().__getitem__(name)
        if isinstance(value, BaseException):
            raise value
        return value


def resume_and_compare(source: Path, out: Path, reference: dict[str, str]) -> None:
    run = run_main("convert", source, out, *OPTIONS, "--resume", "--workers", "1")
    assert run.returncode == 0, run.describe()
    assert file_hashes(out) == reference, "the resumed output differs from an uninterrupted run"
    assert verify(out, source=source).ok


# -- full disk ---------------------------------------------------------------------------------------------


def test_enospc_in_a_shard_exit_4_names_the_shard_then_resume(faulted, source, reference):
    o = faulted["enospc-shard"]
    assert_clean_failure(o.run, ExitCode.IO_FAILURE, [str(o.out / out_shard(3)), "No space left on device"])
    assert not o.partials, o.files
    assert JOURNAL_NAME in o.files and out_shard(2) in o.files and out_shard(3) not in o.files
    assert_nothing_complete(o.out)
    resume_and_compare(source, o.out, reference)


def test_enospc_writing_the_index_exit_4_then_resume(faulted, source, reference):
    o = faulted["enospc-index"]
    assert_clean_failure(o.run, ExitCode.IO_FAILURE, [str(o.out / INDEX_NAME), "No space left on device"])
    assert not o.partials, o.files
    assert INDEX_NAME not in o.files and JOURNAL_NAME in o.files
    assert_nothing_complete(o.out)
    resume_and_compare(source, o.out, reference)


def test_not_enough_free_disk_is_refused_before_writing(source, tmp_path, monkeypatch):
    import shutil as shutil_module

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda _path: usage(10**6, 10**6 - 1000, 1000))
    out = tmp_path / "out"
    run = run_main("convert", source, out, *OPTIONS, "--workers", "1")
    assert_clean_failure(run, ExitCode.IO_FAILURE, [str(out), "the file system has 1000 free"])
    assert not out.exists()


# -- signals -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sigkill-before-record", "sigkill-before-description"])
def test_sigkill_then_resume_is_byte_identical(faulted, source, reference, name):
    o = faulted[name]
    assert o.run.returncode == -signal.SIGKILL, o.run.describe()
    assert JOURNAL_NAME in o.files
    assert_nothing_complete(o.out)
    if name == "sigkill-before-description":
        assert INDEX_NAME in o.files  # the index is written, the completion marker is not
    with pytest.raises(W4A8Error, match="exists and is not empty"):
        convert(source, o.out, options=ConvertOptions(max_shard_bytes=int(SHARD_BYTES), workers=1))
    resume_and_compare(source, o.out, reference)


def test_sigkill_after_the_description_leaves_a_complete_output(faulted, source, reference):
    """Killed between writing the completion marker and removing the journal: complete, and resumable."""
    o = faulted["sigkill-after-description"]
    assert o.run.returncode == -signal.SIGKILL, o.run.describe()
    assert DESCRIPTION_NAME in o.files and JOURNAL_NAME in o.files
    resume_and_compare(source, o.out, reference)
    assert not (o.out / JOURNAL_NAME).exists()


@pytest.mark.parametrize("name", ["sigterm-mid-shard", "sigterm-parent", "sigterm-group", "sighup-group"])
def test_sigterm_stops_cleanly_then_resume_is_byte_identical(faulted, source, reference, name):
    """SIGTERM (`kill`, systemd, Kubernetes) and SIGHUP (a closed terminal or ssh session, sent to the
    whole process group) end the run at once: exit 128+N with one error line, the unfinished shard
    removed, the journal kept, no worker left running; `--resume` finishes the job."""
    o = faulted[name]
    signum = signal.SIGHUP if name.startswith("sighup") else signal.SIGTERM
    assert_clean_failure(o.run, 128 + signum, [f"interrupted by {signum.name}", "--resume"])
    assert not o.partials, o.files
    assert JOURNAL_NAME in o.files
    for seconds, pids in o.survivors_after.items():
        assert not pids, f"processes of the run still alive {seconds} s after it ended: {pids}"
    assert_nothing_complete(o.out)
    resume_and_compare(source, o.out, reference)


@pytest.mark.parametrize("name", ["sigterm-parent", "sigterm-group", "sighup-group"])
def test_shards_finished_by_workers_are_journaled_before_the_run_ends(faulted, name):
    """With --workers N, each shard must be journaled as soon as it is renamed into place, or an
    interrupted run's finished shards are not kept by --resume (they are converted again)."""
    o = faulted[name]
    finished = [f for f in o.files if f.startswith("model-")]
    assert finished, f"the signal came before any shard was finished: {o.files}"
    # The journal as it was when the run ended (the resume in the other test rewrites it later).
    journal = json.loads((o.out.parent / f"{o.out.name}.journal").read_text())
    assert sorted(journal["shards"]) == finished, "finished shards are missing from the journal"


def test_sigkill_of_the_parent_stops_its_workers(faulted, source, reference):
    """After the parent is killed, nothing may keep writing into the output (a `--resume` started
    right away would race the orphans): workers must die with their parent."""
    o = faulted["sigkill-parent"]
    assert o.run.returncode == -signal.SIGKILL, o.run.describe()
    assert not o.survivors_after[1.5], (f"worker processes {o.survivors_after[1.5]} outlived the killed parent "
                                        "(they finish their shard and rename it into the output)")
    assert_nothing_complete(o.out)
    resume_and_compare(source, o.out, reference)


def test_a_worker_killed_by_the_oom_killer_is_an_io_failure_not_a_crash(faulted, source, reference):
    """A worker process that dies (SIGKILL from the OOM killer) must end the run like any other
    failure while writing: one error line, exit 4, no traceback, partial files removed; `--resume` works."""
    o = faulted["kill-worker"]
    assert_clean_failure(o.run, ExitCode.IO_FAILURE, ["worker"])
    assert not o.partials, o.files
    assert not o.survivors_after[3.0]
    assert_nothing_complete(o.out)
    resume_and_compare(source, o.out, reference)


# -- resume refusals ---------------------------------------------------------------------------------------


@pytest.fixture
def interrupted(source, tmp_path, monkeypatch):
    """An output left by a run that hit a full disk in its fourth shard (in this process)."""
    import w4a8conv.staging as staging
    import w4a8conv.writer as writer
    from fault_wrapper import FullDiskOs

    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        full = FullDiskOs(out_shard(4))  # the shard is opened by the writer, written by staging
        patch.setattr(writer, "os", full)
        patch.setattr(staging, "os", full)
        run = run_main("convert", source, out, *OPTIONS, "--workers", "1")
    assert_clean_failure(run, ExitCode.IO_FAILURE, [out_shard(4), "No space left on device"])
    return out


def _copy_source(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_resume_refuses_a_changed_description(interrupted, source, tmp_path):
    changed = _copy_source(source, tmp_path / "changed")
    edit_json(changed / DESCRIPTION, lambda d: d.update(comment="re-exported"))
    before = file_hashes(interrupted)
    run = run_main("convert", changed, interrupted, *OPTIONS, "--resume", "--workers", "1")
    assert_clean_failure(run, ExitCode.USAGE, [str(interrupted), "the source changed since the interrupted run "
                                               "(fingerprint mismatch)"])
    assert file_hashes(interrupted) == before


def test_resume_refuses_changed_tensor_data_with_the_same_header(interrupted, source, tmp_path):
    """A scale fixed in place (same header, same size) between the runs: resuming would mix shards made
    from the old bytes with shards made from the new ones, a plausible-looking but wrong checkpoint."""
    from w4a8conv.source import open_source

    changed = _copy_source(source, tmp_path / "changed")
    name = f"{MOE}.experts.7.down_proj.weight_scale"
    file = next(f for f in sorted(changed.glob("*.safetensors")) if name in read_raw(f)[0])
    size = file.stat().st_size

    def change(t):
        t[name][0, 0] *= 2
    rewrite_tensors(file, change)
    assert file.stat().st_size == size
    assert open_source(changed).fingerprint() == open_source(source).fingerprint()  # headers alone cannot tell
    run = run_main("convert", changed, interrupted, *OPTIONS, "--resume", "--workers", "1")
    assert_clean_failure(run, ExitCode.USAGE, [str(interrupted), "source changed"])
    assert_nothing_complete(interrupted)


def test_resume_refuses_an_unreadable_journal(interrupted, source):
    (interrupted / JOURNAL_NAME).write_text("{not json")
    run = run_main("convert", source, interrupted, *OPTIONS, "--resume", "--workers", "1")
    assert_clean_failure(run, ExitCode.USAGE, [str(interrupted / JOURNAL_NAME), "unreadable journal"])


def test_resume_refuses_other_options(interrupted, source):
    run = run_main("convert", source, interrupted, "--max-shard-size", "80000", "--resume", "--workers", "1")
    assert_clean_failure(run, ExitCode.USAGE, ["the interrupted run used other options"])


def test_a_second_run_into_the_same_directory_is_refused_while_the_first_holds_its_lock(source, reference,
                                                                                        tmp_path):
    """Two converts into one directory used to race (one failing with a confusing ENOENT): the run holds
    an exclusive lock on the output directory, and a second one, plain, --resume or --force, is refused."""
    second: dict[str, Run] = {}

    def then_start_others(out: Path) -> bool:
        if not _shard_done_and_partial(out):
            return False
        for flag in ("--resume", "--force"):
            second[flag] = run_main("convert", source, out, *OPTIONS, flag, "--workers", "1")
        return True
    o = run_fault("slow", "0.05", source, tmp_path / "out", "--workers", "1", signal_when=then_start_others,
                  signum=signal.SIGTERM)
    for run in second.values():
        assert_clean_failure(run, ExitCode.USAGE, [f"{o.out}: another w4a8conv run is writing into this directory"])
    assert o.run.returncode == 128 + signal.SIGTERM, o.run.describe()  # the first run was not disturbed
    resume_and_compare(source, o.out, reference)


# -- operating-system errors in the output: exit 2 or 4 naming the path, never a traceback ---------------


@pytest.fixture
def read_only_mount(tmp_path):
    """A tmpfs of our own, to make read-only after writing into it (skipped where mount is not allowed)."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode:
        pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_read_only_output_file_system_under_force_and_resume(source, read_only_mount, monkeypatch):
    import w4a8conv.staging as staging
    import w4a8conv.writer as writer
    from fault_wrapper import FullDiskOs

    complete, unfinished = read_only_mount / "complete", read_only_mount / "unfinished"
    convert(source, complete, options=ConvertOptions(max_shard_bytes=int(SHARD_BYTES), workers=1))
    with monkeypatch.context() as patch:
        full = FullDiskOs(out_shard(4))  # the shard is opened by the writer, written by staging
        patch.setattr(writer, "os", full)
        patch.setattr(staging, "os", full)
        run_main("convert", source, unfinished, *OPTIONS, "--workers", "1")
    stale = unfinished / f".{out_shard(4)}.partial"
    stale.write_bytes(b"left by a SIGKILL")
    subprocess.run(["mount", "-o", "remount,ro", str(read_only_mount)], check=True)
    before = file_hashes(complete), file_hashes(unfinished)

    run = run_main("convert", source, complete, *OPTIONS, "--force", "--workers", "1")
    assert_clean_failure(run, ExitCode.USAGE, [f"{complete}/", "cannot remove the previous output's file (--force): "
                                               "Read-only file system"])
    run = run_main("convert", source, unfinished, *OPTIONS, "--resume", "--workers", "1")
    assert_clean_failure(run, ExitCode.IO_FAILURE, [f"{stale}: cannot remove a partial file of the interrupted run: "
                                                    "Read-only file system"])
    assert (file_hashes(complete), file_hashes(unfinished)) == before


def test_resume_with_a_directory_where_a_file_of_the_output_was(interrupted, source, reference):
    """An entry of the output that is now a directory: exit 4 naming it; once it is gone, resume finishes."""
    stale = interrupted / f".{out_shard(4)}.partial"
    stale.mkdir()
    run = run_main("convert", source, interrupted, *OPTIONS, "--resume", "--workers", "1")
    assert_clean_failure(run, ExitCode.IO_FAILURE, [f"{stale}: cannot remove a partial file of the interrupted run"])
    stale.rmdir()
    (interrupted / out_shard(2)).unlink()
    (interrupted / out_shard(2)).mkdir()  # a journaled shard
    run = run_main("convert", source, interrupted, *OPTIONS, "--resume", "--workers", "1")
    assert_clean_failure(run, ExitCode.IO_FAILURE, [f"{interrupted / out_shard(2)}: cannot write: Is a directory"])
    (interrupted / out_shard(2)).rmdir()
    resume_and_compare(source, interrupted, reference)


# -- the runtime and verify on damaged outputs -------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("rt")
    src = build("v1", base / "src")
    out = base / "out"
    convert(src, out, options=ConvertOptions(max_shard_bytes=4000, workers=1))
    return src, out


@pytest.fixture
def damaged(pristine, tmp_path) -> Path:
    target = tmp_path / "ck"
    shutil.copytree(pristine[1], target)
    return target


def _moe_shard(out: Path) -> Path:
    weight_map = json.loads((out / INDEX_NAME).read_text())["weight_map"]
    return out / weight_map[f"{MOE}.experts.0.gate_proj.weight"]


def _stamp(out: Path, change) -> None:
    edit_json(out / DESCRIPTION_NAME, lambda d: change(d["w4a8conv"]))


def _refused(out: Path, *reads) -> W4A8Error:
    """open() or the first read raises a w4a8conv error (never another exception), and verify fails."""
    with pytest.raises(W4A8Error) as caught:
        ckpt = NpuReadyCheckpoint.open(out)
        for read in reads:
            read(ckpt)
    report = verify(out)
    assert not report.ok
    return caught.value


def test_runtime_truncated_shard(damaged):
    shard_file = _moe_shard(damaged)
    blob = shard_file.read_bytes()
    shard_file.write_bytes(blob[: len(blob) // 2])
    error = _refused(damaged, lambda c: c.moe_layer(MOE))
    assert isinstance(error, NotConvertedError) and shard_file.name in str(error)


def test_runtime_garbage_shard_header(damaged):
    shard_file = _moe_shard(damaged)
    blob = bytearray(shard_file.read_bytes())
    blob[8:40] = b"\x00" * 32
    shard_file.write_bytes(bytes(blob))
    _refused(damaged, lambda c: c.tensor(f"{MOE}.experts.0.gate_proj.weight"))


def test_runtime_tampered_shard_hash_fails_verify_exit_5(damaged):
    first = sorted(p.name for p in damaged.glob("*.safetensors"))[0]
    _stamp(damaged, lambda s: s["shards"][first].update(sha256="sha256:" + "0" * 64))
    run = run_main("verify", damaged)
    assert run.returncode == ExitCode.VERIFY_FAILED, run.describe()
    assert f"{damaged / first}: sha256" in run.stderr and "differs from the stamp's" in run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize("change, message", [
    (lambda s: s.update(layout="someone-elses-layout"),
     "stamp.layout: layout 'someone-elses-layout' is not 'w4a8conv-npu-ready'"),
    (lambda s: s.update(layout_version=3), "stamp.layout_version: layout version 3; this w4a8conv serves version 2 only"),
    (lambda s: s.update(shards=["model-00001-of-00016.safetensors"]), "stamp.shards: expected an object, got array"),
    (lambda s: s.update(modules=None), "stamp.modules: expected an object, got null"),
    (lambda s: s.clear(), "stamp.layout: missing: not a stamp w4a8conv wrote"),
], ids=["foreign-layout", "future-layout-version", "shards-not-a-map", "modules-missing", "stamp-empty"])
def test_runtime_refuses_a_tampered_stamp(damaged, change, message):
    _stamp(damaged, change)
    error = _refused(damaged)
    assert isinstance(error, NotConvertedError) and message in str(error)


def test_inspect_a_future_layout_exit_3(damaged):
    _stamp(damaged, lambda s: s.update(layout_version=3))
    run = run_main("inspect", damaged)
    assert_clean_failure(run, ExitCode.INVALID_INPUT, [str(damaged / DESCRIPTION_NAME), "layout version 3"])


def test_runtime_refuses_a_shard_outside_the_directory(damaged, tmp_path):
    shutil.copyfile(sorted(damaged.glob("*.safetensors"))[0], tmp_path / "evil.safetensors")
    _stamp(damaged, lambda s: s["shards"].update({"../evil.safetensors": {"bytes": 1, "sha256": "sha256:0"}}))
    edit_json(damaged / INDEX_NAME, lambda d: d["weight_map"].update({"lm_head.weight": "../evil.safetensors"}))
    error = _refused(damaged, lambda c: c.tensor("lm_head.weight"))
    assert "../evil.safetensors" in str(error)


@pytest.mark.parametrize("tp_size, ep_size, rule", [
    (3, 1, "MoE TP size must divide 16"), (32, 1, "MoE TP size must divide 16"),
    (1, 3, "4 experts do not split evenly over 3 EP ranks")])
def test_runtime_refuses_a_mismatched_split(pristine, tp_size, ep_size, rule):
    ckpt = NpuReadyCheckpoint.open(pristine[1])
    with pytest.raises(UnsupportedSplitError, match=rule) as caught:
        ckpt.moe_layer(MOE, tp_size=tp_size, ep_size=ep_size)
    assert caught.value.exit_code == ExitCode.USAGE == 2


@pytest.mark.parametrize("change", [
    lambda m: m.update(num_experts=8), lambda m: m.update(intermediate=64), lambda m: m.update(group_size=16),
], ids=["num_experts", "intermediate", "group_size"])
def test_runtime_refuses_a_stamp_that_disagrees_with_the_stored_tensors(damaged, change):
    """The module record drives the slicing: a record that does not match the stored shapes must not
    quietly serve empty or misaligned slices, and verify must notice it."""
    _stamp(damaged, lambda s: change(s["modules"][MOE]))
    _refused(damaged, lambda c: c.moe_layer(MOE, tp_size=2, tp_rank=1, ep_size=2, ep_rank=1))


@pytest.mark.parametrize("damage", [
    lambda out: edit_json(out / INDEX_NAME, lambda d: d.update(weight_map=[])),
    lambda out: _stamp(out, lambda s: s["modules"].update({MOE: "moe"})),
    lambda out: _stamp(out, lambda s: s["modules"][MOE].update(projections=["gate_proj", "up_proj"])),
    lambda out: _stamp(out, lambda s: s["shards"].update({k: "?" for k in s["shards"]})),
], ids=["weight-map-a-list", "module-record-a-string", "two-projections", "shard-record-a-string"])
def test_runtime_and_verify_report_malformed_records_as_errors(damaged, damage):
    """Malformed JSON records raise w4a8conv errors from open()/moe_layer(), and verify reports them
    instead of crashing (it promises never to raise for a damaged output)."""
    damage(damaged)
    try:
        report = verify(damaged)
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"verify raised {type(exc).__name__}: {exc}")
    assert not report.ok
    with pytest.raises(W4A8Error):
        NpuReadyCheckpoint.open(damaged).moe_layer(MOE)


def _same_size_shards(out: Path) -> tuple[Path, Path]:
    by_size: dict[int, list[Path]] = {}
    for path in sorted(out.glob("*.safetensors")):
        by_size.setdefault(path.stat().st_size, []).append(path)
    return next(tuple(paths[:2]) for paths in by_size.values() if len(paths) >= 2)


def test_runtime_refuses_two_swapped_shards_of_the_same_size(damaged):
    first, second = _same_size_shards(damaged)
    blob = first.read_bytes()
    first.write_bytes(second.read_bytes())
    second.write_bytes(blob)
    error = _refused(damaged)
    assert isinstance(error, NotConvertedError), error
    assert str(error).startswith(f"{first}: ") and "stored here but indexed in " + second.name in str(error)
    run = run_main("verify", damaged)
    assert run.returncode == ExitCode.VERIFY_FAILED and "Traceback" not in run.stderr, run.describe()


TRUNCATE_AFTER_OPEN = """
import os, sys
from w4a8conv.errors import NotConvertedError
from w4a8conv.runtime import NpuReadyCheckpoint
ckpt = NpuReadyCheckpoint.open(sys.argv[1])
names = [n for n, f in ckpt.weight_map.items() if f == sys.argv[2]]
ckpt.tensor(names[0])  # the shard is open now
os.truncate(os.path.join(sys.argv[1], sys.argv[2]), ckpt.stored(names[-1]).offset)
try:
    ckpt.tensor(names[-1])
except NotConvertedError as exc:
    print("refused:", exc)
"""


def test_runtime_shard_truncated_after_it_was_opened_is_an_error_not_sigbus(damaged):
    """A mapping of a file that shrank kills the process with SIGBUS at the next access; positional
    reads see the end of the file. Run in a subprocess so that a SIGBUS would be the test's failure."""
    shard_file = _moe_shard(damaged)
    proc = subprocess.run([sys.executable, "-c", TRUNCATE_AFTER_OPEN, str(damaged), shard_file.name],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stderr)
    assert f"refused: {shard_file}: the file ends at byte" in proc.stdout, proc.stdout
    assert "truncated after it was checked" in proc.stdout


def test_plugin_checks_the_shards_on_disk_before_vllm_maps_them(damaged, monkeypatch):
    """The plugin's schemes check every shard's size and header against the stamp (through the runtime's
    check) once per process, before vLLM reads a tensor; a changed shard is a NotConvertedError naming it."""
    from types import ModuleType, SimpleNamespace

    from w4a8conv.runtime import vllm_ascend

    shard_file = _moe_shard(damaged)
    with open(shard_file, "ab") as f:
        f.write(b"\0" * 8)
    description = json.loads((damaged / DESCRIPTION_NAME).read_text())
    config = SimpleNamespace(quant_config=SimpleNamespace(quant_description=description),
                             model_config=SimpleNamespace(model=str(damaged)))
    fake = ModuleType("vllm.config")
    fake.get_current_vllm_config = lambda: config
    monkeypatch.setitem(sys.modules, "vllm.config", fake)
    vllm_ascend._check_shards_on_disk.cache_clear()
    with pytest.raises(NotConvertedError, match="the stamp records .*: the file changed since") as caught:
        vllm_ascend._stamp()
    assert str(shard_file) in str(caught.value)


# -- the source edited between validating and converting, or after converting ------------------------------


def _poke(path: Path, tensor: str, index: int, raw: bytes) -> None:
    """Overwrite bytes of one tensor in place: same header, same size (what an editor or a sync tool does)."""
    header, _data = read_raw(path)
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
    start = 8 + length + header[tensor]["data_offsets"][0] + index
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(raw)


def test_a_scale_edited_after_validation_is_refused_by_the_conversion(pristine, tmp_path, monkeypatch):
    """Scales are checked before writing and read again to be converted; the second read is checked
    too, so a source edited in between cannot put a negative scale into an output that exits 0."""
    import w4a8conv.api as api

    src = _copy_source(pristine[0], tmp_path / "src")
    weights = src / "quant_model_weights.safetensors"
    original = api.check_small_tensors
    name = f"{MOE}.experts.1.gate_proj.weight_scale"

    def then_edit(plan, reader):
        original(plan, reader)
        _poke(weights, name, 4 * 4, struct.pack("<f", -0.5))  # element [4, 0] of a [32, 1] F32 tensor
    monkeypatch.setattr(api, "check_small_tensors", then_edit)
    out = tmp_path / "out"
    run = run_main("convert", src, out, "--workers", "1")
    assert_clean_failure(run, ExitCode.INVALID_INPUT, [str(weights), name, "scale -0.5 at [4, 0] is not finite and "
                                                                          "non-negative"])
    assert not out.exists()


def test_verify_source_applies_the_conversion_rules_to_what_it_decodes(pristine, tmp_path):
    src = _copy_source(pristine[0], tmp_path / "src")
    weights = src / "quant_model_weights.safetensors"
    _poke(weights, f"{MOE}.experts.2.down_proj.weight_scale_second", 4 * 3, struct.pack("<f", -2.0))
    run = run_main("verify", pristine[1], "--source", src, "--all")
    assert_clean_failure(run, ExitCode.INVALID_INPUT, [f"{MOE}.experts.2.down_proj.weight_scale_second",
                                                       "scale -2.0 at [3, 0] is not finite and non-negative"])


def test_verify_source_all_reports_every_weight_byte_that_differs(pristine, tmp_path):
    """Packed "1.0.0" weights hold two int4 per byte and every byte is valid, so no rule can fail:
    `verify --source --all` compares every value and counts each one that differs."""
    src = _copy_source(pristine[0], tmp_path / "src")
    weights = src / "quant_model_weights.safetensors"
    name = f"{MOE}.experts.3.up_proj.weight"
    header, data = read_raw(weights)
    begin = header[name]["data_offsets"][0]
    _poke(weights, name, 100, bytes(b ^ 0xFF for b in data[begin + 100:begin + 103]))  # 3 bytes, 6 int4 values
    run = run_main("verify", pristine[1], "--source", src, "--all")
    assert run.returncode == ExitCode.VERIFY_FAILED, run.describe()
    assert f"problem: {MOE}.experts.3.up_proj.*: 6 of 2048 unpacked int4 values differ from the source's" in run.stderr


# -- verify accepts only what the runtime can serve, and never raises ---------------------------------------


def test_verify_refuses_a_stamp_that_records_no_module(damaged):
    """What converting a converted directory gives: every tensor passed through, nothing to serve."""
    _stamp(damaged, lambda s: s.update(modules={}))
    error = _refused(damaged)
    assert "stamp records no converted module" in str(error)
    run = run_main("verify", damaged)
    assert run.returncode == ExitCode.VERIFY_FAILED and "stamp records no converted module" in run.stderr


def test_verify_with_an_invalid_source_exits_3_and_a_damaged_output_exits_5(pristine, damaged, tmp_path):
    (tmp_path / "not-a-checkpoint").mkdir()
    run = run_main("verify", pristine[1], "--source", tmp_path / "not-a-checkpoint")
    assert_clean_failure(run, ExitCode.INVALID_INPUT, ["this is not an msModelSlim checkpoint"])
    _moe_shard(damaged).write_bytes(b"\0" * 64)
    run = run_main("verify", damaged, "--source", pristine[0], "--all")
    assert run.returncode == ExitCode.VERIFY_FAILED and "Traceback" not in run.stderr, run.describe()


def test_an_output_path_that_is_not_utf8_converts_verifies_and_serves(pristine, tmp_path):
    out = Path(os.fsdecode(bytes(tmp_path) + b"/out-\xff"))
    run = run_main("convert", pristine[0], out, "--workers", "1")
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.describe()
    run = run_main("verify", out, "--source", pristine[0], "--all")
    assert run.returncode == 0, run.describe()
    assert NpuReadyCheckpoint.open(out).moe_layer(MOE)["w13_weight"].dtype == torch.int32


def test_reliability_doc_lists_every_fault():
    doc = (REPO / "docs" / "reliability.md").read_text()
    others = ["disk-free-precheck", "resume-changed-description", "resume-changed-tensor-data",
              "resume-unreadable-journal", "resume-other-options", "rt-truncated-shard", "rt-garbage-header",
              "rt-tampered-hash", "rt-foreign-layout", "rt-future-layout-version", "rt-shard-outside", "rt-split",
              "rt-stamp-disagrees", "rt-malformed-records", "rt-swapped-shards", "rt-truncated-after-open",
              "plugin-changed-shard", "edited-after-validation", "verify-source-rules", "verify-weight-bytes",
              "verify-no-module", "verify-invalid-source", "output-not-utf8", "ro-force-resume",
              "resume-entry-is-a-directory", "second-run-locked"]
    assert not [name for name in [*FAULTS, *others] if f"`{name}`" not in doc]
