#!/usr/bin/env bash
# Set up, then run the test suite (pytest exit code 5, "no tests collected", counts as a failure here).
# Test files run in parallel worker processes (pytest-xdist), one per core up to 4, a whole file per worker
# (--dist loadfile) so module fixtures -- a recorded run, a Ray cluster, a browser -- are built once;
# tests/conftest.py hands out the longest files first. PYTEST_XDIST_AUTO_NUM_WORKERS=N sets the count,
# and extra arguments go to pytest (`bash scripts/test.sh -m "not slow"`, `... -p no:xdist` for one process).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
xdist=(-n auto --maxprocesses 4 --dist loadfile --no-loadscope-reorder)
for a in "$@"; do
  if [ "$a" = "no:xdist" ]; then xdist=(); fi
done
set +e
.venv/bin/python -m pytest -q -p no:cacheprovider "${xdist[@]}" "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
