#!/usr/bin/env bash
# One command on a fresh machine: install everything (venv, CPU torch, deps, default model), then run the
# main job end to end: quantize the default model with AWQ, compare perplexity FP vs RTN vs AWQ, and serve it.
set -euo pipefail
cd "$(dirname "$0")"
./scripts/bootstrap.sh
exec ./scripts/main_job.sh "$@"
