"""The warm replay pool: a per-store process that has imported the script's packages and forks workers.

A replay worker used to be a new interpreter that imported torch, scikit-learn
and flightlog before it did any work (seconds). The first ``flightlog replay``
of a store now starts a pool process that imports the installed packages the
script imports at top level (read from the script's AST; the script's own code
never runs in the pool) and then waits on a Unix socket. Each worker is a
``fork`` of the pool that runs the script exactly like a cold worker does
(``flightlog.replay._worker.child_main``). Later replays of the store reuse it.

Safety rules, each checked, each falling back to a cold worker with a reason:

* owner only: the socket lives in a 0o700 directory owned by the user (checked),
  the socket file is 0o600, and both ends check the peer's uid (SO_PEERCRED);
* fork-safe: the pool only imports, never runs torch ops (no OpenMP threads), and
  refuses to fork while a Python thread is running in it;
* current: the pool records a fingerprint of the interpreter and installed
  packages (``sys.executable``, Python version, site-packages folders, flightlog
  version, import-relevant environment variables) and the modification times of
  every non-site-packages module it imported (editable installs, flightlog's own
  sources); any change stops it and starts a new one;
* no shadowing: a worker whose script folder holds a module named like one the
  pool imported (``utils.py``…) starts cold, as ``python script.py`` would have
  imported the local file;
* learning: a worker forked by the pool reports the installed modules the script
  imported lazily (``torch._dynamo`` on the first optimizer, ``transformers``'
  lazy submodules, sklearn's loaders…); the pool imports them while idle, so the
  next worker has them, and keeps the list (``learned.json``, tied to the
  fingerprint) for its successors. A learned import that starts a thread makes
  the pool exit and is never learned again;
* bounded: it exits after ``FLIGHTLOG_REPLAY_IDLE`` seconds (default 600) without
  work; ``flightlog replay --status`` shows it, ``--stop`` ends it, ``--cold``
  bypasses it.

``flightlog.replay.run`` called in a Python session that already imported torch
forks the workers from that session when it is single-threaded (no thread but
the main one: OpenMP, BLAS and Python threads would not survive a fork), else it
says why and uses the pool.
"""
from __future__ import annotations

import ast
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from typing import Any

ENV_IDLE = "FLIGHTLOG_REPLAY_IDLE"  # seconds a pool waits without work before it exits (default 600)
ENV_DIR = "FLIGHTLOG_REPLAY_POOL_DIR"  # where pools keep their sockets (default $XDG_RUNTIME_DIR or /tmp)
DEFAULT_IDLE = 600.0
FORK_TIMEOUT = 300.0  # a pool still importing (or stuck) after this long: the worker starts cold
# environment variables read when packages are imported: a pool imported with other values is stale
_ENV_PREFIXES = ("PYTHON", "OMP_", "MKL_", "OPENBLAS_", "KMP_", "GOTO", "TORCH", "PYTORCH", "CUDA_",
                 "NUMEXPR", "NUMBA", "VECLIB", "BLIS", "LD_", "VIRTUAL_ENV", "SKLEARN", "TF_", "JAX", "XLA")

_OPTS: dict[str, Any] = {"cold": False, "out": None, "said": set()}


class Unavailable(Exception):
    """The pool cannot be used here; the message says why (shown once, workers start cold)."""


# -- where, who, what ------------------------------------------------------------------------

def _base_dir() -> str:
    uid = os.getuid()
    base = os.environ.get(ENV_DIR)
    if not base:
        xdg = os.environ.get("XDG_RUNTIME_DIR")
        if xdg and os.path.isdir(xdg) and os.stat(xdg).st_uid == uid:
            base = os.path.join(xdg, "flightlog-replay")
        else:
            base = os.path.join("/tmp", f"flightlog-replay-{uid}")
    return base


def _private_dir(path: str) -> str:
    """Create ``path`` 0o700, or check that an existing one is ours and closed to others."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as e:
        raise Unavailable(f"cannot create {path}: {e.strerror}") from None
    st = os.lstat(path)
    import stat as _stat

    if not _stat.S_ISDIR(st.st_mode):
        raise Unavailable(f"{path} is not a directory")
    if st.st_uid != os.getuid():
        raise Unavailable(f"{path} belongs to uid {st.st_uid}, not to you")
    if st.st_mode & 0o077:
        raise Unavailable(f"{path} is open to other users (mode {oct(st.st_mode & 0o777)})")
    return path


def pool_dir(store: str) -> str:
    """The private directory of ``store``'s pool (socket, info.json, log)."""
    key = hashlib.sha256(_store_key(store).encode()).hexdigest()[:16]
    base = _private_dir(_base_dir())
    return _private_dir(os.path.join(base, key))


def _store_key(store: str) -> str:
    """The store's name as every process sees it: a URI as given (s3://…), a folder's real path."""
    return store.rstrip("/") if "://" in store else os.path.realpath(store)


def _site_dirs() -> list[str]:
    import site

    dirs = []
    try:
        dirs += site.getsitepackages()
    except Exception:
        pass
    try:
        u = site.getusersitepackages()
        if u and os.path.isdir(u):
            dirs.append(u)
    except Exception:
        pass
    return [d for d in dirs if os.path.isdir(d)]


def fingerprint(env: dict | None = None) -> str:
    """What a pool's imports depend on: interpreter, installed packages, import-time environment.

    ``env`` is the worker's environment (default ours): thread-count variables
    such as ``OMP_NUM_THREADS`` are read by OpenMP/BLAS when they load, so the
    pool must have loaded them with the values a cold worker would see.
    """
    import flightlog

    env = os.environ if env is None else env

    parts = [os.path.realpath(sys.executable), sys.version, sys.prefix, getattr(flightlog, "__version__", "")]
    for d in _site_dirs():
        try:
            parts.append(f"{d}:{os.stat(d).st_mtime_ns}")  # changes when a package is (un)installed
        except OSError:
            parts.append(d)
    parts += sorted(f"{k}={v}" for k, v in env.items()
                    if k.startswith(_ENV_PREFIXES) and not k.startswith("TORCHELASTIC_"))  # a launcher's, per job
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


def _stdlib_dirs() -> list[str]:
    import sysconfig

    out = set()
    for k in ("stdlib", "platstdlib"):
        try:
            out.add(os.path.realpath(sysconfig.get_paths()[k]))
        except Exception:
            pass
    return sorted(out)


def _watched_files() -> dict[str, int]:
    """Modification times of imported modules outside site-packages and the standard library.

    Those are editable installs and flightlog's own sources: edits there would
    make the pool's copies stale without any package being reinstalled.
    """
    fixed = tuple(os.path.realpath(d) + os.sep for d in _site_dirs() + _stdlib_dirs())
    out = {}
    for m in list(sys.modules.values()):
        f = getattr(m, "__file__", None)
        if not isinstance(f, str) or not f.endswith(".py"):
            continue
        rf = os.path.realpath(f)
        if rf.startswith(fixed):
            continue
        try:
            out[rf] = os.stat(rf).st_mtime_ns
        except OSError:
            pass
    return out


def script_imports(script: str) -> list[str]:
    """Absolute module names the script imports at top level (also inside top-level if/try/with)."""
    try:
        with open(script, "rb") as fh:
            tree = ast.parse(fh.read())
    except (OSError, SyntaxError, ValueError):
        return []
    names: list[str] = []

    def visit(body):
        for node in body:
            if isinstance(node, ast.Import):
                names.extend(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level == 0 and node.module and node.module != "__future__":
                    names.append(node.module)
                    names.extend(f"{node.module}.{a.name}" for a in node.names if a.name != "*")
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                for part in ("body", "orelse", "finalbody"):
                    visit(getattr(node, part, []) or [])
                for h in getattr(node, "handlers", []) or []:
                    visit(h.body)
    visit(tree.body)
    seen, out = set(), []
    for n in names:
        if n not in seen:
            seen.add(n)
            out.append(n)
    return out


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def peer_allowed(sock: socket.socket, uid: int | None = None) -> bool:
    """True when the process at the other end of ``sock`` runs as ``uid`` (default: ours)."""
    try:
        return _peer_uid(sock) == (os.getuid() if uid is None else uid)
    except OSError:
        return False


def _is_pool(pid: int, d: str) -> bool:
    """Is ``pid`` (from a pool directory's info.json) alive and still that directory's pool?

    Process ids are reused: a stale info.json must never make us signal an unrelated process.
    Where /proc cannot be read, liveness alone decides.
    """
    if not _alive(pid):
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmd = fh.read()
    except OSError:
        return not os.path.isdir("/proc/self")  # no /proc (not Linux): liveness alone
    return b"flightlog.replay.pool" in cmd and os.fsencode(d) in cmd


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False


# threads that survive a fork by design: jemalloc (pyarrow's allocator) re-creates its background thread
_FORK_SAFE_THREADS = ("jemalloc_bg_thd",)


def _threads(ignore: tuple[str, ...] = ()) -> int:
    """OS threads of this process (Python's and native ones), not counting those named in ``ignore``."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        import threading

        return threading.active_count()
    n = 0
    for t in tasks:
        try:
            with open(f"/proc/self/task/{t}/comm") as fh:
                if fh.read().strip() in ignore:
                    continue
        except OSError:
            pass
        n += 1
    return n


# -- messages: 4-byte length + JSON, the first one may carry a file descriptor ----------------

def _send(sock: socket.socket, obj: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(obj).encode()
    msg = struct.pack("!I", len(data)) + data
    if fds:
        n = socket.send_fds(sock, [msg], fds)
        if n < len(msg):
            sock.sendall(msg[n:])
    else:
        sock.sendall(msg)


def _recv(sock: socket.socket, with_fds: bool = False, limit: int = 1 << 22) -> tuple[dict | None, list[int]]:
    fds: list[int] = []
    if with_fds:
        buf, fds, _flags, _addr = socket.recv_fds(sock, 65536, 4)
    else:
        buf = sock.recv(65536)
    if not buf:
        return None, fds
    while len(buf) < 4:
        more = sock.recv(65536)
        if not more:
            return None, fds
        buf += more
    (n,) = struct.unpack("!I", buf[:4])
    if n > limit:
        return None, fds
    while len(buf) < 4 + n:
        more = sock.recv(65536)
        if not more:
            return None, fds
        buf += more
    return json.loads(buf[4:4 + n]), fds


# -- the pool process ------------------------------------------------------------------------

def _write_json(path: str, obj) -> None:
    """Replace ``path`` at once with ``obj`` as JSON, readable by the owner only."""
    tmp = f"{path}.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(obj, fh)
    os.replace(tmp, path)


def _write_info(d: str, info: dict) -> None:
    _write_json(os.path.join(d, "info.json"), info)


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")
LEARN_AFTER = 1.0  # seconds after the last worker ended (the runner is still storing its results)
LEARN_MAX = 20000  # module names one worker may report (torch._dynamo alone pulls ~1,500)


def learnable(before: set[str]) -> list[str]:
    """The installed modules this process imported since ``before`` (in a worker, at its end).

    Only modules the pool itself would import the same way: files under
    site-packages or the standard library, or flightlog's own; never a module of
    the script's folder (the pool's ``sys.path`` does not have it).
    """
    roots = tuple(os.path.realpath(d) + os.sep for d in _site_dirs() + _stdlib_dirs())
    out = []
    for name, mod in list(sys.modules.items()):
        if name in before or mod is None or name == "__main__" or not _NAME.match(name):
            continue
        if name.split(".")[0] == "flightlog":
            out.append(name)
            continue
        f = getattr(mod, "__file__", None)
        if isinstance(f, str) and os.path.realpath(f).startswith(roots):
            out.append(name)
    return out[:LEARN_MAX]


def _read_learned(d: str, fp: str) -> dict:
    try:
        with open(os.path.join(d, "learned.json")) as fh:
            got = json.load(fh)
    except (OSError, ValueError):
        got = None
    if not isinstance(got, dict) or got.get("fingerprint") != fp:
        return {"fingerprint": fp, "modules": [], "unsafe": []}
    return {"fingerprint": fp,
            "modules": [n for n in got.get("modules") or [] if isinstance(n, str) and _NAME.match(n)],
            "unsafe": [n for n in got.get("unsafe") or [] if isinstance(n, str)]}


def _write_learned(d: str, learned: dict) -> None:
    _write_json(os.path.join(d, "learned.json"), learned)


def _import_all(names: list[str]) -> tuple[list[str], list[str]]:
    """Import the installed modules among ``names``; never a module the script's folder provides."""
    import importlib

    done, failed = [], []
    for n in names:
        if n in sys.modules:
            continue
        parent, _, attr = n.rpartition(".")
        if parent in sys.modules and hasattr(sys.modules[parent], attr):
            continue  # `from pkg import name` of a function or class, not a module
        try:
            importlib.import_module(n)
            done.append(n)
        except BaseException:  # noqa: BLE001 - a missing or broken package: the worker imports it itself
            sys.modules.pop(n, None)
            failed.append(n)
    return done, failed


class _Server:
    def __init__(self, d: str, fp: str, idle: float, imports: list[str], store: str) -> None:
        self.d, self.fp, self.idle, self.store = d, fp, idle, store
        self.imports = imports
        self.children: dict[int, socket.socket] = {}
        self.forks = 0
        self.last = time.time()
        self.started = time.time()
        self.stop = False
        self.sock_path = os.path.join(d, "sock")
        self.listener: socket.socket | None = None
        self.ino = None
        self.info: dict = {}
        self.learned = _read_learned(d, fp)
        self.pending: list[str] = []  # modules workers imported that the pool has not (yet)

    def bind(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.sock_path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            s.bind(self.sock_path)
        finally:
            os.umask(old)
        os.chmod(self.sock_path, 0o600)
        s.listen(64)
        self.listener = s
        self.ino = os.stat(self.sock_path).st_ino

    def publish(self, state: str, **extra) -> None:
        self.info.update({"pid": os.getpid(), "fingerprint": self.fp, "store": self.store, "idle_s": self.idle,
                          "started": self.started, "state": state, "python": sys.executable}, **extra)
        _write_info(self.d, self.info)

    def load(self) -> None:
        import threading

        if sys.path and not sys.flags.safe_path:
            sys.path.pop(0)  # the pool's cwd; workers put their script's folder first
        t = time.time()
        done, failed = _import_all(["flightlog", "flightlog._run", "flightlog._read", "flightlog.replay._worker",
                                    "flightlog.collector.store",
                                    *self.imports])
        base = _threads(_FORK_SAFE_THREADS)
        learned, _ = _import_all([n for n in self.learned["modules"] if n not in self.learned["unsafe"]])
        if _threads(_FORK_SAFE_THREADS) > base or threading.active_count() > 1:
            # a learned module started a thread (a package upgrade can do that): forget them all
            self.learned["unsafe"] = sorted(set(self.learned["unsafe"]) | set(self.learned["modules"]))
            self.learned["modules"] = []
            with contextlib.suppress(OSError):
                _write_learned(self.d, self.learned)
            self.stop = True
        self.publish("ready", imports=done, failed=failed, learned=len(learned), import_s=round(time.time() - t, 3),
                     watched=_watched_files(), threads_after_import=_threads(),
                     python_threads=threading.active_count())

    def learn(self) -> None:
        """Import what the last workers imported lazily, one module at a time, while no worker runs.

        A module whose import starts a thread (Python or native) would make every
        later fork unsafe: the pool records it as unsafe and exits; the next
        replay starts a new pool, which never imports it.
        """
        import threading

        names, self.pending = self.pending, []
        known = set(self.learned["modules"])
        unsafe = set(self.learned["unsafe"])
        t = time.time()
        base = _threads(_FORK_SAFE_THREADS)
        added = []
        for n in names:
            if n in sys.modules or n in unsafe:
                continue
            done, _failed = _import_all([n])
            if _threads(_FORK_SAFE_THREADS) > base or threading.active_count() > 1:
                self.learned["unsafe"] = sorted(unsafe | {n})
                self.learned["modules"] = sorted(known | set(added))
                with contextlib.suppress(OSError):
                    _write_learned(self.d, self.learned)
                print(f"pool {os.getpid()}: importing {n} started a thread; exiting (it is not learned)", flush=True)
                self.publish("stale", reason=f"{n} starts a thread when imported")
                self.stop = True
                return
            added += [m for m in done if m not in known]
        if not added:
            return
        self.learned["modules"] = [*self.learned["modules"], *added]
        with contextlib.suppress(OSError):
            _write_learned(self.d, self.learned)
        self.publish("ready", learned=len(self.learned["modules"]), learn_s=round(time.time() - t, 3),
                     watched=_watched_files(), threads_after_import=_threads())

    def cleanup(self) -> None:
        try:
            if self.ino is not None and os.stat(self.sock_path).st_ino == self.ino:
                os.unlink(self.sock_path)
                info = os.path.join(self.d, "info.json")
                with contextlib.suppress(OSError):
                    with open(info) as fh:
                        if json.load(fh).get("pid") == os.getpid():
                            os.unlink(info)
        except (OSError, ValueError):
            pass

    def reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.children.pop(pid, None)
            self.last = time.time()
            self._collect_learned(pid)
            if conn is not None:
                with contextlib.suppress(OSError):
                    _send(conn, {"rc": os.waitstatus_to_exitcode(status)})
                conn.close()

    def _collect_learned(self, pid: int) -> None:
        path = os.path.join(self.d, f"learn-{pid}.json")
        try:
            with open(path) as fh:
                got = json.load(fh)
        except (OSError, ValueError):
            return
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)
        if isinstance(got, list):
            seen = set(self.pending)
            self.pending += [n for n in got[:LEARN_MAX] if isinstance(n, str) and _NAME.match(n) and n not in seen]

    def serve(self) -> None:
        assert self.listener is not None
        # a child's exit wakes the loop at once (SIGCHLD through a pipe), so its status goes out without delay
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        self.wake = (wake_r, wake_w)
        while not self.stop:
            self.reap()
            if not self.children and time.time() - self.last > self.idle:
                return
            if self.pending and not self.children and time.time() - self.last > LEARN_AFTER:
                self.learn()
                if self.stop:
                    return
            watch = [self.listener, wake_r, *self.children.values()]
            try:
                ready, _, _ = select.select(watch, [], [], 0.5 if self.pending else 1.0)
            except InterruptedError:
                continue
            for s in ready:
                if s is wake_r:
                    with contextlib.suppress(OSError):
                        os.read(wake_r, 4096)
                elif s is self.listener:
                    self.accept()
                else:  # a worker's client went away (runner killed): the worker goes too
                    for pid, c in list(self.children.items()):
                        if c is s:
                            with contextlib.suppress(OSError):
                                if not c.recv(1, socket.MSG_PEEK):
                                    os.kill(pid, signal.SIGKILL)

    def accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        self.last = time.time()
        if not peer_allowed(conn):
            conn.close()
            return
        conn.settimeout(10)
        fds: list[int] = []
        try:
            req, fds = _recv(conn, with_fds=True)
            op = (req or {}).get("op")
            if op == "spawn":
                self.spawn(conn, req, fds)
                fds = []
                return
            if op == "status":
                _send(conn, {"pid": os.getpid(), "fingerprint": self.fp, "forks": self.forks,
                             "running": len(self.children), "idle_for": round(time.time() - self.last, 1),
                             "idle_s": self.idle, "started": self.started, "imports": self.info.get("imports"),
                             "store": self.store})
            elif op == "stop":
                _send(conn, {"stopping": os.getpid()})
                self.stop = True
            else:
                _send(conn, {"error": "unknown request"})
        except (OSError, ValueError, TypeError):
            pass
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        conn.close()

    def spawn(self, conn: socket.socket, req: dict, fds: list[int]) -> None:
        import threading

        def refuse(why: str) -> None:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            with contextlib.suppress(OSError):
                _send(conn, {"error": why})
            conn.close()

        if len(fds) != 1:
            return refuse("no log file descriptor")
        if req.get("fingerprint") != self.fp:
            self.stop = True
            return refuse("the pool's environment is stale")
        script = req.get("script")
        if not isinstance(script, str) or not os.path.isfile(script):
            return refuse("no such script")
        _import_all([n for n in req.get("imports", []) if isinstance(n, str)])
        if self.pending:
            # replays back to back leave no idle second to learn in; the worker would import these itself
            self.learn()
            if self.stop:
                return refuse("a learned import started a thread in the pool; it restarts without it")
        shadow = _shadowed(os.path.dirname(os.path.abspath(script)))
        if shadow:
            return refuse(f"the script's folder has its own {shadow[0]} (a cold worker imports that file)")
        if threading.active_count() > 1:
            return refuse(f"{threading.active_count() - 1} Python threads run in the pool; forking is unsafe")
        for s in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                s.flush()
        pid = os.fork()
        if pid == 0:
            try:
                with contextlib.suppress(Exception):
                    self.listener.close()
                for c in self.children.values():
                    with contextlib.suppress(Exception):
                        c.close()
                with contextlib.suppress(Exception):
                    conn.close()
                with contextlib.suppress(Exception):
                    signal.set_wakeup_fd(-1)
                    for fd in getattr(self, "wake", ()):
                        os.close(fd)
            finally:
                from flightlog.replay import _worker

                _worker.child_main(script, list(req.get("argv", [])), dict(req.get("env", {})),
                                   req.get("cwd") or "/", fds[0], req.get("rc_path"), req.get("threads"),
                                   learn_dir=self.d)
        os.close(fds[0])
        self.forks += 1
        self.children[pid] = conn
        conn.setblocking(True)
        try:
            _send(conn, {"pid": pid})
        except OSError:
            os.kill(pid, signal.SIGKILL)


def _shadowed(folder: str) -> list[str]:
    """Modules already imported here that a file in ``folder`` would replace for ``python folder/x.py``."""
    try:
        entries = os.listdir(folder)
    except OSError:
        return []
    local = set()
    for e in entries:
        if e.endswith(".py"):
            local.add(e[:-3])
        elif "." in e and e.rsplit(".", 1)[1] in ("so", "pyd"):
            local.add(e.split(".", 1)[0])
        elif os.path.isdir(os.path.join(folder, e)) and e.isidentifier():
            local.add(e)
    tops = {n for n in sys.modules if "." not in n}
    hit = sorted((local & tops) - set(sys.builtin_module_names))
    return hit


def serve_main(argv: list[str]) -> None:
    """``python -P -m flightlog.replay.pool serve DIR FINGERPRINT IDLE STORE IMPORTS_JSON``."""
    d, fp, idle, store, imports = argv[0], argv[1], float(argv[2]), argv[3], json.loads(argv[4])
    # detach: the process that started us waits only for this first fork, so no zombie stays behind
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    srv = _Server(d, fp, idle, imports, store)

    def on_term(signum, frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        srv.bind()
        srv.publish("importing", imports=imports)
        srv.load()
        print(f"pool {os.getpid()} ready for {store}", flush=True)
        srv.serve()
    finally:
        srv.cleanup()
        print(f"pool {os.getpid()} exits after {srv.forks} workers", flush=True)
    os._exit(0)


# -- the client side -------------------------------------------------------------------------

@contextlib.contextmanager
def options(cold: bool = False, out=None, store: str | None = None):
    """Within: how workers start (``cold`` bypasses the pool), where the one-line notes go, the store."""
    prev = dict(_OPTS)
    _OPTS.update(cold=bool(cold), out=out, said=set(), store=store, how=set())
    try:
        yield
    finally:
        _OPTS.clear()
        _OPTS.update(prev)


def _say(line: str, out=None) -> None:
    if line in _OPTS["said"]:
        return
    _OPTS["said"].add(line)
    out = out or _OPTS.get("out") or sys.stderr
    try:
        print(f"flightlog: {line}", file=out, flush=True)
    except Exception:
        pass


def _idle() -> float:
    raw = os.environ.get(ENV_IDLE, "")
    try:
        v = float(raw)
        return v if v > 0 else DEFAULT_IDLE
    except ValueError:
        return DEFAULT_IDLE


def read_info(d: str) -> dict | None:
    try:
        with open(os.path.join(d, "info.json")) as fh:
            info = json.load(fh)
        return info if isinstance(info, dict) and isinstance(info.get("pid"), int) else None
    except (OSError, ValueError):
        return None


def _stale(info: dict, fp: str) -> str | None:
    if info.get("fingerprint") != fp:
        return "the Python environment changed"
    for path, mt in (info.get("watched") or {}).items():
        try:
            if os.stat(path).st_mtime_ns != mt:
                return f"{path} changed"
        except OSError:
            return f"{path} is gone"
    return None


def _connect(d: str, timeout: float = 5.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(os.path.join(d, "sock"))
    except OSError:
        s.close()
        raise
    if not peer_allowed(s):
        s.close()
        raise Unavailable("the pool socket is held by another user")
    return s


def _request(d: str, obj: dict, timeout: float = 5.0) -> dict | None:
    try:
        s = _connect(d, timeout)
    except (OSError, Unavailable):
        return None
    try:
        _send(s, obj)
        reply, _ = _recv(s)
        return reply
    except (OSError, ValueError):
        return None
    finally:
        s.close()


def _terminate(pid: int, wait: float = 5.0) -> None:
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGTERM)
    end = time.time() + wait
    while time.time() < end and _alive(pid):
        time.sleep(0.02)
    if _alive(pid):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def _locked(d: str):
    fd = os.open(os.path.join(d, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _start(d: str, store: str, fp: str, imports: list[str], worker_env: dict) -> None:
    env = {k: v for k, v in worker_env.items() if not k.startswith("FLIGHTLOG_REPLAY")}
    env.pop("FLIGHTLOG_RESUME", None)
    log = os.open(os.path.join(d, "pool.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        p = subprocess.Popen([sys.executable, "-P", "-m", "flightlog.replay.pool", "serve", d, fp, str(_idle()),
                              _store_key(store), json.dumps(imports)],
                             cwd=d, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True)
    finally:
        os.close(log)
    p.wait(timeout=60)
    end = time.time() + 30
    while time.time() < end:
        info = read_info(d)
        if info and os.path.exists(os.path.join(d, "sock")) and _is_pool(info["pid"], d):
            return
        time.sleep(0.01)
    raise Unavailable("the pool did not start (see " + os.path.join(d, "pool.log") + ")")


def ensure(store: str, script: str, env: dict | None = None) -> str:
    """The directory of a running, current pool for ``store`` (started if needed).

    ``env`` is the workers' environment; the pool is started with it.
    """
    env = dict(os.environ) if env is None else env
    d = pool_dir(store)
    fp = fingerprint(env)
    with _locked(d):
        info = read_info(d)
        if info is not None:
            why = None
            if not _is_pool(info["pid"], d):
                why = f"the pool (pid {info['pid']}) is gone"
            elif info.get("state") == "ready":
                why = _stale(info, fp)
            elif info.get("fingerprint") != fp:
                why = "the Python environment changed"
            if why is None:
                try:
                    _connect(d, 2.0).close()
                except OSError:
                    why = f"the pool (pid {info['pid']}) does not answer"
            if why is None:
                return d
            if _is_pool(info["pid"], d):
                _terminate(info["pid"])
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(d, "info.json"))
            _say(f"restarting the warm replay pool: {why}")
        imports = [n for n in script_imports(script) if n.split(".")[0] != "__main__"]
        _start(d, store, fp, imports, env)
        _OPTS.setdefault("how", set()).add("started")
        info = read_info(d) or {}
        tops = sorted({n.split(".")[0] for n in imports}) or ["flightlog"]
        _say(f"started a warm replay pool (pid {info.get('pid')}) that imports {', '.join(tops)} and forks the "
             f"workers of this store's replays; it exits after {_idle():g} s idle "
             "(flightlog replay --status / --stop; --cold bypasses it)")
        return d


class Worker:
    """A worker forked by the pool (or this session), with the subset of ``Popen`` the runner uses."""

    def __init__(self, cmd: list[str], cold_kwargs: dict, sock: socket.socket | None = None,
                 pid: int | None = None, rc_path: str | None = None, own_child: bool = False) -> None:
        self.args = cmd
        self._cold_kwargs = cold_kwargs
        self._sock = sock
        self._buf = b""
        self.pid = pid
        self.returncode: int | None = None
        self._fallback: subprocess.Popen | None = None
        self._orphan = False
        self._rc_path = rc_path
        self._own = own_child
        self._t0 = time.time()
        self.how = "session" if own_child else "pool"
        self._out = _OPTS.get("out")  # later notes (a cold fallback) go where this replay's notes go
        if sock is not None:
            sock.setblocking(False)

    def _cold(self, why: str) -> None:
        _say(f"a worker starts cold: {why}", self._out)
        _OPTS.setdefault("how", set()).add("cold")
        self.how = "cold"
        self._fallback = subprocess.Popen(cold_cmd(self.args), **self._cold_kwargs)
        self.pid = self._fallback.pid
        self._close()

    def _close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def _read(self) -> None:
        if self._sock is None:
            return
        try:
            data = self._sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close()
            if self.pid is None:
                self._cold("the warm pool closed the connection before forking")
            else:
                self._orphan = True
            return
        self._buf += data
        while len(self._buf) >= 4:
            (n,) = struct.unpack("!I", self._buf[:4])
            if len(self._buf) < 4 + n:
                break
            msg = json.loads(self._buf[4:4 + n])
            self._buf = self._buf[4 + n:]
            if "error" in msg:
                self._cold(f"the warm pool refused: {msg['error']}")
                return
            if "pid" in msg:
                self.pid = msg["pid"]
            if "rc" in msg:
                self.returncode = int(msg["rc"])
                self._close()
                return

    def poll(self) -> int | None:
        if self.returncode is not None:
            return self.returncode
        if self._fallback is not None:
            self.returncode = self._fallback.poll()
            return self.returncode
        if self._own:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
            return self.returncode
        self._read()
        if self._fallback is None and self.pid is None and time.time() - self._t0 > FORK_TIMEOUT:
            self._close()  # the pool closes our connection's worker if it forks after all
            self._cold(f"the warm pool did not fork within {FORK_TIMEOUT:g} s")
        if self._fallback is not None:
            return self.poll()
        if self._orphan and self.returncode is None and not _alive(self.pid):
            # the pool died while the worker ran: the worker left its exit status in a file
            try:
                with open(self._rc_path) as fh:
                    self.returncode = int(fh.read().strip())
            except (OSError, ValueError, TypeError):
                self.returncode = -signal.SIGKILL
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        end = None if timeout is None else time.time() + timeout
        while self.poll() is None:
            if end is not None and time.time() > end:
                raise subprocess.TimeoutExpired(self.args, timeout)
            if self._sock is not None:
                with contextlib.suppress(OSError, ValueError):
                    select.select([self._sock], [], [], 0.05)
            else:
                time.sleep(0.01)
        return self.returncode  # type: ignore[return-value]

    def kill(self) -> None:
        if self._fallback is not None:
            self._fallback.kill()
        elif self.pid is not None and self.returncode is None:
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)
        else:
            self._close()  # not forked yet: the pool kills the worker when it sees the client gone

    def terminate(self) -> None:
        self.kill()


def cold_cmd(cmd: list[str]) -> list[str]:
    """``[python, script, args...]`` as the lean cold worker: ``python -P .../replay/_worker.py script args``.

    Run as a file (not ``-m``), the entry imports nothing before the script does.
    """
    return [cmd[0], "-P", os.path.join(os.path.dirname(os.path.abspath(__file__)), "_worker.py"), *cmd[1:]]


def _session_safe() -> str | None:
    """None when this process may fork a worker: torch imported, only the main thread running."""
    if "torch" not in sys.modules:
        return "no torch here"
    n = _threads(_FORK_SAFE_THREADS)
    if n > 1:
        return f"{n - 1} other threads run in this session (OpenMP/BLAS/Python threads do not survive a fork)"
    return None


def spawn(cmd: list[str], env: dict, cwd: str, logf, store: str, cold_kwargs: dict,
          threads: int | None = None, fork_session: bool = True):
    """Start one worker: forked from this session, from the store's warm pool, or ``None`` (cold).

    ``cmd`` is ``[python, script, *args]`` as a cold start would run it;
    ``fork_session=False`` never forks this process (a Ray task's worker process).
    """
    if _OPTS["cold"] or os.environ.get("FLIGHTLOG_REPLAY_COLD") == "1":
        _OPTS.setdefault("how", set()).add("cold")
        return None
    w = _spawn_warm(cmd, env, cwd, logf, store, cold_kwargs, threads, fork_session)
    _OPTS.setdefault("how", set()).add("cold" if w is None else "warm")
    return w


def _spawn_warm(cmd: list[str], env: dict, cwd: str, logf, store: str, cold_kwargs: dict,
                threads: int | None = None, fork_session: bool = True):
    script, argv = cmd[1], list(cmd[2:])
    rc_path = logf.name + ".rc"
    if fork_session and "torch" in sys.modules:
        why = _session_safe()
        if why is None:
            logf.flush()
            for s in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    s.flush()
            pid = os.fork()
            if pid == 0:
                from flightlog.replay import _worker

                _worker.child_main(script, argv, env, cwd, os.dup(logf.fileno()), rc_path, threads)
            _say("replay workers fork from this Python session (torch already imported)")
            return Worker(cmd, cold_kwargs, pid=pid, rc_path=rc_path, own_child=True)
        _say(f"not forking this Python session: {why}; using the warm pool")
    try:
        d = ensure(store, script, env)
        s = _connect(d, 10.0)
    except (Unavailable, OSError) as e:
        _say(f"warm replay pool unavailable ({e}); workers start cold")
        return None
    try:
        _send(s, {"op": "spawn", "script": os.path.abspath(script), "argv": argv, "env": env, "cwd": cwd,
                  "imports": script_imports(script), "fingerprint": fingerprint(env), "rc_path": rc_path,
                  "threads": threads}, [logf.fileno()])
    except OSError as e:
        s.close()
        _say(f"warm replay pool unavailable ({e}); workers start cold")
        return None
    return Worker(cmd, cold_kwargs, sock=s, rc_path=rc_path)


# -- start-up: measured per store, used by the --dry-run estimate ----------------------------

DEFAULT_STARTUP = 1.5  # seconds, when this store has no measured replay start-up yet


def _startups_path(store: str) -> str:
    return os.path.join(pool_dir(store), "startups.json")


def note_startup(store: str, seconds: float | None) -> None:
    """Remember a replay's measured start-up (command start -> first replayed epoch), per warm/cold path."""
    how = _OPTS.get("how") or set()
    if seconds is None or not how or seconds <= 0:
        return
    # a replay that had to start the pool paid the imports: it measured a cold start-up
    kind = "cold" if "started" in how or how == {"cold"} else ("warm" if "cold" not in how else None)
    if kind is None:
        return
    try:
        path = _startups_path(store)
        try:
            with open(path) as fh:
                data = json.load(fh)
        except (OSError, ValueError):
            data = {}
        xs = [float(x) for x in data.get(kind, []) if isinstance(x, (int, float))][-4:] + [float(seconds)]
        data[kind] = xs
        _write_json(path, data)
    except (Unavailable, OSError, ValueError):
        pass


def startup_estimate(store: str | None = None) -> tuple[float, str]:
    """Expected start-up of the next replay of ``store`` and where the number comes from.

    Warm when the store's pool is running and current (and not ``--cold``), else
    cold; the median of the last measured start-ups of that kind, else
    ``DEFAULT_STARTUP``.
    """
    store = store or _OPTS.get("store")
    if not store:
        return DEFAULT_STARTUP, "start-up not measured yet"
    try:
        d = pool_dir(store)
        with open(os.path.join(d, "startups.json")) as fh:
            data = json.load(fh)
    except (Unavailable, OSError, ValueError):
        return DEFAULT_STARTUP, "start-up not measured yet"
    info = read_info(d) if not _OPTS.get("cold") else None
    warm = bool(info and info.get("state") == "ready" and _is_pool(info["pid"], d) and not _stale(info, info["fingerprint"]))
    kind = "warm" if warm else "cold"
    xs = sorted(x for x in data.get(kind, []) if isinstance(x, (int, float)))
    if not xs:
        return DEFAULT_STARTUP, f"{kind} start-up not measured yet"
    m = xs[len(xs) // 2]
    return m, f"{kind} start-up ~{m:.1f}s (median of this store's last {len(xs)} {kind} replays)"


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat, or None where there is none."""
    try:
        with open("/proc/stat") as fh:
            parts = fh.readline().split()
    except OSError:
        return None
    if not parts or parts[0] != "cpu" or len(parts) < 5:
        return None
    vals = [int(x) for x in parts[1:9]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    return sum(vals) - idle, sum(vals)


def busy_cores(interval: float = 0.15) -> tuple[float, str] | None:
    """Cores busy right now (sampled over ``interval`` s of /proc/stat), or None where it cannot be read.

    The load average would do, but it lags a minute: right after a replay or a
    training run ended it still counts them, and a parallel replay started then
    would wrongly get one worker.
    """
    a = _cpu_times()
    if a is None:
        return None
    time.sleep(interval)
    b = _cpu_times()
    if b is None or b[1] <= a[1]:
        return None
    n = os.cpu_count() or 1
    return (b[0] - a[0]) / (b[1] - a[1]) * n, f"{interval:g} s sample of /proc/stat"


def fit_workers(requested: int) -> tuple[int, str]:
    """How many of the ``requested`` workers the machine has idle cores for, and why, in words.

    Idle cores = the cores this process may run on (``sched_getaffinity``) minus
    the cores busy now (a short sample of /proc/stat; the 1-minute load average
    where there is none). A second worker on a core that is already busy only
    adds its start-up and slows the first one down.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    if requested <= 1:
        return 1, "1 worker"
    got = busy_cores()
    if got is None:
        try:
            got = (os.getloadavg()[0], "load average")
        except OSError:
            return requested, f"{requested} worker(s) as asked (how busy the cores are is unknown)"
    busy, how = got
    idle = max(0, int(cores - busy + 0.5))
    n = max(1, min(requested, idle))
    if n == requested:
        return n, f"{n} workers as asked: {idle} of {cores} cores idle ({busy:.1f} busy, {how})"
    return n, (f"{n} worker(s) instead of {requested}: only {idle} of {cores} cores idle ({busy:.1f} busy, {how}); "
               "more workers than idle cores would each pay the start-up and slow the others")


# -- --status / --stop -----------------------------------------------------------------------

def status(store: str) -> dict | None:
    """The store's pool as a dict (pid, state, imports, forks, idle_for, stale), or None."""
    try:
        d = pool_dir(store)
    except Unavailable:
        return None
    info = read_info(d)
    if info is None or not _is_pool(info["pid"], d):
        return None
    live = _request(d, {"op": "status"}, 2.0) or {}
    out = {k: info.get(k) for k in ("pid", "state", "imports", "failed", "idle_s", "started", "import_s",
                                    "threads_after_import", "learned")}
    out.update({k: live[k] for k in ("forks", "running", "idle_for") if k in live})
    out["dir"] = d
    # the Python environment is compared at the next replay (it depends on the workers' environment)
    out["stale"] = _stale(info, info.get("fingerprint")) if info.get("state") == "ready" else None
    out["answers"] = bool(live)
    return out


def stop(store: str) -> int | None:
    """Stop the store's pool; returns its pid, or None when none was running."""
    try:
        d = pool_dir(store)
    except Unavailable:
        return None
    info = read_info(d)
    if info is None or not _is_pool(info["pid"], d):
        return None
    pid = info["pid"]
    _request(d, {"op": "stop"}, 2.0)
    end = time.time() + 5
    while time.time() < end and _alive(pid):
        time.sleep(0.02)
    if _alive(pid):
        _terminate(pid)
    return pid


def describe_status(store: str) -> str:
    st = status(store)
    if st is None:
        return f"no warm replay pool for {_store_key(store)}"
    age = time.time() - (st.get("started") or time.time())
    line = (f"warm replay pool pid {st['pid']} for {_store_key(store)}: {st.get('state')}, "
            f"up {age:.0f} s, {st.get('forks', '?')} workers forked, {st.get('running', '?')} running, "
            f"idle {st.get('idle_for', '?')} s of {st.get('idle_s'):g} s; imports "
            f"{', '.join(st.get('imports') or []) or '(flightlog only)'}")
    if st.get("learned"):
        line += f", and {st['learned']} module(s) its workers imported later (learned)"
    if st.get("stale"):
        line += f"; stale ({st['stale']}): the next replay restarts it"
    if not st.get("answers"):
        line += "; not answering"
    return line


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "serve":
        serve_main(sys.argv[2:])
    else:
        print("usage: python -P -m flightlog.replay.pool serve DIR FINGERPRINT IDLE STORE IMPORTS_JSON",
              file=sys.stderr)
        sys.exit(2)
