"""`convert --engine ray` (issue 14) on a real Ray cluster: a head and one worker node on the loopback
interface, started and stopped by the test (tests/ray_cluster.py). The output is byte-identical to a
single-host `convert`, from the CLI, from the example driver, and after a Ray worker is SIGKILLed in the
middle of a shard (Ray runs the task again; the task resumes its journal). The cluster examples'
Slurm and Kubernetes commands run here too, as plain processes.

Ray is installed at test time into a cached environment (~250 MB, ~40 s the first time); without a
package index or `unshare` the tests skip, and fail under $CI.
"""
from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import running_in_ci
from ray_cluster import ClusterUnavailable, LoopbackCluster, ray_python
from robustness_support import REPO, build, file_hashes
from w4a8conv.api import ConvertOptions, convert
from w4a8conv.scaleout import commit, plan

SHARD = 40_000  # 14 shards of "v1-multi"
EXAMPLES = REPO / "examples" / "cluster"


def unavailable(reason: str):
    if running_in_ci():
        pytest.fail(reason + " ($CI is set: the Ray engine tests must run)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def python() -> Path:
    try:
        return ray_python()
    except ClusterUnavailable as exc:
        unavailable(str(exc))


@pytest.fixture(scope="module")
def cluster(python):
    try:
        with LoopbackCluster(python, nodes=2) as running:
            yield running
    except ClusterUnavailable as exc:
        unavailable(str(exc))


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return build("v1-multi", tmp_path_factory.mktemp("ray") / "src")


@pytest.fixture(scope="module")
def single(source, tmp_path_factory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("ray-single") / "out"
    convert(source, out, options=ConvertOptions(max_shard_bytes=SHARD, workers=1))
    return file_hashes(out)


def test_ray_engine_on_two_nodes_writes_the_single_host_bytes(cluster, source, single, tmp_path):
    out = tmp_path / "out"
    done = cluster.run(cluster.python, "-m", "w4a8conv", "convert", source, out, "--engine", "ray",
                       "--ray-address", cluster.address, "--max-shard-size", str(SHARD), "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert (summary["tasks"], summary["shards"], summary["nodes"]) == (14, 14, 2)
    assert file_hashes(out) == single  # the plan and the task journals gone, the stamp identical
    example = tmp_path / "example"
    done = cluster.run(cluster.python, EXAMPLES / "ray_driver.py", source, example, "--address", cluster.address,
                       "--tasks", "3", "--max-shard-size", str(SHARD))
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1])["tasks"] == 3
    assert file_hashes(example) == single


SLOW_DRIVER = """
import sys
import ray
from w4a8conv.api import ConvertOptions
from w4a8conv.ray_engine import convert_on_ray

# every worker of this job converts slowly (tests/ray_slow_worker.py), so the test can kill one mid-shard
ray.init(address=sys.argv[1], runtime_env={"worker_process_setup_hook": "ray_slow_worker.install"})
print(convert_on_ray(sys.argv[2], sys.argv[3], tasks=4, options=ConvertOptions(max_shard_bytes=int(sys.argv[4]))))
"""


def task_workers() -> list[int]:
    """Ray worker processes running one of our tasks (Ray titles them after the task: w4a8conv-task-I)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(b"ray::w4a8conv-task-"):
                found.append(int(proc.name))
        except OSError:
            pass
    return found


def test_a_ray_worker_killed_mid_task_is_retried_to_the_single_host_bytes(cluster, source, single, tmp_path):
    out, driver = tmp_path / "out", tmp_path / "driver.py"
    driver.write_text(SLOW_DRIVER)
    proc = subprocess.Popen(cluster.command(cluster.python, driver, cluster.address, source, out, SHARD),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cluster.env)
    try:
        deadline = time.monotonic() + 180
        while not (any(out.glob("model-*")) and any(out.glob(".model-*.partial")) and (workers := task_workers())):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        victim = workers[0]
        os.kill(victim, signal.SIGKILL)  # mid-shard: a shard is in place and another being written
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    summary = ast.literal_eval(stdout.splitlines()[-1])
    assert (summary["tasks"], summary["nodes"]) == (4, 2)
    assert file_hashes(out) == single


def test_the_slurm_and_kubernetes_examples_run_plan_tasks_commit(python, source, single, tmp_path):
    out = tmp_path / "out"
    plan(source, out, 2, options=ConvertOptions(max_shard_bytes=SHARD))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               SLURM_CPUS_PER_TASK="1")
    slurm = subprocess.run(["bash", EXAMPLES / "slurm.sbatch", source, out, "--max-shard-size", str(SHARD)],
                           env={**env, "SLURM_ARRAY_TASK_ID": "0"}, capture_output=True, text=True, timeout=300)
    assert slurm.returncode == 0, slurm.stderr
    # The Indexed Job's task command, as the manifest holds it (PyYAML comes with Ray), for index 1.
    parse = "import json, sys, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))"
    jobs = json.loads(subprocess.run([python, "-c", parse, EXAMPLES / "kubernetes-job.yaml"], check=True,
                                     capture_output=True, text=True).stdout)
    assert [j["metadata"]["labels"]["w4a8conv-step"] for j in jobs] == ["plan", "tasks", "commit"]
    tasks = jobs[1]["spec"]
    assert tasks["completionMode"] == "Indexed" and tasks["completions"] == tasks["parallelism"]
    command = tasks["template"]["spec"]["containers"][0]["command"]
    line = command[2].replace("/models/src", str(source)).replace("/models/out", str(out)) \
        .replace("4GB", str(SHARD))
    k8s = subprocess.run([*command[:2], line], env={**env, "JOB_COMPLETION_INDEX": "1"}, capture_output=True,
                         text=True, timeout=300)
    assert k8s.returncode == 0, k8s.stderr
    commit(out)
    assert file_hashes(out) == single
    usage = subprocess.run(["bash", EXAMPLES / "slurm.sbatch", source, out], env=env, capture_output=True, text=True)
    assert usage.returncode == 1 and "not a job array element" in usage.stderr
