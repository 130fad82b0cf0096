#!/usr/bin/env bash
# Idempotent environment setup: venv, CPU torch (installed first so no CUDA build is pulled), lowbit + dev and
# cluster (ray, for tests/test_cluster.py) deps.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.lowbit-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[dev,cluster]"
  touch "$stamp"
fi
# Compile the AVX2 kernels now (cached by source hash; ~30 s once) rather than on the first request.
.venv/bin/python -m lowbit.layers.kernels
