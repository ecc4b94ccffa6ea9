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
.venv/bin/python -m pip install -q -c constraints.txt -e ".[torch,server,test,ray,lightning,transformers]" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import flightlog, torch, sklearn, fastapi, moto, ray, xdist" >/dev/null

# Browser for the UI tests (tests/test_ui_browser.py): Debian's chromium, driven by playwright-python
# (a test dependency) through executable_path -- never `playwright install`, which downloads a browser.
if ! command -v chromium >/dev/null 2>&1 && [ ! -x /usr/lib/chromium/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -q && apt-get install -y -q --no-install-recommends chromium fonts-liberation; } </dev/null >/dev/null 2>&1 \
      || echo "setup: could not install chromium; the browser tests will be skipped" >&2
  else
    echo "setup: chromium not found (run 'apt-get install chromium' as root); the browser tests will be skipped" >&2
  fi
fi
