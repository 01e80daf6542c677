#!/usr/bin/env bash
# Creates .venv when missing and installs the project with what the tests need.
# torch is pinned to 2.13.0: these machines hold its CPU build on disk, and an unpinned
# or newer torch downloads a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=.venv/.installed-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip "setuptools>=77"  # the wheel test builds without isolation
  .venv/bin/python -m pip install -q torch==2.13.0
  .venv/bin/python -m pip install -q -e ".[dev,hf]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
