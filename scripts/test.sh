#!/usr/bin/env bash
# Set up (idempotent) and run the test suite.  Tests that need the shared data/models are marked
# `shared`: without that folder they are skipped (-rs prints why), under CI=true they fail.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
export MINDYOUZHI_SHARED="${MINDYOUZHI_SHARED:-$(cd .. && pwd)/shared}"
exec .venv/bin/python -m pytest -q -rs "$@"
