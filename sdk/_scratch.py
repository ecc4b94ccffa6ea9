"""Replay never changes the user's files: writes go to a scratch folder of the replay.

A replay worker runs the user's script, which may save models, write CSVs or
delete old checkpoints. While it runs, every write-like file operation on a path
outside the store and the replay's own folder goes to ``<scratch>/<absolute
path>`` instead: ``open``/``io.open`` in a writing mode, ``os.open`` with writing
flags, ``os.remove``/``unlink``/``rename``/``replace``/``mkdir``/``makedirs``/``rmdir``,
``shutil.rmtree`` and ``torch.save`` (which writes from C++). Reads of a path the
replay wrote see the scratch copy, so a script that saves and reloads still works.
Everything else (reading data, the store) is untouched.
"""
from __future__ import annotations

import builtins
import io
import os
import shutil
import sys
import threading
from typing import Any

_lock = threading.Lock()
_state: dict[str, Any] = {"root": None, "exempt": (), "written": {}}
_orig: dict[str, Any] = {}

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _abs(path) -> str | None:
    try:
        p = os.fspath(path)
    except TypeError:
        return None
    if isinstance(p, bytes):
        p = os.fsdecode(p)
    return os.path.abspath(p)


def _exempt(p: str) -> bool:
    if p.startswith(("/dev/", "/proc/", "/sys/")) or p in ("/dev/null",):
        return True
    return any(p == e or p.startswith(e + os.sep) for e in _state["exempt"])


def target(path, write: bool) -> Any:
    """The path to use for ``path``: its scratch copy for writes (and for reads of what the replay wrote)."""
    root = _state["root"]
    if root is None or isinstance(path, int):
        return path
    p = _abs(path)
    if p is None or _exempt(p) or p == root or p.startswith(root + os.sep):
        return path
    s = root + p
    if write:
        d = os.path.dirname(s)
        if not os.path.isdir(d):
            _orig["makedirs"](d, exist_ok=True)
        with _lock:
            _state["written"][p] = s
        return s
    return s if (p in _state["written"] or os.path.lexists(s)) else path


def _writes(mode: str) -> bool:
    return any(c in mode for c in "wax+")


def _open(file, mode="r", *args, **kwargs):
    return _orig["open"](target(file, _writes(str(mode))), mode, *args, **kwargs)


def _os_open(path, flags, *args, **kwargs):
    return _orig["os_open"](target(path, bool(flags & _WRITE_FLAGS)), flags, *args, **kwargs)


def _wrap1(name: str):
    f = _orig[name]

    def w(path, *args, **kwargs):
        return f(target(path, True), *args, **kwargs)

    w.__name__ = getattr(f, "__name__", name)
    return w


def _wrap2(name: str):
    f = _orig[name]

    def w(src, dst, *args, **kwargs):
        s = target(src, False)
        return f(s, target(dst, True), *args, **kwargs)

    w.__name__ = getattr(f, "__name__", name)
    return w


def _torch_save(obj, f, *args, **kwargs):
    if isinstance(f, (str, bytes, os.PathLike)):
        f = target(f, True)
    return _orig["torch_save"](obj, f, *args, **kwargs)


def install(root: str, exempt: list[str]) -> None:
    """Start redirecting this process's file writes into ``root``."""
    root = os.path.abspath(root)
    os.makedirs(root, exist_ok=True)
    _state["root"] = root
    _state["exempt"] = tuple(os.path.abspath(e) for e in exempt if e)
    if _orig:
        return
    _orig.update(open=builtins.open, os_open=os.open, makedirs=os.makedirs)
    for n in ("remove", "unlink", "mkdir", "rmdir"):
        _orig[n] = getattr(os, n)
    for n in ("rename", "replace"):
        _orig[n] = getattr(os, n)
    _orig["rmtree"] = shutil.rmtree
    builtins.open = _open
    io.open = _open
    os.open = _os_open
    for n in ("remove", "unlink", "mkdir", "rmdir"):
        setattr(os, n, _wrap1(n))
    for n in ("rename", "replace"):
        setattr(os, n, _wrap2(n))
    mk = _orig["makedirs"]

    def makedirs(name, *args, **kwargs):
        return mk(target(name, True), *args, **kwargs)

    os.makedirs = makedirs
    rt = _orig["rmtree"]

    def rmtree(path, *args, **kwargs):
        return rt(target(path, True), *args, **kwargs)

    shutil.rmtree = rmtree
    patch_torch()


def stop() -> None:
    """Stop redirecting (the script is done; what the worker itself writes now goes where it says)."""
    _state["root"] = None


def patch_torch() -> None:
    """Redirect ``torch.save`` once torch is imported (the script imports it after flightlog at times)."""
    torch = sys.modules.get("torch")
    if _state["root"] is None or torch is None or "torch_save" in _orig:
        return
    _orig["torch_save"] = torch.save
    torch.save = _torch_save
    ser = sys.modules.get("torch.serialization")
    if ser is not None:
        ser.save = _torch_save


def written() -> list[tuple[str, str]]:
    """(original path, scratch path) of every file or folder the replay wrote."""
    with _lock:
        return sorted((a, b) for a, b in _state["written"].items() if os.path.isfile(b))
