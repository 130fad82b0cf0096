#!/usr/bin/env bash
# The GPU device check of issue 19 in one call (budget: under 8 minutes on one H200):
#   1. the triton kernel tests, compiled on the GPU (tests/test_triton_kernels.py: every kernel
#      against its torch reference, plus the `gpu`-marked ones), then any other `gpu` tests;
#   2. benchmarks/gpu_bench.py: figures (a)-(e) on random-weight models made on the device.
# The machine has torch (CUDA), triton and transformers but no network: nothing is downloaded.
# Anything else it lacks (pytest...) is installed from wheels in $GPU_WHEELS (default
# .gpu-wheels/, git-ignored; fill it here with `pip download pytest -d .gpu-wheels`).
#
#   scripts/gpu_check.sh [extra gpu_bench.py args, e.g. --no-sweep or --parts ab]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
WHEELS=${GPU_WHEELS:-.gpu-wheels}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export LOWBIT_NO_EXT=1  # the CPU C++ kernels are not what is checked here: skip their build
unset TRITON_INTERPRET
start=$(date +%s)

$PY - <<'PYEOF' || exit 1
import torch
print(f"torch {torch.__version__}, cuda {torch.version.cuda}, available {torch.cuda.is_available()}")
if not torch.cuda.is_available():
    raise SystemExit("no CUDA device: this check needs a GPU")
import triton
print(f"triton {triton.__version__}; device {torch.cuda.get_device_name()}")
PYEOF

if ! $PY -c "import pytest" 2>/dev/null; then
  if [ -d "$WHEELS" ]; then
    $PY -m pip install -q --no-index --find-links "$WHEELS" pytest || echo "pytest install from $WHEELS failed"
  else
    echo "pytest missing and no $WHEELS/ wheel folder: tests skipped"
  fi
fi

status=0
if $PY -c "import pytest" 2>/dev/null; then
  echo "== triton kernel tests (GPU)"
  timeout 240 $PY -m pytest -q -p no:cacheprovider -o addopts="" tests/test_triton_kernels.py || status=1
  echo "== other gpu-marked tests"
  timeout 60 $PY -m pytest -q -p no:cacheprovider -o addopts="" -m gpu tests --ignore=tests/test_triton_kernels.py
  rc=$?; [ $rc -ne 0 ] && [ $rc -ne 5 ] && status=1  # 5: none collected
fi
echo "== tests took $(( $(date +%s) - start )) s"

echo "== gpu_bench"
budget=$(( 460 - ($(date +%s) - start) )); [ $budget -lt 120 ] && budget=120
timeout $budget $PY benchmarks/gpu_bench.py "$@" || status=1
echo "== total $(( $(date +%s) - start )) s, status $status"
exit $status
