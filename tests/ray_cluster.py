"""A Ray cluster on the loopback interface only, for tests/test_scaleout_ray.py and benchmarks/bench_ray.py.

Ray replaces 127.0.0.1 by the host's routable address and probes 8.8.8.8 to find it; inside a network
namespace that holds only `lo` it has nothing else to pick. The head, the worker nodes and the driver
run in one namespace (network, PID and mount: `unshare`), entered with `nsenter`; killing the process
that holds the namespace kills every process in it, so stopping the cluster leaves nothing behind.
Ray comes from a cached environment (tests/producer_envs.py) that sees the project's packages; w4a8conv
itself is found through PYTHONPATH (this checkout).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from producer_envs import ProducerEnv, ProducerUnavailable, ensure_env

__all__ = ["RAY", "ClusterUnavailable", "LoopbackCluster", "ray_python"]

RAY = ProducerEnv("ray-2.60.0", ("ray==2.60.0",))
REPO = Path(__file__).resolve().parents[1]


class ClusterUnavailable(RuntimeError):
    """Ray cannot be installed, or no namespace can be made here."""


def ray_python() -> Path:
    try:
        return ensure_env(RAY)[0]
    except ProducerUnavailable as exc:
        raise ClusterUnavailable(f"{RAY.requirements[0]} cannot be installed: {exc}") from None


class LoopbackCluster:
    """`nodes` Ray nodes of `cpus` CPUs each (the first is the head), in a namespace that holds only `lo`."""

    def __init__(self, python: Path, *, nodes: int = 2, cpus: int = 1, port: int = 6390):
        self.python, self.nodes, self.cpus, self.port = python, nodes, cpus, port
        self.address = f"127.0.0.1:{port}"
        self.temp = Path(tempfile.mkdtemp(prefix="w4r-"))  # short: Ray's socket paths must fit in 107 bytes
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        self.env.update(RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}",
                        COLUMNS="400", NO_COLOR="1", TERM="dumb")
        self.holder: subprocess.Popen | None = None
        self.inside = 0

    def __enter__(self) -> "LoopbackCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def command(self, *args: str | Path) -> list[str]:
        """`args` run inside the namespace, from the cluster's temporary directory."""
        return ["nsenter", "-t", str(self.inside), "-n", "-p", "-m", f"--wd={self.temp}", "--", *map(str, args)]

    def run(self, *args: str | Path, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(*args), capture_output=True, text=True, env=self.env, timeout=timeout)

    def start(self) -> None:
        try:
            self.holder = subprocess.Popen(["unshare", "--net", "--pid", "--mount", "--fork", "--kill-child",
                                            "--mount-proc", "sh", "-c", "ip link set lo up && exec sleep 100000"],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        except OSError as exc:
            raise ClusterUnavailable(f"cannot run unshare: {exc}") from None
        children = Path(f"/proc/{self.holder.pid}/task/{self.holder.pid}/children")
        deadline = time.monotonic() + 10
        while not (pids := children.read_text().split() if children.exists() else []):
            if self.holder.poll() is not None or time.monotonic() > deadline:
                raise ClusterUnavailable(f"unshare cannot make a namespace here: "
                                         f"{self.holder.stderr.read().decode().strip()}")
            time.sleep(0.05)
        self.inside = int(pids[0])
        ray = self.python.parent / "ray"
        head = ["--head", "--port", str(self.port), "--include-dashboard=false", "--disable-usage-stats",
                "--temp-dir", self.temp / "ray"]
        for node in range(self.nodes):
            done = self.run(ray, "start", "--node-ip-address=127.0.0.1", f"--num-cpus={self.cpus}",
                            *(head if node == 0 else ["--address", self.address]), timeout=180)
            if done.returncode:
                raise RuntimeError(f"ray start failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")

    def stop(self) -> None:
        if self.holder is not None and self.holder.poll() is None:
            self.holder.send_signal(signal.SIGKILL)  # --kill-child: the namespace's first process, then all of it
            self.holder.wait()
        shutil.rmtree(self.temp, ignore_errors=True)
