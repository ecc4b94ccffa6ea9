"""The FlorDB side of bench/record_overhead.py and bench/replay_speed.py.

FlorDB (PyPI ``flordb``, 4.0.1 here) is installed only in bench/.venv. It works inside a git
repository: at import it asserts one, on the first flor call it switches the repository to its own
branch (``flor.branch``) and at exit auto-commits every file; ``python -m flordb replay`` commits
the edited script, checks out each recorded run's commit, pastes the new log statement into that
version (GumTree AST matching), re-runs it with ``--replay_flor`` and asks y/N on stdin first. So
every function here copies bench/flor_digits.py into a fresh throwaway repository under the temp
directory and runs FlorDB there, in a child process of bench/.venv/bin/python; nothing touches
/work/main's git tree.

    flor_record(epochs, width, threads, batch_size=32, size=8) -> dict   # keeps the repo for replay
    flor_replay(repo, "epoch"|"batch", epochs=None) -> dict
    cleanup(repo)

Every function returns a dict and never raises; on failure the dict is
``{"ok": False, "error": "<why>", ...}``. wall_s is the child's wall time as seen from here
(interpreter start, imports, FlorDB's git work included); cpu_s is user+sys of the child and all
its reaped descendants (os.wait4), so FlorDB's git subprocesses and replay's re-run count.

Smoke (2 epochs, record, both replays, and a forward run with the statements in place as ground
truth):

    .venv/bin/python bench/_flordb.py [--epochs 2] [--width 8] [--select 1:2] [--no-truth]
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
FLOR_PY = BENCH / ".venv" / "bin" / "python"
SCRIPT = BENCH / "flor_digits.py"
PREFIX = "flor-bench-"
SCRIPT_NAME = "train.py"

# The statements bench/replay_speed.py adds to train_digits.py (fl.log → flor.log). FlorDB logs JSON
# values and stores anything else as its str(), so the 0-d tensor is turned into a float here;
# flightlog's fl.log stores the same tensor as float(tensor), so the numbers are comparable as is.
STATEMENTS = {
    "epoch": ("weight_norm", 'flor.log("val_acc", accuracy())',
              'flor.log("weight_norm", torch.sqrt(sum((p ** 2).sum() for p in net.parameters())).item())'),
    "batch": ("grad_norm", "opt.step()",
              'flor.log("grad_norm", torch.sqrt(sum((p.grad ** 2).sum() for p in net.parameters())).item())'),
}


# ---------------------------------------------------------------------------------------------
# plumbing


def _fail(error: str, **extra: Any) -> dict:
    return {"ok": False, "error": error, **extra}


def _env(repo: Path) -> dict:
    """The child's environment: bench/.venv first on PATH (FlorDB's replay runs a bare `python`)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("GIT_") and k not in ("PYTHONPATH", "PYTHONHOME", "FLOR_CAPTURE")}
    venv_bin = str(FLOR_PY.parent)
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "/usr/bin:/bin")
    env["VIRTUAL_ENV"] = str(FLOR_PY.parent.parent)
    env["FLOR_BENCH_SANDBOX"] = str(repo)
    env["PYTHONUNBUFFERED"] = "1"
    # auto-commits need an identity; set here so no global git config is read or written
    for k in ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME"):
        env[k] = "flor-bench"
    for k in ("GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"):
        env[k] = "flor-bench@localhost"
    env["GIT_CONFIG_NOSYSTEM"] = "1"
    return env


def _run(cmd: list[str], repo: Path, label: str, stdin_text: str | None = None,
         timeout_s: float = 3600.0) -> dict:
    """Run cmd in repo; wall time, rusage of the child tree, rc and the output files' text."""
    work = repo.parent
    out_p, err_p = work / f"{label}.out", work / f"{label}.err"
    stdin = subprocess.DEVNULL
    if stdin_text is not None:
        in_p = work / f"{label}.in"
        in_p.write_text(stdin_text)
        stdin = open(in_p, "rb")
    killed = threading.Event()
    try:
        with open(out_p, "wb") as out, open(err_p, "wb") as err:
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=repo, env=_env(repo), stdin=stdin, stdout=out, stderr=err,
                                    start_new_session=True)

            def kill() -> None:
                killed.set()
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except OSError:
                    pass

            timer = threading.Timer(timeout_s, kill)
            timer.start()
            try:
                _, status, ru = os.wait4(proc.pid, 0)
            finally:
                timer.cancel()
            wall = time.perf_counter() - t0
            proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if stdin is not subprocess.DEVNULL:
            stdin.close()
    return {"rc": proc.returncode, "wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime,
            "timed_out": killed.is_set(),
            "stdout": out_p.read_text(errors="replace"), "stderr": err_p.read_text(errors="replace")}


def _tail(r: dict, n: int = 600) -> str:
    text = (r.get("stderr", "") + "\n" + r.get("stdout", "")).strip()
    return text[-n:].replace("\r", "\n")


def _du(path: Path, skip: Path | None = None) -> int:
    total = 0
    for root, dirs, files in os.walk(path):
        if skip is not None and Path(root) == skip:
            continue
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, env=_env(repo), check=True, capture_output=True,
                          text=True, timeout=120).stdout.strip()


def _last_json_line(text: str) -> dict:
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return {}


def _db(repo: Path) -> Path | None:
    dbs = sorted((repo / ".flor").glob("*.db"))
    return dbs[0] if dbs else None


def _rows(repo: Path, sql: str, params: tuple = ()) -> list[tuple]:
    db = _db(repo)
    if db is None:
        return []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def _ctx_index(ctx: str | None, name: str) -> int | None:
    if not ctx:
        return None
    for seg in json.loads(ctx):
        if seg.get("name") == name:
            return seg.get("iteration")
    return None


def _with_statements(src: str, levels: list[str]) -> str:
    """src with the new statement of each level inserted after its anchor line, same indentation."""
    lines = src.splitlines(keepends=True)
    for level in levels:
        _, anchor, stmt = STATEMENTS[level]
        hits = [i for i, ln in enumerate(lines) if ln.strip() == anchor]
        if len(hits) != 1:
            raise ValueError(f"anchor {anchor!r} found {len(hits)} times in the script")
        i = hits[0]
        indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
        lines.insert(i + 1, f"{indent}{stmt}\n")
    return "".join(lines)


def _sandbox_ok(repo: Path) -> bool:
    """Only directories this module made: <tmp>/flor-bench-*/repo with a FlorDB store in it."""
    tmp = Path(tempfile.gettempdir()).resolve()
    try:
        rp = repo.resolve()
    except OSError:
        return False
    return (rp.name == "repo" and rp.parent.name.startswith(PREFIX) and rp.parent.parent == tmp
            and (rp / ".git").is_dir())


def parse_epochs(spec: str | None, n: int) -> list[int]:
    """flightlog's --epochs syntax (``A:B`` with B exclusive, ``A:``, ``N``, ``1,3,5``) → indices < n."""
    if spec is None:
        return list(range(n))
    chosen: set[int] = set()
    try:
        for part in str(spec).split(","):
            part = part.strip()
            if ":" in part:
                a, b = part.split(":", 1)
                chosen |= set(range(int(a) if a.strip() else 0, int(b) if b.strip() else n))
            elif part:
                chosen.add(int(part))
    except ValueError:
        raise ValueError(f"bad epochs {spec!r}: use A:B, A:, N or a comma list") from None
    picked = sorted(e for e in chosen if 0 <= e < n)
    if not picked:
        raise ValueError(f"epochs {spec!r} selects none of the recorded 0..{n - 1}")
    return picked


# ---------------------------------------------------------------------------------------------
# the three functions


def flor_record(epochs: int, width: int, threads: int, batch_size: int = 32, size: int = 8,
                with_statements: list[str] | None = None, timeout_s: float = 3600.0) -> dict:
    """Train the digits CNN under FlorDB in a new throwaway repo; timings, bytes, and the repo.

    ``with_statements`` (["epoch"], ["batch"] or both) puts the replay benchmark's new statements
    into the script before recording: a full re-run whose values are the ground truth for replay.
    """
    if not FLOR_PY.exists():
        return _fail(f"{FLOR_PY} missing: create bench/.venv and `bench/.venv/bin/pip install flordb`")
    try:
        probe = subprocess.run([str(FLOR_PY), "-c", "import importlib.metadata as m; print(m.version('flordb'))"],
                               capture_output=True, text=True, timeout=120)
        if probe.returncode != 0:
            return _fail("flordb is not installed in bench/.venv: `bench/.venv/bin/pip install flordb`")
        version = probe.stdout.strip()
        src = SCRIPT.read_text()
        if with_statements:
            src = _with_statements(src, list(with_statements))
        work = Path(tempfile.mkdtemp(prefix=PREFIX)).resolve()
        repo = work / "repo"
        repo.mkdir()
        (work / "train.py.orig").write_text(SCRIPT.read_text())
        (repo / SCRIPT_NAME).write_text(src)
        _git(repo, "init", "-q", "-b", "main")
        _git(repo, "add", SCRIPT_NAME)
        _git(repo, "commit", "-q", "-m", "benchmark script")
        before = _du(repo)
        git_before = _du(repo / ".git")
    except Exception as e:  # noqa: BLE001 - a benchmark side reports, never raises
        return _fail(f"cannot set up the throwaway repository: {type(e).__name__}: {e}")
    cmd = [str(FLOR_PY), SCRIPT_NAME, "--kwargs", f"epochs={int(epochs)}", f"width={int(width)}",
           f"threads={int(threads)}", f"batch_size={int(batch_size)}", f"size={int(size)}"]
    try:
        r = _run(cmd, repo, "record", timeout_s=timeout_s)
    except Exception as e:  # noqa: BLE001
        return _fail(f"cannot run FlorDB: {type(e).__name__}: {e}", repo=str(repo))
    if r["rc"] != 0:
        why = f"timed out after {timeout_s:.0f}s" if r["timed_out"] else f"exit {r['rc']}"
        return _fail(f"FlorDB record run failed ({why}): {_tail(r)}", repo=str(repo))
    try:
        script = _last_json_line(r["stdout"])
        flor_dir = repo / ".flor"
        obj_files = [p for p in (flor_dir / "obj_store").rglob("*") if p.is_file()]
        runs = sorted((flor_dir / "runs").glob("*.jsonl"))
        records = [json.loads(x) for x in runs[-1].read_text().splitlines() if x.strip()] if runs else []
        values: dict[str, list[float]] = {}
        for rec in records:
            if rec.get("type") == 1 and rec.get("ctx"):
                values.setdefault(rec["name"], []).append(float(rec["value"]))
        out = {
            "ok": True, "flordb_version": version, "repo": str(repo),
            "wall_s": r["wall_s"], "cpu_s": r["cpu_s"],
            "loop_s": script.get("loop_s"), "startup_s": script.get("startup_s"),
            "finish_s": script.get("finish_s"), "script_wall_s": script.get("wall_s"),
            "bytes": _du(repo) - before,
            "flor_dir_bytes": _du(flor_dir),
            "git_bytes_added": _du(repo / ".git") - git_before,
            "checkpoint_files": len(obj_files),
            "checkpointing_noop": "flor.checkpointing(...) no longer has an effect" in r["stdout"] + r["stderr"],
            "n_records": len(records),
            "branch": _git(repo, "rev-parse", "--abbrev-ref", "HEAD"),
            "commits": int(_git(repo, "rev-list", "--count", "--all")),
            "values": values,
        }
        if not script:
            out["warning"] = "the script printed no timing line"
        return out
    except Exception as e:  # noqa: BLE001
        return _fail(f"FlorDB ran but its output could not be read: {type(e).__name__}: {e}", repo=str(repo))


def flor_replay(repo: str, level: str, epochs: str | None = None, timeout_s: float = 3600.0) -> dict:
    """Add the new statement of `level` to the recorded script and run FlorDB's hindsight replay.

    epoch level: ``weight_norm`` after each epoch (after val_acc); batch level: ``grad_norm`` after
    ``opt.step()``. Runs ``python -m flordb replay --apply NAME --iter epoch=SEL [--iter batch=all]``
    (``--iter batch=all``: FlorDB logs only the last batch of each epoch unless told otherwise) with
    ``y`` on stdin. Returns wall_s/cpu_s of that command, the new values in order (with their
    epoch/batch positions), and what FlorDB re-executed, read from the timing rows it stores for the
    replay: ``epochs_executed`` (epochs whose batch loop ran), ``batches_executed`` and
    ``from_scratch`` (True when it started again from epoch 0 rather than at the first selected one).
    """
    try:
        rp = Path(repo)
        if level not in STATEMENTS:
            return _fail(f"level must be 'epoch' or 'batch', not {level!r}")
        if not _sandbox_ok(rp):
            return _fail(f"{repo!r} is not a repository made by flor_record; refusing to run FlorDB there")
        runs = sorted((rp / ".flor" / "runs").glob("*.jsonl"))
        if not runs:
            return _fail(f"no recorded FlorDB run in {repo}")
        recorded = {}
        for line in runs[-1].read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                if rec.get("type") == 1 and not rec.get("ctx"):
                    recorded[rec["name"]] = rec["value"]
        n_epochs = int(recorded.get("epochs", 0))
        try:
            selected = parse_epochs(epochs, n_epochs)
        except ValueError as e:
            return _fail(str(e))
        name, _, _ = STATEMENTS[level]
        pristine = (rp.parent / "train.py.orig").read_text()
        (rp / SCRIPT_NAME).write_text(_with_statements(pristine, [level]))
        last_rowid = (_rows(rp, "SELECT max(rowid) FROM logs") or [(0,)])[0][0] or 0
        sel = "all" if epochs is None else ",".join(map(str, selected))
        cmd = [str(FLOR_PY), "-m", "flordb", "replay", "--apply", name, "--iter", f"epoch={sel}"]
        if level == "batch":
            cmd += ["--iter", "batch=all"]
    except Exception as e:  # noqa: BLE001
        return _fail(f"cannot prepare the replay: {type(e).__name__}: {e}")
    try:
        r = _run(cmd, rp, f"replay-{level}-{int(time.time() * 1000)}", stdin_text="y\n", timeout_s=timeout_s)
    except Exception as e:  # noqa: BLE001
        return _fail(f"cannot run FlorDB replay: {type(e).__name__}: {e}")
    try:
        rows = _rows(rp, "SELECT ctx, value_name, value FROM logs WHERE rowid > ? AND source = 'replay' "
                         "ORDER BY rowid", (last_rowid,))
        vals, pos = [], []
        epochs_executed: list[int] = []
        batches = 0
        outer_iters = None
        for ctx, vname, value in rows:
            if vname == name:
                vals.append(float(value))
                pos.append([_ctx_index(ctx, "epoch"), _ctx_index(ctx, "batch")])
            elif vname == "time::iter::n":
                e = _ctx_index(ctx, "epoch")
                if e is None:
                    outer_iters = int(float(value))
                else:  # the batch loop's summary, anchored on its epoch
                    epochs_executed.append(e)
                    batches += int(float(value))
        flor_s = None
        for line in reversed(r["stdout"].splitlines()):
            if line.strip().endswith(" seconds"):
                try:
                    flor_s = float(line.split()[0])
                except ValueError:
                    pass
                break
        out = {
            "ok": r["rc"] == 0 and bool(vals), "level": level, "name": name, "epochs": selected,
            "wall_s": r["wall_s"], "cpu_s": r["cpu_s"], "flor_reported_s": flor_s,
            "n_values": len(vals), "values": vals, "positions": pos,
            "outer_iterations_run": outer_iters, "epochs_executed": sorted(set(epochs_executed)),
            "batches_executed": batches,
            "from_scratch": bool(epochs_executed) and min(epochs_executed) == 0,
            "branch_after": _git(rp, "rev-parse", "--abbrev-ref", "HEAD"),
        }
        if r["rc"] != 0:
            why = f"timed out after {timeout_s:.0f}s" if r["timed_out"] else f"exit {r['rc']}"
            out["error"] = f"FlorDB replay failed ({why}): {_tail(r)}"
        elif not vals:
            out["error"] = f"FlorDB replay produced no {name} values: {_tail(r)}"
        return out
    except Exception as e:  # noqa: BLE001
        return _fail(f"FlorDB replay ran but its results could not be read: {type(e).__name__}: {e}")


def cleanup(repo: str) -> None:
    """Delete the throwaway directory flor_record made (and nothing else)."""
    try:
        rp = Path(repo)
        if _sandbox_ok(rp):
            shutil.rmtree(rp.resolve().parent, ignore_errors=True)
    except Exception:  # noqa: BLE001
        pass


# ---------------------------------------------------------------------------------------------
# smoke


def _brief(d: dict) -> dict:
    out = dict(d)
    for k in ("values",):
        v = out.get(k)
        if isinstance(v, dict):
            out[k] = {n: (len(x), x[:3]) for n, x in v.items()}
        elif isinstance(v, list):
            out[k] = (len(v), v[:4])
    if isinstance(out.get("positions"), list):
        out["positions"] = (len(out["positions"]), out["positions"][:4])
    return out


def _vs_train_digits(rec: dict, a: Any) -> str:
    """Same training? Compare FlorDB's recorded loss/val_acc with train_digits.py under flightlog."""
    py = BENCH.parent / ".venv" / "bin" / "python"
    py = py if py.exists() else Path(sys.executable)
    home = tempfile.mkdtemp(prefix="flor-bench-fl-")
    try:
        env = dict(os.environ, FLIGHTLOG_HOME=home, FLIGHTLOG_PROGRESS="0")
        subprocess.run([str(py), str(BENCH / "train_digits.py"), "--mode", "flightlog", "--epochs", str(a.epochs),
                        "--width", str(a.width), "--size", str(a.size), "--threads", str(a.threads)],
                       env=env, check=True, capture_output=True, timeout=3600)
        read = ("import json, flightlog as fl; print(json.dumps({n: [r['value'] for r in fl.query("
                "\"SELECT value FROM metrics WHERE name = ? ORDER BY step\", params=[n]).to_pylist()] "
                "for n in ('loss', 'val_acc')}))")
        got = json.loads(subprocess.run([str(py), "-c", read], env=env, check=True, capture_output=True,
                                        text=True, timeout=600).stdout)
        same = {n: got[n] == rec["values"].get(n) for n in got}
        return (f"train_digits.py (flightlog) vs flor_digits.py (FlorDB): {len(got['loss'])} losses, "
                f"identical: {same}")
    except Exception as e:  # noqa: BLE001
        return f"train_digits.py comparison failed: {type(e).__name__}: {e}"
    finally:
        shutil.rmtree(home, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--select", default=None, help="epochs to replay, e.g. 1:2 (default: all)")
    ap.add_argument("--no-truth", action="store_true", help="skip the ground-truth forward run")
    ap.add_argument("--keep", action="store_true", help="keep the throwaway repositories")
    ap.add_argument("--vs-train-digits", action="store_true",
                    help="also check that the recorded loss/val_acc equal bench/train_digits.py's (flightlog mode)")
    a = ap.parse_args(argv)
    kw = dict(epochs=a.epochs, width=a.width, threads=a.threads, size=a.size)
    rec = flor_record(**kw)
    print("record:", json.dumps(_brief(rec), default=str))
    if not rec.get("ok"):
        return 1
    reps = {}
    try:
        if a.vs_train_digits:
            print(_vs_train_digits(rec, a))
        for level in ("epoch", "batch"):
            reps[level] = flor_replay(rec["repo"], level, a.select)
            print(f"replay {level}:", json.dumps(_brief(reps[level]), default=str))
        if not a.no_truth:
            truth = flor_record(**kw, with_statements=["epoch", "batch"])
            try:
                if not truth.get("ok"):
                    print("truth run failed:", truth.get("error"))
                    return 1
                for level, r in reps.items():
                    name = STATEMENTS[level][0]
                    want = truth["values"].get(name, [])
                    if r.get("positions") and level == "epoch":
                        want = [want[e] for e, _ in r["positions"]]
                    elif r.get("positions"):
                        per = len(want) // max(a.epochs, 1)
                        want = [want[e * per + b] for e, b in r["positions"]]
                    got = r.get("values", [])
                    diff = max((abs(x - y) for x, y in zip(got, want)), default=float("nan"))
                    print(f"{name}: replayed {len(got)} vs full re-run {len(want)}; "
                          f"identical: {got == want}; max |diff| {diff:.3g}")
                same_loss = truth["values"].get("loss") == rec["values"].get("loss")
                print(f"loss of the record run == loss of the full re-run: {same_loss}")
            finally:
                if not a.keep:
                    cleanup(truth.get("repo", ""))
    finally:
        if not a.keep:
            cleanup(rec["repo"])
    return 0 if all(r.get("ok") for r in reps.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
