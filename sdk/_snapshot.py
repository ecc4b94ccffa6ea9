"""Code snapshot: the main script and the local modules it imported, by content hash.

Replay diffs today's code against this snapshot to find new log statements.
"Local" means under the script's folder and outside any site-packages or
virtual environment. Files are stored as blobs; a JSON manifest
``{relative path: digest}`` is stored as a blob too and its digest is the
snapshot id recorded in the run.
"""
from __future__ import annotations

import json
import os
import sys
import sysconfig

from flightlog.collector import blobs as _blobs

MAX_FILE_BYTES = 2 * 1024 * 1024
MAX_FILES = 500


def _excluded_roots() -> list[str]:
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix}
    for key in ("purelib", "platlib", "stdlib", "platstdlib"):
        p = sysconfig.get_paths().get(key)
        if p:
            roots.add(p)
    return [os.path.abspath(r) + os.sep for r in roots if r]


def local_files(script: str | None) -> list[str]:
    """The script plus imported modules under its folder (absolute paths)."""
    if not script:
        return []
    root = os.path.dirname(os.path.abspath(script)) + os.sep
    excluded = [e for e in _excluded_roots() if not root.startswith(e)]
    files = {os.path.abspath(script)}
    for mod in list(sys.modules.values()):
        f = getattr(mod, "__file__", None)
        if not f or not f.endswith(".py"):
            continue
        f = os.path.abspath(f)
        if f.startswith(root) and not any(f.startswith(e) for e in excluded) and "site-packages" not in f:
            files.add(f)
        if len(files) >= MAX_FILES:
            break
    return sorted(files)


def take(run) -> str | None:
    """Store the snapshot of ``run``'s code; returns the manifest digest."""
    files = local_files(run.script)
    if not files:
        return None
    root = os.path.dirname(os.path.abspath(run.script))
    manifest = {}
    blobs: list[tuple[str, bytes]] = []
    for f in files:
        try:
            if os.path.getsize(f) > MAX_FILE_BYTES:
                continue
            with open(f, "rb") as fh:
                data = fh.read()
        except OSError:
            continue
        d = _blobs.blob_digest(data)
        blobs.append((d, data))
        manifest[os.path.relpath(f, root)] = d
    body = json.dumps({"root": root, "script": os.path.relpath(run.script, root), "files": manifest},
                      sort_keys=True).encode()
    d = _blobs.blob_digest(body)
    blobs.append((d, body))
    from flightlog.collector import fs as _fs

    if _fs.is_remote(run.store):
        # On object storage each blob is a HEAD and a PUT: upload them on a thread of their own while the
        # script goes on (the digests, all the run row needs, are known now); the run's end waits for it.
        import threading

        t = threading.Thread(target=_upload, args=(run.store, blobs), name="flightlog-snapshot", daemon=True)
        t.start()
        run.uploads.append(t)
    else:
        for digest, data in blobs:
            _blobs.put_blob(run.store, digest, data)
    return d


def _upload(store: str, blobs: list) -> None:
    from flightlog import _warn

    try:
        for digest, data in blobs:
            _blobs.put_blob(store, digest, data)
    except Exception as e:
        _warn.problem("snapshot_failed", f"code snapshot not stored: {e!r}")


def load(store: str, snapshot_id: str) -> dict:
    """The manifest and file contents of a snapshot: {"root", "script", "files": {rel: text}}."""
    man = _manifest(_blobs.read_blob(store, snapshot_id, what="code snapshot"), snapshot_id)
    files = {}
    for rel, d in man["files"].items():
        try:
            files[rel] = _blobs.read_blob(store, d, what=f"snapshot file {rel!r}").decode("utf-8", errors="replace")
        except FileNotFoundError:
            files[rel] = None
    return {"root": man["root"], "script": man["script"], "files": files}


def _manifest(body: bytes, snapshot_id: str) -> dict:
    """A parsed manifest, refused (BlobError) unless every file name stays inside the snapshot's root."""
    try:
        man = json.loads(body)
        ok = (isinstance(man, dict) and isinstance(man.get("files"), dict) and isinstance(man.get("root"), str)
              and isinstance(man.get("script"), str))
    except ValueError:
        ok = False
    if not ok:
        raise _blobs.BlobError(f"code snapshot {snapshot_id} is not a snapshot manifest")
    for rel in [man["script"], *man["files"]]:
        norm = os.path.normpath(rel) if isinstance(rel, str) and rel else ""
        if (not norm or os.path.isabs(rel) or norm == ".." or norm.startswith(".." + os.sep)
                or "\0" in rel):
            raise _blobs.BlobError(f"code snapshot {snapshot_id} names a file outside its root: {str(rel)[:200]!r}")
    return man
