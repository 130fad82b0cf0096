#!/usr/bin/env bash
# Runs the whole test suite (fast unit tests on tiny models + slow checks on the real default model).
# Pass pytest options through, e.g. ./run_tests.sh -m "not slow" for the fast subset.
set -euo pipefail
cd "$(dirname "$0")"
./scripts/bootstrap.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
