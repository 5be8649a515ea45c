"""Shared fixtures: synthetic checkpoints (one per preset, built once per session) and conversions."""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import settings

import vllm_ascend_harness as harness
from w4a8conv.api import convert
from w4a8conv.synthetic import PRESETS, SyntheticSpec, write_checkpoint


@pytest.fixture(scope="session")
def preset_source(tmp_path_factory):
    """preset_source(name, **overrides) -> a read-only-by-convention source directory, cached."""
    cache: dict[tuple, Path] = {}

    def build(name: str, **overrides) -> Path:
        key = (name, tuple(sorted(overrides.items())))
        if key not in cache:
            spec: SyntheticSpec = replace(PRESETS[name], **overrides)
            cache[key] = write_checkpoint(tmp_path_factory.mktemp(f"src-{name}"), spec)
        return cache[key]

    return build


@pytest.fixture(scope="session")
def converted(preset_source, tmp_path_factory):
    """converted(name, **overrides) -> (source dir, converted dir), cached."""
    cache: dict[tuple, tuple[Path, Path]] = {}

    def build(name: str, **overrides) -> tuple[Path, Path]:
        key = (name, tuple(sorted(overrides.items())))
        if key not in cache:
            source = preset_source(name, **overrides)
            output = tmp_path_factory.mktemp(f"out-{name}") / "npu"
            convert(source, output)
            cache[key] = (source, output)
        return cache[key]

    return build


def running_in_ci() -> bool:
    """$CI set: a tier that cannot get what it needs fails instead of skipping."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


# Local runs draw new examples every time (the property tests keep no database); CI draws the same
# ones from a fixed seed, so a red CI is reproducible and never a roll of the dice.
settings.register_profile("ci", derandomize=True)
if running_in_ci():
    settings.load_profile("ci")


@pytest.fixture(scope="session")
def vllm_ascend_wheel() -> Path:
    """vllm-ascend's wheel for the harness; skipped where it cannot be had, a failure under $CI."""
    try:
        return harness.find_wheel()
    except harness.HarnessUnavailable as exc:
        reason = f"vllm-ascend {harness.VLLM_ASCEND_VERSION} wheel unavailable: {exc}"
        if running_in_ci():
            pytest.fail(reason + " ($CI is set: the equivalence tests must run)")
        pytest.skip(reason)
