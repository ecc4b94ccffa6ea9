#!/usr/bin/env bash
# Set up, then run the main demo: record a real training run, query it, replay it with new log statements.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source .venv/bin/activate
bash examples/demo.sh
