"""The replay worker's entry: run the user's script as ``__main__`` and end with ``os._exit``.

One entry for every way a worker starts, so they all behave alike:

* cold: ``python -P .../flightlog/replay/_worker.py SCRIPT [ARGS...]`` (a new interpreter that
  imports nothing before the script, so the script's folder shadows modules as it would);
* warm: a process forked from the warm pool (``flightlog.replay.pool``), or from
  the caller's own Python session, calls :func:`child_main`.

The script runs exactly as ``python SCRIPT ARGS`` would run it (``sys.argv``,
``sys.path[0]`` = the script's folder, ``__name__ == "__main__"``, the exit
status of ``SystemExit`` or 1 for an uncaught exception). What differs is the
end: once the script is done, non-daemon threads are joined and ``atexit``
handlers run (that is where flightlog finishes the run and writes its result),
the result files the plan names are fsynced, and the process leaves with
``os._exit`` instead of tearing the interpreter down (1+ s of CPU with torch
loaded, which the runner used to wait for).
"""
from __future__ import annotations  # compile-time only; imports nothing at run time

import io
import os
import sys


def _exit_code(e: SystemExit) -> int:
    code = e.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    try:
        print(code, file=sys.stderr)
    except Exception:
        pass
    return 1


def _fsync_results() -> None:
    """The plan's result files reach the disk before the process is gone."""
    plan_path = os.environ.get("FLIGHTLOG_REPLAY")
    if not plan_path:
        return
    import json

    try:
        with open(plan_path) as fh:
            plan = json.load(fh)
        from flightlog import _replay

        plan = _replay.rank_plan(plan, _replay.worker_rank())
    except (OSError, ValueError, ImportError):
        return
    for key in ("result_path", "rows_path"):
        p = plan.get(key)
        if not isinstance(p, str):
            continue
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)


def _shutdown() -> None:
    """What interpreter shutdown does that matters: join threads, run atexit, flush stdio."""
    import threading

    try:
        threading._shutdown()  # type: ignore[attr-defined]  # joins non-daemon threads, like Py_Finalize
    except BaseException:
        pass
    try:
        import atexit

        atexit._run_exitfuncs()
    except BaseException:
        pass
    for s in (sys.stdout, sys.stderr):
        try:
            s.flush()
        except BaseException:
            pass


def _keep_all(line: int) -> bool:
    return True


def _guarded_code(source: bytes, script: str):
    """The script compiled with every statement of an ``fl.loop`` body behind a guard, or None.

    ``for x in fl.loop(...): S`` becomes ``for x in fl.loop(...): if __flightlog_keep__(line): S``
    (locations kept, so tracebacks, line events and ``f_lineno`` are the script's own). The guard is
    True unless the replay mode skips that tail statement in this epoch (tail slicing,
    ``replay/slicing.py``); the worker decides when it has its plan, the script compiles before.
    """
    import ast
    import builtins

    try:
        tree = ast.parse(source, script)
    except (SyntaxError, ValueError):
        return None  # compile() below reports it exactly as python would
    guarded = 0
    for node in ast.walk(tree):
        if not isinstance(node, (ast.For, ast.AsyncFor)) or not _is_fl_loop(node.iter):
            continue
        body = []
        for st in node.body:
            if isinstance(st, (ast.Global, ast.Nonlocal)):
                body.append(st)
                continue
            test = ast.Call(ast.Name("__flightlog_keep__", ast.Load()), [ast.Constant(st.lineno)], [])
            guard = ast.If(test, [st], [])
            for n in (guard, test, test.func, test.args[0]):
                ast.copy_location(n, st)
                n.end_lineno, n.end_col_offset = st.lineno, st.col_offset
            guard.end_lineno, guard.end_col_offset = st.end_lineno, st.end_col_offset
            body.append(guard)
            guarded += 1
        node.body = body
    if not guarded:
        return None
    try:
        code = compile(tree, script, "exec", dont_inherit=True)
    except (SyntaxError, ValueError):
        return None
    if not hasattr(builtins, "__flightlog_keep__"):
        builtins.__flightlog_keep__ = _keep_all
    return code


def _is_fl_loop(it) -> bool:
    import ast

    if isinstance(it, ast.Call) and isinstance(it.func, ast.Name) and it.func.id == "enumerate" and it.args:
        it = it.args[0]
    if not isinstance(it, ast.Call):
        return False
    f = it.func
    return (isinstance(f, ast.Attribute) and f.attr == "loop") or (isinstance(f, ast.Name) and f.id == "loop")


def _exec_main(script: str) -> None:
    """What ``python script`` does with the file: compile it and run it as a fresh ``__main__`` module."""
    import builtins
    from importlib.machinery import SourceFileLoader  # frozen at start-up: imports nothing new

    with io.open_code(script) as fh:
        source = fh.read()
    code = None
    if os.environ.get("FLIGHTLOG_REPLAY"):
        code = _guarded_code(source, script)
    if code is None:
        code = compile(source, script, "exec", dont_inherit=True)
    main = type(sys)("__main__")
    main.__dict__.update(__file__=script, __builtins__=builtins, __cached__=None, __spec__=None,
                         __loader__=SourceFileLoader("__main__", script))
    sys.modules["__main__"] = main
    exec(code, main.__dict__)


def run_script(script: str, argv: list[str]) -> int:
    """Run ``script`` as ``__main__`` with ``argv``; returns the exit status it would have had."""
    script = os.path.abspath(script)
    sys.argv = [script, *argv]
    folder = os.path.dirname(script)
    if sys.flags.safe_path or not sys.path:  # started with -P: nothing to replace
        sys.path.insert(0, folder)
    else:
        sys.path[0] = folder
    try:
        _exec_main(script)
        rc = 0
    except SystemExit as e:
        rc = _exit_code(e)
    except KeyboardInterrupt:
        import traceback

        traceback.print_exc()
        rc = 130
    except BaseException:
        try:
            sys.excepthook(*sys.exc_info())
        except BaseException:
            import traceback

            traceback.print_exc()
        rc = 1
    _shutdown()
    _fsync_results()
    return rc


def _fresh_stdio() -> None:
    """New ``sys.stdout``/``sys.stderr`` on fds 1/2, as a new interpreter would have them."""
    out = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=False,
                           line_buffering=os.isatty(1), errors="backslashreplace")
    err = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True, errors="backslashreplace")
    sys.stdout = sys.__stdout__ = out
    sys.stderr = sys.__stderr__ = err
    sys.stdin = sys.__stdin__ = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))


def child_main(script: str, argv: list[str], env: dict, cwd: str, log_fd: int,
               rc_path: str | None = None, threads: int | None = None, learn_dir: str | None = None) -> None:
    """In a freshly forked process: become the worker ``python script argv`` would be, run it, ``os._exit``.

    Never returns (the caller's stack must not unwind in the child). ``learn_dir``
    (forked by the warm pool): where to leave the list of installed modules the
    script imported that the pool had not, for the pool to import before the next fork.
    """
    rc = 1
    before = set(sys.modules) if learn_dir else None
    try:
        import random
        import signal

        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        if log_fd > 2:
            os.close(log_fd)
        _fresh_stdio()
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1, signal.SIGUSR2):
            try:
                signal.signal(sig, signal.SIG_DFL)
            except (OSError, ValueError):
                pass
        try:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.set_wakeup_fd(-1)  # the parent's (the pool's, an event loop's): not the script's
        except (OSError, ValueError):
            pass
        os.environ.clear()
        os.environ.update(env)
        os.chdir(cwd)
        # a new interpreter draws fresh seeds; forked siblings must not share the parent's streams
        random.seed()
        np = sys.modules.get("numpy")
        if np is not None:
            try:
                np.random.seed()
            except Exception:
                pass
        if threads:
            torch = sys.modules.get("torch")
            if torch is not None:
                try:
                    torch.set_num_threads(int(threads))
                except Exception:
                    pass
        rc = run_script(script, argv)
    except BaseException:
        try:
            import traceback

            traceback.print_exc()
        except BaseException:
            pass
        rc = 1
    finally:
        if learn_dir:
            _report_imports(learn_dir, before)
        if rc_path:
            try:
                with open(rc_path, "w") as fh:
                    fh.write(str(rc))
            except BaseException:
                pass
        os._exit(rc)


def _report_imports(learn_dir: str, before: set) -> None:
    try:
        import json

        from flightlog.replay import pool

        names = pool.learnable(before)
        if not names:
            return
        scratch = sys.modules.get("flightlog._scratch")
        if scratch is not None:
            scratch.stop()  # the script is done: this file is the pool's, not one of the script's writes
        path = os.path.join(learn_dir, f"learn-{os.getpid()}.json")
        fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(names, fh)
        os.replace(path + ".tmp", path)
    except BaseException:
        pass


def main() -> None:
    if len(sys.argv) < 2:
        print("usage: python -P _worker.py SCRIPT [ARGS...]", file=sys.stderr)
        os._exit(2)
    rc = run_script(sys.argv[1], sys.argv[2:])
    os._exit(rc)


if __name__ == "__main__":
    main()
