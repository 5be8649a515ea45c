#!/usr/bin/env bash
# Create .venv with w4a8conv, its compiled kernels (extra fast) and its test dependencies (torch pinned to the CPU build).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c .ci/constraints.txt -e ".[test,fast]"
