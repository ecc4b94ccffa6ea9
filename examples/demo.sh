#!/usr/bin/env bash
# The flightlog demo: record a real training run, ask questions in SQL, then replay it with new log
# statements (hindsight logging) and check the run's health. Uses ./demo-run as its working folder.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
WORK="${DEMO_DIR:-$PWD/demo-run}"
rm -rf "$WORK" && mkdir -p "$WORK" && cd "$WORK"
export FLIGHTLOG_HOME="$WORK/.flightlog"
cp "$HERE/digits.py" train.py

step() { printf '\n\033[1m== %s\033[0m\n$ %s\n' "$1" "$2"; }

step "1. Record: train a CNN on scikit-learn's digits (loss per batch, accuracy per epoch, checkpoints)" \
     "python train.py --epochs 6"
now() { python3 -c 'import time; print(time.time())'; }
t_rec=$(now)
python train.py --epochs 6
t_rec=$(python3 -c "import time; print(time.time() - $t_rec)")  # what running the script again costs

step "2. The run" "flightlog runs; flightlog show latest"
flightlog runs
flightlog show latest

step "3. Ask in SQL" "flightlog sql \"SELECT epoch, round(avg(value), 4) AS mean_loss ... GROUP BY epoch\""
flightlog sql "SELECT epoch, round(avg(value), 4) AS mean_loss, round(min(value), 4) AS best_batch
               FROM metrics WHERE name = 'loss' GROUP BY epoch ORDER BY epoch"

step "4. Hindsight: add two log statements today, for last week's run" \
     "add fl.log(\"grad_norm\", …) after opt.step() and fl.log(\"weight_norm\", …) after each epoch"
python - <<'PY'
s = open("train.py").read()
s = s.replace('                fl.log("loss", loss)\n',
              '                fl.log("loss", loss)\n'
              '                fl.log("grad_norm", torch.sqrt(sum((p.grad ** 2).sum() for p in net.parameters())))\n')
s = s.replace('            fl.log("val_acc", accuracy(net, Xte, yte))\n',
              '            fl.log("val_acc", accuracy(net, Xte, yte))\n'
              '            fl.log("weight_norm", torch.sqrt(sum((p ** 2).sum() for p in net.parameters())))\n')
open("train_today.py", "w").write(s)
PY
diff train.py train_today.py || true

step "5. Replay the epoch-level statement only (inner loops skipped, state from checkpoints)" \
     "flightlog replay train_today.py --run latest --dry-run   # (the plan)"
sed -e '/grad_norm/d' train_today.py > train_epoch_only.py
flightlog replay train_epoch_only.py --run latest --dry-run
t0=$(now)
flightlog replay train_epoch_only.py --run latest
t1=$(python3 -c "import time; print(time.time() - $t0)")
python3 -c "print(f'\nreplay: {$t1:.1f}s from command to stored values (this first replay also started the warm pool); '
            f'running the script again takes {$t_rec:.1f}s (step 1, start-up included)')"

step "5b. Another question, answered by the warm pool (imports already done)" \
     "flightlog replay train_bias.py --run latest"
sed -e 's/fl.log("weight_norm", torch.sqrt(sum((p \*\* 2).sum() for p in net.parameters())))/fl.log("fc_bias_norm", net.fc.bias.norm())/' \
    train_epoch_only.py > train_bias.py
t0=$(now)
flightlog replay train_bias.py --run latest
t1=$(python3 -c "import time; print(time.time() - $t0)")
python3 -c "print(f'\nwarm replay: {$t1:.1f}s from command to stored values vs {$t_rec:.1f}s to run the script again: '
            f'{$t_rec / $t1:.1f}x faster')"

step "6. Replay the batch-level statement with 2 parallel workers" "flightlog replay train_today.py --run latest --workers 2"
flightlog replay train_today.py --run latest --workers 2

step "7. Old and new values side by side" "python -c 'fl.dataframe(\"loss\", \"grad_norm\", \"val_acc\", \"weight_norm\")'"
python - <<'PY'
import flightlog as fl
df = fl.dataframe("val_acc", "weight_norm")
print(df.dropna(subset=["val_acc"])[["epoch", "val_acc", "weight_norm"]].to_string(index=False))
g = fl.dataframe("loss", "grad_norm").dropna(subset=["grad_norm"])
print(f"\ngrad_norm: {len(g)} batch values replayed, e.g.")
print(g[["epoch", "batch", "step", "loss", "grad_norm"]].head(5).to_string(index=False))
PY

if flightlog health --help >/dev/null 2>&1; then
  step "8. Health checks on the run (non-zero exit when one fails)" "flightlog health --run latest"
  flightlog health --run latest || true
fi
printf '\nDone. The store is %s — try: flightlog sql "SELECT * FROM checkpoints"\n' "$FLIGHTLOG_HOME"
printf '\nLook at what it recorded (runs, curves with the replayed values marked, checkpoints, health) in a browser:\n'
printf '  flightlog ui --store %s    # prints the URL, http://127.0.0.1:8080/\n' "$FLIGHTLOG_HOME"
