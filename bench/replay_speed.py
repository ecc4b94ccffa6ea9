"""Replay speed: hindsight logging on the digits CNN vs a full re-run (and FlorDB's replay).

    .venv/bin/python bench/replay_speed.py [--epochs 20] [--width 48] [--size 28] [--reps 3] [--no-flor]

Records one run with bench/train_digits.py, then measures, in the same session:
  (a) a full re-run of the modified script (both new statements),
  (b) replay of an epoch-level statement (weight norm after each epoch),
  (c) replay of a batch-level statement (gradient norm after opt.step()) for all epochs, 1 and 2 workers,
  (d) replay of the batch-level statement for one epoch (--epochs 7),
and replay start-up (replay command start → first planned epoch). Every replay's values are checked
against (a) bit for bit, and its fidelity verdict is printed. FlorDB's replay of the same statements
runs side by side when bench/_flordb.py and bench/.venv are available.
Targets (issue 4): (b) >= 20x faster than (a); (d) >= 8x; (c) 2 workers >= 1.7x faster than 1;
start-up < 1.5 s; all exact.
Warm pool (issue 13): (b) and (d) run three ways: --cold (every worker a new interpreter), the first
warm replay (which starts the store's warm pool: replay/pool.py) and warm replays reusing it; the
targets are (b) >= 20x cold, >= 50x warm, warm start-up < 1 s. The pool is stopped at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import re
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = os.path.join(ROOT, ".venv", "bin", "python")
FLIGHTLOG = os.path.join(ROOT, ".venv", "bin", "flightlog")

GRAD = ('            fl.log("grad_norm", torch.sqrt(sum((p.grad ** 2).sum() for p in net.parameters())))\n')
WNORM = ('        fl.log("weight_norm", torch.sqrt(sum((p ** 2).sum() for p in net.parameters())))\n')


def variant(src: str, grad: bool, wnorm: bool) -> str:
    s = src
    if grad:
        s = s.replace('            fl.log("loss", loss)\n', '            fl.log("loss", loss)\n' + GRAD)
    if wnorm:
        s = s.replace('        fl.log("val_acc", accuracy())\n', '        fl.log("val_acc", accuracy())\n' + WNORM)
    return s


def timed(cmd, env, cwd) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return dt, p.stdout


def values(store: str, name: str, epochs=None) -> list[float]:
    import flightlog as fl

    sql = "SELECT value FROM metrics WHERE name = ? ORDER BY step"
    params = [name]
    if epochs is not None:
        sql = "SELECT value FROM metrics WHERE name = ? AND epoch IN (SELECT unnest(?)) ORDER BY step"
        params = [name, list(epochs)]
    return fl.query(sql, params, store=store).column("value").to_pylist()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=22)
    ap.add_argument("--width", type=int, default=48)
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3, help="repetitions of the short replays (b) and (d)")
    ap.add_argument("--no-flor", action="store_true")
    ap.add_argument("--no-demo", action="store_true", help="skip the README demo rows (examples/digits.py)")
    ap.add_argument("--only-demo", action="store_true", help="only the README demo rows")
    ap.add_argument("--no-all-epochs-batch", action="store_true",
                    help="skip the (c) rows (batch-level replay of all epochs: each about a full run long)")
    a = ap.parse_args()
    if a.only_demo:
        for row in demo(a):
            print(row)
        return
    args = ["--mode", "flightlog", "--epochs", str(a.epochs), "--width", str(a.width), "--size", str(a.size),
            "--threads", str(a.threads)]
    work = tempfile.mkdtemp(prefix="fl-replay-bench-")
    src = open(os.path.join(HERE, "train_digits.py")).read()
    for name, code in (("train.py", src), ("train_epoch.py", variant(src, False, True)),
                       ("train_batch.py", variant(src, True, False)), ("train_both.py", variant(src, True, True))):
        with open(os.path.join(work, name), "w") as fh:
            fh.write(code)
    store, full = os.path.join(work, "store"), os.path.join(work, "full")
    env = dict(os.environ, FLIGHTLOG_HOME=store, FLIGHTLOG_PROGRESS="0",
               FLIGHTLOG_REPLAY_POOL_DIR=os.path.join(work, "pools"))
    res: dict[str, list[float]] = {}
    info: dict[str, dict] = {}
    try:
        t_rec, _ = timed([PY, "train.py", *args], env, work)
        print(f"recorded run: {t_rec:.1f}s", file=sys.stderr)
        # the script's own start-up (process start -> first epoch), which any replay worker pays too
        own = []
        for _ in range(3):
            t_launch = time.time()
            _, out = timed([PY, "train.py", *[x if x != "flightlog" else "plain" for x in args[:2]], "--epochs", "1",
                            *args[4:]], env, work)
            own.append(json.loads(out.strip().splitlines()[-1])["loop_start_unix"] - t_launch)
        script_startup = statistics.median(own)
        print(f"script start-up (plain, process start to first epoch): {script_startup:.2f}s", file=sys.stderr)
        t_full, _ = timed([PY, "train_both.py", *args], dict(env, FLIGHTLOG_HOME=full), work)
        res["(a) full re-run of the modified script"] = [t_full]
        print(f"(a) full re-run: {t_full:.1f}s", file=sys.stderr)

        def replay(label, script, extra, check, reps):
            # the --dry-run estimate (start-up included) next to what the replay then measures
            _, plan = timed([FLIGHTLOG, "replay", script, "--run", "latest", "--dry-run", *extra], env, work)
            m = re.search(r"estimate ~([0-9.]+)s", plan)
            if m:
                info.setdefault(label, {"startup": []})["estimate"] = float(m.group(1))
            for _ in range(reps):
                dt, out = timed([FLIGHTLOG, "replay", script, "--run", "latest", "--format", "json", *extra], env, work)
                j = json.loads(out)
                res.setdefault(label, []).append(dt)
                info.setdefault(label, {"startup": []})["startup"].append(j["startup_s"])
                info[label]["fidelity"] = j["fidelity"]
                info[label]["compared"] = j["compared"]
                # which pool served it: a warm row whose pool pid changed paid a pool start (an edited
                # flightlog source or package restarts the pool; see docs/hindsight.md)
                _, st = timed([FLIGHTLOG, "replay", "--status", "--format", "json"], env, work)
                pid = (json.loads(st) or {}).get("pid")
                if "--cold" not in extra:
                    info[label].setdefault("pools", []).append(pid)
                name, epochs = check
                got = values(store, name, epochs)
                want = values(full, name, epochs)
                info[label]["equal"] = got == want and len(got) > 0
                print(f"{label}: {dt:.2f}s (start-up {j['startup_s']}) fidelity {j['fidelity']} "
                      f"equal-to-full-rerun {info[label]['equal']} pool {pid}", file=sys.stderr)

        one = min(7, a.epochs - 1)
        replay("(b) epoch-level statement, all epochs, --cold", "train_epoch.py", ["--cold"], ("weight_norm", None),
               a.reps)
        replay("(b) epoch-level, first warm replay (starts the pool)", "train_epoch.py", [], ("weight_norm", None), 1)
        replay("(b) epoch-level statement, all epochs, warm pool", "train_epoch.py", [], ("weight_norm", None),
               a.reps)
        # the fast path alone (no verification epoch): what tail slicing and the pool cost; the verified rows
        # above cannot be faster than one full epoch (re-executed to check the checkpoints), see docs/benchmarks.md
        replay("(b) epoch-level, --no-verify, --cold", "train_epoch.py", ["--no-verify", "--cold"],
               ("weight_norm", None), a.reps)
        replay("(b) epoch-level, --no-verify, warm pool", "train_epoch.py", ["--no-verify"], ("weight_norm", None),
               a.reps)
        replay(f"(d) batch-level statement, --epochs {one}, --cold", "train_batch.py", ["--epochs", str(one), "--cold"],
               ("grad_norm", [one]), a.reps)
        replay(f"(d) batch-level statement, --epochs {one}, warm pool", "train_batch.py", ["--epochs", str(one)],
               ("grad_norm", [one]), a.reps)
        if not a.no_all_epochs_batch:
            replay("(c) batch-level statement, all epochs, 1 worker", "train_batch.py", [], ("grad_norm", None), 1)
            replay("(c) batch-level statement, all epochs, 2 workers", "train_batch.py", ["--workers", "2"],
                   ("grad_norm", None), 1)
        flor_rows = []
        if not a.no_flor:
            flor_rows = run_flor(a, {"weight_norm": values(full, "weight_norm"), "grad_norm": values(full, "grad_norm"),
                                     "grad_norm_one": values(full, "grad_norm", [one])}, one,
                                 all_epochs_batch=not a.no_all_epochs_batch)
    finally:
        subprocess.run([FLIGHTLOG, "replay", "--stop", "--store", store], env=env, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    demo_rows = [] if a.no_demo else demo(a)
    base = res["(a) full re-run of the modified script"][0]
    print(f"\nreplay speed — digits CNN (width {a.width}, {a.size}x{a.size}), {a.epochs} epochs, torch threads "
          f"{a.threads}; recording took {t_rec:.1f}s")
    print(f"{'what':<56} {'seconds':>8} {'vs (a)':>8} {'start-up':>9} {'fidelity':>10} {'= full':>7} {'estimate':>9}")
    for label, xs in res.items():
        m = statistics.median(xs)
        st = [x for x in info.get(label, {}).get("startup") or [] if x is not None]
        est = info.get(label, {}).get("estimate")
        print(f"{label:<56} {m:8.2f} {base / m:7.1f}x {statistics.median(st) if st else float('nan'):8.2f}s "
              f"{info.get(label, {}).get('fidelity', '-'):>10} {str(info.get(label, {}).get('equal', '-')):>7} "
              + (f"{est:8.1f}s ({(est - m) / m * 100:+.0f}%)" if est is not None else ""))
    for row in demo_rows:
        print(row)
    try:
        print(f"load average during the run: {os.getloadavg()[0]:.1f} on {len(os.sched_getaffinity(0))} cores")
    except OSError:
        pass
    print(f"replay start-up = replay command start -> first planned epoch; the script's own start-up "
          f"(imports, data, model: a plain run from process start to its first epoch) is {script_startup:.2f}s "
          f"of it")
    epoch_s = base / a.epochs
    print(f"one epoch of the full re-run: {epoch_s:.2f}s; a verified epoch-level replay re-executes one epoch in "
          f"full, so it cannot beat {base / epoch_s:.0f}x even with zero start-up (bound with the measured warm "
          f"start-up: {base / (epoch_s + _median_startup(info, 'warm pool')):.1f}x)")
    pools = [p for v in info.values() for p in v.get("pools", [])]
    print(f"warm pool pids over the warm replays, in order: {pools} (a change = the pool was restarted)")
    c1 = res.get("(c) batch-level statement, all epochs, 1 worker")
    c2 = res.get("(c) batch-level statement, all epochs, 2 workers")
    if c1 and c2:
        print(f"parallel speed-up, 2 workers vs 1: {statistics.median(c1) / statistics.median(c2):.2f}x")
    for row in flor_rows:
        print(row)


def _median_startup(info: dict, which: str) -> float:
    xs = [x for label, v in info.items() if which in label and "(b)" in label for x in v.get("startup") or []
          if x is not None]
    return statistics.median(xs) if xs else 0.0


def demo(a) -> list[str]:
    """The README demo's replay (examples/digits.py, 6 epochs, weight norm per epoch) vs running the script again."""
    work = tempfile.mkdtemp(prefix="fl-replay-demo-")
    src = open(os.path.join(ROOT, "examples", "digits.py")).read()
    new = src.replace('            fl.log("val_acc", accuracy(net, Xte, yte))\n',
                      '            fl.log("val_acc", accuracy(net, Xte, yte))\n'
                      '            fl.log("weight_norm", torch.sqrt(sum((p ** 2).sum() for p in net.parameters())))\n')
    assert new != src
    for name, code in (("train.py", src), ("train_epoch_only.py", new)):
        with open(os.path.join(work, name), "w") as fh:
            fh.write(code)
    store, again = os.path.join(work, "store"), os.path.join(work, "again")
    env = dict(os.environ, FLIGHTLOG_HOME=store, FLIGHTLOG_PROGRESS="0",
               FLIGHTLOG_REPLAY_POOL_DIR=os.path.join(work, "pools"))
    rows: dict[str, list[float]] = {}
    out = []
    try:
        timed([PY, "train.py", "--epochs", "6"], env, work)
        for k in range(a.reps):
            dt, _ = timed([PY, "train_epoch_only.py", "--epochs", "6"], dict(env, FLIGHTLOG_HOME=again + str(k)), work)
            rows.setdefault("running the modified script again", []).append(dt)
        want = values(again + "0", "weight_norm")
        for label, extra, reps in (("replay --cold", ["--cold"], a.reps), ("replay, first (starts the warm pool)", [], 1),
                                   ("replay, warm pool", [], a.reps)):
            for _ in range(reps):
                dt, o = timed([FLIGHTLOG, "replay", "train_epoch_only.py", "--run", "latest", "--format", "json",
                               *extra], env, work)
                j = json.loads(o)
                got = values(store, "weight_norm")
                rows.setdefault(label, []).append(dt)
                print(f"demo {label}: {dt:.2f}s start-up {j['startup_s']} fidelity {j['fidelity']} "
                      f"equal {got == want}", file=sys.stderr)
                if got != want:
                    out.append(f"  !! demo {label}: values differ from running the script again")
    finally:
        subprocess.run([FLIGHTLOG, "replay", "--stop", "--store", store], env=env, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    base = statistics.median(rows["running the modified script again"])
    out.insert(0, f"\nREADME demo (examples/digits.py --epochs 6, new weight_norm per epoch), medians of {a.reps}:")
    for label, xs in rows.items():
        m = statistics.median(xs)
        out.insert(len(out), f"  {label:<44} {m:7.2f}s  {base / m:5.1f}x")
    return out


def run_flor(a, truth: dict, one: int, all_epochs_batch: bool = True) -> list[str]:
    """FlorDB 4.0.1 recording and replaying the same statements; values checked against the full re-run."""
    try:
        sys.path.insert(0, HERE)
        import _flordb as flor
    except Exception as e:
        return [f"FlorDB: unavailable ({e})"]
    import inspect

    kw = dict(epochs=a.epochs, width=a.width, threads=a.threads)
    if "size" in inspect.signature(flor.flor_record).parameters:
        kw["size"] = a.size
    rec = flor.flor_record(**kw)
    if not rec.get("ok", True) or not rec.get("repo"):
        return [f"FlorDB record failed: {rec.get('error')}"]
    rows = [f"\nFlorDB 4.0.1 side by side (bench/_flordb.py): record {rec.get('wall_s', float('nan')):.1f}s"]
    try:
        for label, level, epochs, key in (("(b) epoch-level statement, all epochs", "epoch", None, "weight_norm"),
                                          (f"(d) batch-level statement, --epochs {one}", "batch", str(one),
                                           "grad_norm_one"),
                                          ("(c) batch-level statement, all epochs", "batch", None, "grad_norm"))[
                                              :3 if all_epochs_batch else 2]:
            r = flor.flor_replay(rec["repo"], level, epochs=epochs)
            if r.get("ok", True) and "wall_s" in r:
                got = [float(v) for v in (r.get("values") or [])]
                want = truth[key]
                same = len(got) == len(want) and all(x == y for x, y in zip(got, want))
                rows.append(f"FlorDB {label}: {r['wall_s']:.2f}s, {len(got)} values, equal to full re-run: {same}"
                            + (" (re-ran from iteration 0)" if r.get("from_scratch") else ""))
            else:
                rows.append(f"FlorDB {label} failed: {r.get('error')}")
    finally:
        flor.cleanup(rec["repo"])
    return rows


if __name__ == "__main__":
    main()
