"""Ray's `worker_process_setup_hook` for tests/test_scaleout_ray.py: in the Ray worker that runs it, every
produced piece takes 100 ms longer (tests/fault_wrapper.py's `slow` fault), so the test can kill the worker
in the middle of a shard."""
from __future__ import annotations

import os


def install() -> None:
    os.environ.update(W4A8_FAULT="slow", W4A8_FAULT_ARG="0.1")
    import fault_wrapper  # noqa: F401 - the fault is applied on import
