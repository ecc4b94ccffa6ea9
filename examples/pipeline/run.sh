#!/usr/bin/env bash
# Runs the two pipeline scripts (two processes, two runs) and shows the lineage
# of the model's training step back to the raw CSV.
#   examples/pipeline/run.sh            (uses $FLIGHTLOG_HOME, default ./.flightlog)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
PY="${PYTHON:-python}"
FLIGHTLOG="${FLIGHTLOG:-$PY -m flightlog.cli}"
$PY "$HERE/prepare.py"
$PY "$HERE/train.py"
SPAN=$($FLIGHTLOG sql "select span_id from spans where name = 'train' order by start_time desc limit 1" \
       --format csv | tail -n 1 | tr -d '"')
echo
echo "== flightlog lineage $SPAN   (where the model's training data came from)"
$FLIGHTLOG lineage "$SPAN"
echo
echo "== flightlog lineage $HERE/data/wine.csv --down   (everything made from the raw file)"
$FLIGHTLOG lineage "$HERE/data/wine.csv" --down
echo
echo "== flightlog history clean"
$FLIGHTLOG history clean
