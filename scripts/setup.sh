#!/usr/bin/env bash
# Create .venv and install mindyouzhi (+ test extras with --test).  numpy<2 must be pinned in the
# same pip command as mindspore (mindspore 2.10 crashes with numpy 2).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "${1:-}" = "--test" ]; then
  .venv/bin/python -m pip install -q -e ".[test,probe]" "numpy<2"
else
  .venv/bin/python -m pip install -q -e . "numpy<2"
fi
