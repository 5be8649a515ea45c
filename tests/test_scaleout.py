"""A distributed run (issue 14): plan -> tasks as separate processes -> commit gives exactly the files and
bytes a single-host `convert` with the same options writes, after a task killed mid-shard too; the commit
refuses missing or altered shards naming the task; the plan and the task journals are gone after it."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from robustness_support import CLI_ENV, REPO, assert_clean_failure, build, file_hashes, run_main
from w4a8conv.api import ConvertOptions, convert
from w4a8conv.constants import DESCRIPTION_NAME, ExitCode
from w4a8conv.errors import IncompleteOutputError, OutputLocationError, UsageError
from w4a8conv.journal import JOURNAL_NAME, PLAN_NAME, task_journal_name
from w4a8conv.plan import make_plan
from w4a8conv.route import OutputRoute
from w4a8conv.scaleout import commit, plan, run_task
from w4a8conv.source import open_source
from w4a8conv.tasks import cut_tasks, hold_task
from w4a8conv.verify import verify

SHARD = 40_000  # "v1-multi" makes 14 output shards at this size
OPTIONS = ConvertOptions(max_shard_bytes=SHARD, workers=1)
FAULT_WRAPPER = REPO / "tests" / "fault_wrapper.py"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return build("v1-multi", tmp_path_factory.mktemp("scaleout") / "src")


@pytest.fixture(scope="module")
def single(source, tmp_path_factory) -> dict[str, str]:
    """Every file a single-host run writes, by name: its sha256."""
    out = tmp_path_factory.mktemp("single") / "out"
    convert(source, out, options=OPTIONS)
    return file_hashes(out)


def task_process(source: Path, out: Path, index: int, *, fault: tuple[str, str] | None = None) -> subprocess.Popen:
    """`w4a8conv convert SRC OUT --task I --json` as its own process (through the fault wrapper with `fault`)."""
    env = dict(CLI_ENV, **({"W4A8_FAULT": fault[0], "W4A8_FAULT_ARG": fault[1]} if fault else {}))
    entry = [str(FAULT_WRAPPER)] if fault else ["-m", "w4a8conv.cli"]
    return subprocess.Popen([sys.executable, *entry, "convert", str(source), str(out), "--task", str(index),
                             "--max-shard-size", str(SHARD), "--workers", "1", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    stdout, stderr = proc.communicate(timeout=300)
    return proc.returncode, stdout, stderr


def wait_until(check, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.parametrize("count", [1, 2, 3])
def test_tasks_as_separate_processes_commit_to_the_single_host_bytes(source, single, tmp_path, count):
    out = tmp_path / "out"
    planned = plan(source, out, count, options=OPTIONS).plan
    shards = sorted(n for n in single if n.startswith("model-"))
    assert len(shards) == 14 and len(planned.tasks) == count
    assert sorted(n for t in planned.tasks for n in t.shards) == shards  # each shard in exactly one task
    assert [p.name for p in out.iterdir()] == [PLAN_NAME]  # the plan writes nothing else
    runs = [finish(p) for p in [task_process(source, out, t.index) for t in planned.tasks]]  # all at once
    for task, (code, stdout, stderr) in zip(planned.tasks, runs):
        assert code == 0, stderr
        summary = json.loads(stdout)
        assert summary["task"] == task.index and [s["file"] for s in summary["shards"]] == list(task.shards)
        assert summary["finished_before"] == 0
    assert not (out / DESCRIPTION_NAME).exists() and verify(out).ok is False  # incomplete until the commit
    report = commit(out)
    assert (report.tasks, report.shards) == (count, 14)
    assert file_hashes(out) == single  # every file, the stamp included; the plan and task journals gone
    assert verify(out).ok


def test_cut_tasks_balances_whole_shards_by_bytes_largest_first(source):
    route = OutputRoute.of(make_plan(open_source(source)), Path("unused"), SHARD)
    sizes = {s.file_name: s.data_bytes for s in route.shards}
    tasks = cut_tasks(route.plan, route.shards, 3)
    # Largest first, each to the lightest task: the three largest open the three tasks, and no task
    # ends more than one shard (the last it took) above another.
    loads = [t.bytes for t in tasks]
    assert loads == [sum(sizes[n] for n in t.shards) for t in tasks]
    largest = sorted(sizes, key=lambda n: (-sizes[n], n))[:3]
    assert [next(t.index for t in tasks if n in t.shards) for n in largest] == [0, 1, 2]
    assert max(loads) - min(loads) <= max(sizes.values())
    assert all(list(t.shards) == sorted(t.shards) for t in tasks)  # plan order within a task
    assert all(t.peak_memory_bytes > 0 for t in tasks)
    assert cut_tasks(route.plan, route.shards, 3) == tasks  # the shard list alone decides it
    with pytest.raises(UsageError, match="the output has 14 shard"):
        cut_tasks(route.plan, route.shards, 15)


def test_a_task_killed_mid_shard_runs_again_to_the_same_bytes(source, single, tmp_path):
    out = tmp_path / "out"
    planned = plan(source, out, 2, options=OPTIONS).plan
    proc = task_process(source, out, 0, fault=("slow", "0.05"))
    try:
        wait_until(lambda: any(out.glob("model-*")) and any(out.glob(".model-*.partial")), 120)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    journal = json.loads((out / task_journal_name(0)).read_text())
    assert journal["shards"] and len(journal["shards"]) < len(planned.tasks[0].shards)
    assert [p.name for p in out.glob(".model-*.partial")]
    # A partial file of another task (running on another host) is not the re-run's to remove.
    other = out / f".{planned.tasks[1].shards[0]}.partial"
    other.write_bytes(b"task 1 is writing this")
    code, stdout, stderr = finish(task_process(source, out, 0))
    assert code == 0, stderr
    assert json.loads(stdout)["finished_before"] == len(journal["shards"])
    assert other.read_bytes() == b"task 1 is writing this"
    assert sorted(p.name for p in out.glob(".*.partial")) == [other.name]
    run_task(source, out, 1, options=OPTIONS)
    commit(out)
    assert file_hashes(out) == single


def test_a_finished_task_run_again_rechecks_and_writes_nothing(source, tmp_path):
    out = tmp_path / "out"
    plan(source, out, 2, options=OPTIONS)
    first = run_task(source, out, 1, options=OPTIONS)
    stamps = {s.file_name: (out / s.file_name).stat().st_mtime_ns for s in first.shards}
    again = run_task(source, out, 1, options=OPTIONS)
    assert again.finished_before == len(first.shards) and again.shards == first.shards
    assert {name: (out / name).stat().st_mtime_ns for name in stamps} == stamps


def test_commit_refuses_missing_and_altered_shards_naming_the_task(source, single, tmp_path):
    out = tmp_path / "out"
    planned = plan(source, out, 3, options=OPTIONS).plan
    run_task(source, out, 0, options=OPTIONS)
    run_task(source, out, 1, options=OPTIONS)
    altered = out / planned.tasks[1].shards[-1]
    data = bytearray(altered.read_bytes())
    data[-1] ^= 0xFF
    altered.write_bytes(bytes(data))
    refused = run_main("commit", out, "--json")
    line = assert_clean_failure(refused, ExitCode.INCOMPLETE, [
        "2 of 3 task(s) not finished",
        f"task 1: {altered.name} altered since the task wrote it",
        f"task 2: not started (no {task_journal_name(2)})", "tasks to run: 1, 2"])
    assert json.loads(refused.stdout)["tasks"] == [1, 2], line
    missing = out / planned.tasks[0].shards[0]
    missing.unlink()
    with pytest.raises(IncompleteOutputError, match=f"task 0: {missing.name} missing") as caught:
        commit(out)
    assert caught.value.tasks == [0, 1, 2]
    assert not (out / DESCRIPTION_NAME).exists() and (out / PLAN_NAME).exists()  # refused: nothing committed
    assert run_main("verify", out).returncode == ExitCode.VERIFY_FAILED
    for task in planned.tasks:  # a re-run writes what is missing or altered
        run_task(source, out, task.index, options=OPTIONS)
    assert run_main("commit", out).returncode == 0
    assert file_hashes(out) == single
    assert run_main("verify", out).returncode == 0
    assert_clean_failure(run_main("commit", out), ExitCode.USAGE, ["no plan"])


def test_a_task_refuses_a_changed_source_other_options_and_a_bad_index(source, tmp_path):
    copy = Path(shutil.copytree(source, tmp_path / "src"))
    out = tmp_path / "out"
    plan(copy, out, 2, options=OPTIONS)
    with pytest.raises(OutputLocationError, match=r"other options than the plan's: max_shard_bytes 50000 "
                                                  r"\(the plan's: 40000\)"):
        run_task(copy, out, 0, options=ConvertOptions(max_shard_bytes=50_000, workers=1))
    with pytest.raises(OutputLocationError, match="other options than the plan's: model_dtype 'float16'"):
        run_task(copy, out, 0, options=ConvertOptions(max_shard_bytes=SHARD, model_dtype="float16", workers=1))
    with pytest.raises(UsageError, match="--task 2: the plan in .* has tasks 0 to 1"):
        run_task(copy, out, 2, options=OPTIONS)
    weights = sorted(copy.glob("*.safetensors"))[0]
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    with pytest.raises(OutputLocationError, match="the source changed since the plan"):
        run_task(copy, out, 0, options=OPTIONS)
    with pytest.raises(OutputLocationError, match="the source changed since the plan"):
        commit(out)
    assert sorted(p.name for p in out.iterdir()) == [PLAN_NAME]  # nothing written by the refused runs


def test_one_task_runs_in_one_process_at_a_time_and_commit_waits_for_the_tasks(source, tmp_path):
    out = tmp_path / "out"
    plan(source, out, 2, options=OPTIONS)
    with hold_task(out, 0):  # this process runs task 0
        code, _stdout, stderr = finish(task_process(source, out, 0))
        assert code == ExitCode.USAGE and "task 0 is being run by another process" in stderr
        code, _stdout, stderr = finish(task_process(source, out, 1))
        assert code == 0, stderr  # the other task runs alongside
    route = OutputRoute.of(make_plan(open_source(source)), out, SHARD)
    with route.prepare_part([route.shards[0]], task_journal_name(0), []):  # a task under way
        with pytest.raises(OutputLocationError, match="another w4a8conv run is writing into this directory"):
            commit(out)
        assert_clean_failure(run_main("convert", source, out, "--max-shard-size", str(SHARD), "--force"),
                             ExitCode.USAGE, ["another w4a8conv run is writing into this directory"])


def test_force_replaces_a_distributed_run_and_plan_refuses_an_occupied_directory(source, single, tmp_path):
    out = tmp_path / "out"
    plan(source, out, 3, options=OPTIONS)
    run_task(source, out, 2, options=OPTIONS)
    assert_clean_failure(run_main("plan", source, out, "--tasks", "2", "--max-shard-size", str(SHARD)),
                         ExitCode.USAGE, ["exists and is not empty"])
    replanned = run_main("plan", source, out, "--tasks", "2", "--max-shard-size", str(SHARD), "--force", "--json")
    assert replanned.returncode == 0, replanned.describe()
    assert [t["index"] for t in json.loads(replanned.stdout)["tasks"]] == [0, 1]
    assert sorted(p.name for p in out.iterdir()) == [PLAN_NAME]  # the previous task's shards and journal went
    run_task(source, out, 0, options=OPTIONS)
    # A single-host run replaces a distributed one's files as its own.
    convert(source, out, options=ConvertOptions(max_shard_bytes=SHARD, workers=1, force=True))
    assert file_hashes(out) == single and JOURNAL_NAME not in single


def test_plan_prints_every_task_and_the_commands(source, tmp_path):
    out = tmp_path / "out"
    printed = run_main("plan", source, out, "--tasks", "3", "--max-shard-size", str(SHARD))
    assert printed.returncode == 0, printed.describe()
    lines = printed.stdout.splitlines()
    assert lines[0].startswith("planned 3 task(s), 14 shard(s)")
    assert [line.split(":")[0] for line in lines[1:4]] == ["task 0", "task 1", "task 2"]
    assert f"--task I (I from 0 to 2, with the same options), then: w4a8conv commit {out}" in lines[4]
    recorded = json.loads((out / PLAN_NAME).read_text())
    assert recorded["options"] == {"max_shard_bytes": SHARD, "model_dtype": None, "group_size": None}
    assert recorded["source"] == str(source.absolute())
    assert sum(t["bytes"] for t in recorded["tasks"]) == sum(
        s.data_bytes for s in OutputRoute.of(make_plan(open_source(source)), out, SHARD).shards)
    usage = run_main("convert", source, out, "--task", "0", "--resume")
    assert_clean_failure(usage, ExitCode.USAGE, ["--task runs one task of a plan"])
