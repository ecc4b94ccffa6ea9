#!/usr/bin/env bash
# Install the logging peers of bench/log_overhead.py into bench/.venv (never the project venv).
#
#   bash bench/_peers_setup.sh
#
# bench/.venv is shared by several benchmarks: create it when missing, otherwise only ADD
# packages to it. Every peer is installed on its own, so one that fails to install is
# reported and the others still go in. Existing packages are pinned with a constraints file
# so that adding a peer never up- or downgrades what another benchmark relies on.
#
# torch (for torch.utils.tensorboard) is the local CPU wheel 2.13.0, installed with
# --no-deps: its metadata asks for setuptools>=77, which would replace the venv's setuptools;
# nothing torch.utils.tensorboard needs at run time comes from setuptools.
set -u
cd "$(dirname "$0")/.."
VENV=bench/.venv
PY=$VENV/bin/python
PIP="$VENV/bin/pip --disable-pip-version-check -q"

if [ ! -x "$PY" ]; then
  python3 -m venv "$VENV" || { echo "cannot create $VENV"; exit 1; }
fi
if ! "$PY" -c "import flightlog" 2>/dev/null; then
  $PIP install -e . || { echo "cannot install flightlog into $VENV"; exit 1; }
fi

PINS=$(mktemp)
trap 'rm -f "$PINS"' EXIT
$VENV/bin/pip freeze --exclude-editable 2>/dev/null | grep -v '^-e ' > "$PINS"

status=0
want() {  # want <import name> <pip args...>
  local mod=$1; shift
  if "$PY" -c "import $mod" 2>/dev/null; then
    echo "ok       $mod (already installed)"
    return
  fi
  if timeout 600 $PIP install -c "$PINS" "$@" >/tmp/peers_setup_$$.log 2>&1 && "$PY" -c "import $mod" 2>/dev/null; then
    echo "ok       $mod (installed: $*)"
    $VENV/bin/pip freeze --exclude-editable 2>/dev/null | grep -v '^-e ' > "$PINS"
  else
    echo "FAILED   $mod: $(tail -n 3 /tmp/peers_setup_$$.log | tr '\n' ' ')"
    status=1
  fi
  rm -f /tmp/peers_setup_$$.log
}

want tensorboard tensorboard            # the event-file reader (EventAccumulator) and protos
want tensorboardX tensorboardX          # SummaryWriter without torch (fallback)
want sympy sympy networkx fsspec "filelock<4"   # torch's run-time dependencies (filelock<4: aim needs it)
want torch --no-deps torch==2.13.0      # torch.utils.tensorboard.SummaryWriter
want mlflow mlflow
want wandb wandb
want aim aim
want sklearn scikit-learn               # the digits data of bench/train_digits.py (FlorDB's copy runs here)
want flordb flordb==4.0.1                # bench/_flordb.py: FlorDB's record and replay, side by side
# bench/integrations_overhead.py next to each framework's TensorBoard logger (same versions as the project's extras)
want lightning lightning==2.6.6
want transformers transformers==5.24.0 accelerate==1.15.0
exit $status
