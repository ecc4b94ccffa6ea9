#!/usr/bin/env bash
# Create ./.venv with flightlog (editable) and everything the demo and tests need.
# torch is pinned to the CPU build through constraints.txt (a looser pin downloads CUDA wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -c constraints.txt -e ".[torch,server,test]" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import flightlog, torch, sklearn, fastapi" >/dev/null
