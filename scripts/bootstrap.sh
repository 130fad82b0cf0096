#!/usr/bin/env bash
# Idempotent environment setup: venv, CPU torch (installed first so no CUDA build is pulled), lowbit + dev and
# cluster (ray, for tests/test_cluster.py) deps.
# Installing lowbit compiles its C++ CPU kernels (setup.py, one module per instruction-set variant), so
# nothing compiles at first use; they are rebuilt here whenever setup.py or a kernel source changes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.lowbit-installed
if [ ! -f "$stamp" ] || [ -n "$(find pyproject.toml setup.py lowbit/kernels/csrc -newer "$stamp" -print -quit)" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first (the CPU build), the build backend (a no-isolation build uses the venv's), and ninja,
  # which compiles the kernels' sources in parallel
  .venv/bin/python -m pip install -q "torch==2.13.0" "setuptools>=64" wheel "ninja>=1.11"
  # --no-build-isolation: the kernels build against the torch just installed (an isolated build
  # would fetch the default CUDA torch to build with)
  .venv/bin/python -m pip install -q --no-build-isolation -e ".[dev,cluster]"
  touch "$stamp"
fi
