"""Removal: runs, replays, old checkpoints, unreferenced blobs and leftovers (``flightlog rm`` / ``gc``, whose
arguments and confirmation live in sdk/_store_cli.py).

What references a blob (content-addressed, shared between runs): a run's code
snapshot manifest and the files it lists (``runs.code_snapshot``), checkpoints
(``checkpoints.content_hash``) and captured step inputs (``io.payload``). A
blob is removed only when no remaining run references it.

Never corrupting a run being written:

* runs that read as live (``running`` with a fresh heartbeat or a live local
  process) are refused (``rm``) or left alone (``gc``) unless ``--force``;
* a blob written or re-used in the last ``GRACE_S`` seconds is kept: a live
  process may have stored it and not yet flushed the row that references it
  (``put_blob`` refreshes the mtime of a blob it re-uses);
* files are rewritten through the store's atomic writer (temp name + rename),
  so a reader sees the old file or the new one, never half of one.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from flightlog._errors import FlightlogError, QueryError
from flightlog.collector import blobs as _blobs
from flightlog.collector import schema as _schema
from flightlog.collector import store as _store

GRACE_S = 3600.0  # blobs and temp files younger than this are never removed
_REPLAY_ID_PREFIX = "rp"


def _size(p: Path) -> int:
    try:
        if p.is_dir() and not p.is_symlink():
            return sum(_size(c) for c in p.iterdir())
        return p.lstat().st_size
    except OSError:
        return 0


def _fmt_bytes(n: int) -> str:
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n} B"


def _digest_of(ref: Any) -> str | None:
    """The blob id inside a reference (``cloudpickle:<id>``, ``blobs/ab/<id>``, ``<id>``); None otherwise."""
    if not isinstance(ref, str):
        return None
    tail = ref.rsplit(":", 1)[-1].rsplit("/", 1)[-1]
    try:
        return _blobs.check_blob_id(tail)
    except _blobs.BlobError:
        return None


def blob_refs(root: str, con, skip_checkpoints: dict[str, set[int]] | None = None) -> dict[str, set[str]]:
    """run_id -> the blob ids it references (snapshot manifest and its files, checkpoints, captured inputs).

    ``skip_checkpoints`` (run_id -> iterations) leaves out checkpoints about to be pruned.
    """
    skip = skip_checkpoints or {}
    refs: dict[str, set[str]] = {}

    def add(rid, ref):
        d = _digest_of(ref)
        if rid is not None and d:
            refs.setdefault(rid, set()).add(d)

    manifests: dict[str, list[str]] = {}
    for rid, snap in con.execute("SELECT run_id, code_snapshot FROM runs WHERE code_snapshot IS NOT NULL").fetchall():
        add(rid, snap)
        d = _digest_of(snap)
        if d:
            manifests.setdefault(d, []).append(rid)
    for rid, it, st, h, path in con.execute(
            "SELECT run_id, iteration, status, content_hash, path FROM checkpoints").fetchall():
        if st == "ok" and it in skip.get(rid, ()):
            continue
        add(rid, h)
        add(rid, path)
    for rid, payload in con.execute("SELECT DISTINCT run_id, payload FROM io WHERE payload IS NOT NULL").fetchall():
        add(rid, payload)
    for d, rids in manifests.items():
        try:
            man = json.loads(_blobs.read_blob(root, d, what="code snapshot"))
            files = man.get("files", {}) if isinstance(man, dict) else {}
        except Exception:
            continue  # missing or damaged manifest: it references nothing we can see
        for f in files.values() if isinstance(files, dict) else ():
            for rid in rids:
                add(rid, f)
    return refs


def _all_blobs(root: str) -> dict[str, Path]:
    out: dict[str, Path] = {}
    base = Path(root) / "blobs"
    try:
        subs = list(base.iterdir())
    except OSError:
        return out
    for sub in subs:
        if not sub.is_dir() or sub.is_symlink():
            continue
        try:
            names = os.listdir(sub)
        except OSError:
            continue
        for n in names:
            if _digest_of(n) == n:
                out[n] = sub / n
    return out


def _young(p: Path, now: float, since: float | None = None, grace: float = GRACE_S) -> bool:
    """Written within ``grace`` seconds, or since ``since`` (the oldest live run's start)."""
    try:
        m = p.lstat().st_mtime
    except OSError:
        return False
    return now - m < grace or (since is not None and m >= since)


def _live_since(con, exclude: Iterable[str] = ()) -> float | None:
    """Start time (epoch s) of the oldest live run not in ``exclude``; None when nothing is being written."""
    ex = list(exclude)
    row = con.execute("SELECT min(epoch(started_at)) FROM runs WHERE status = 'running' "
                      "AND NOT list_contains(?, run_id)", [ex]).fetchall()
    return row[0][0] if row and row[0][0] is not None else None


def _rewrite(f: Path, table: str, drop) -> tuple[int, int]:
    """Rewrite ``f`` without the rows where ``drop(t)`` is true; returns (rows dropped, bytes freed)."""
    t = pq.read_table(f)
    mask = pc.fill_null(drop(t), False)
    n = int(pc.sum(mask).as_py() or 0)
    if n == 0:
        return 0, 0
    before = _size(f)
    keep = t.filter(pc.invert(mask))
    if keep.num_rows == 0:
        f.unlink()
        return n, before
    meta = t.schema.metadata
    data = _schema.conform(table, keep)
    if meta:
        data = data.replace_schema_metadata({k: v for k, v in meta.items() if not k.startswith(b"ARROW:")})
    _store.write_parquet_atomic(f, data, table)
    return n, max(0, before - _size(f))


# -- rm ----------------------------------------------------------------------------------

def _local_only(root: str, what: str) -> None:
    from flightlog.collector import fs as _fs

    if _fs.is_remote(root):
        raise FlightlogError(f"flightlog {what} works on a local store; {root} is an object store (not supported "
                             "yet: delete a run's run_id=<id> prefix under each table with the store's own tools)")


def plan_rm(store: str | None, refs_in: list[str], force: bool = False) -> dict:
    """What ``rm`` would remove: runs (with their replay children) and replays, each checked."""
    from flightlog import _config
    from flightlog.query import db

    root = _config.store_home(store)
    _local_only(root, "rm")
    con = db.connect(store)
    try:
        replay_ids = {r[0]: r[1] for r in con.execute("SELECT DISTINCT replay_id, run_id FROM replays").fetchall()}
        runs: list[str] = []
        replays: dict[str, str] = {}
        for ref in refs_in:
            if ref in replay_ids and ref.startswith(_REPLAY_ID_PREFIX):
                replays[ref] = replay_ids[ref]
                continue
            rid = db.resolve_run(con, ref)
            if rid not in runs:
                runs.append(rid)
        info = {r[0]: r[1:] for r in con.execute(
            "SELECT run_id, status, kind, name, parent_run_id FROM runs").fetchall()}
        # replay children (kind='replay') go with their run; resumed runs are runs of their own
        for rid in list(runs):
            for cid, (st, kind, name, parent) in info.items():
                if parent == rid and kind == "replay" and cid not in runs:
                    runs.append(cid)
        live = [r for r in runs if info[r][0] == "running"]
        live += [f"{rp} (replay of live run {rid})" for rp, rid in replays.items()
                 if info.get(rid, ("",))[0] == "running"]
        if live and not force:
            raise FlightlogError(f"refusing to remove what is still being written: {', '.join(live)} "
                                 "(wait for it to end, or pass --force if its process is gone)")
        resumed = [(cid, parent) for cid, (st, kind, name, parent) in info.items()
                   if parent in runs and kind == "resume" and cid not in runs]
        scratch = {r[0]: r[1] for r in con.execute(
            "SELECT DISTINCT replay_id, scratch FROM replays WHERE list_contains(?, run_id) OR list_contains(?, replay_id)",
            [runs, list(replays)]).fetchall()}
        refs = blob_refs(root, con)
        since = _live_since(con, runs)
    finally:
        con.close()
    mine: set[str] = set()
    for r in runs:
        mine |= refs.get(r, set())
    others: set[str] = set()
    for r, s in refs.items():
        if r not in runs:
            others |= s
    return {"root": root, "runs": runs, "info": {r: info[r] for r in runs}, "replays": replays,
            "resumed": resumed, "blobs": sorted(mine - others), "shared_blobs": len(mine & others),
            "scratch": scratch, "live_since": since}


def _remove_replay(root: str, run_id: str, replay_id: str, dry: bool) -> tuple[int, int]:
    """Delete the files a replay wrote into its run's partitions (its writer ids start with the replay id)."""
    files = freed = 0
    for table in _schema.TABLES:
        d = _store.part_dir(root, table, run_id)
        try:
            names = os.listdir(d)
        except OSError:
            continue
        for n in names:
            w = _store._file_writer(n)
            if w and w.startswith(replay_id):
                f = d / n
                freed += _size(f)
                files += 1
                if not dry:
                    f.unlink(missing_ok=True)
    return files, freed


def rm(store: str | None, refs_in: list[str], *, force: bool = False, dry_run: bool = False,
       out=None) -> int:
    """Remove runs / replays (see ``configure_rm``); returns bytes freed (or that would be)."""
    out = out or sys.stdout
    plan = plan_rm(store, refs_in, force)
    root = plan["root"]
    now = time.time()
    freed = 0
    verb = "would remove" if dry_run else "removed"
    for rid in plan["runs"]:
        n = 0
        for table in _schema.TABLES:
            d = _store.part_dir(root, table, rid)
            if d.exists():
                n += _size(d)
                if not dry_run:
                    shutil.rmtree(d, ignore_errors=True)
        freed += n
        st, kind, name, _ = plan["info"][rid]
        print(f"{verb} run {rid}" + (f" ({name})" if name else "") + f" [{kind}, {st}]: {_fmt_bytes(n)} of rows",
              file=out)
    for rp, rid in plan["replays"].items():
        files, n = _remove_replay(root, rid, rp, dry_run)
        freed += n
        print(f"{verb} replay {rp} of run {rid}: {files} file(s), {_fmt_bytes(n)}", file=out)
    for rp, path in plan["scratch"].items():
        if path and os.path.isdir(path) and Path(path).resolve().is_relative_to(Path(root).resolve() / "scratch"):
            n = _size(Path(path))
            freed += n
            if not dry_run:
                shutil.rmtree(path, ignore_errors=True)
            print(f"{verb} scratch folder of replay {rp}: {_fmt_bytes(n)}", file=out)
    blobs = _all_blobs(root)
    kept = 0
    nb = bb = 0
    for d in plan["blobs"]:
        p = blobs.get(d)
        if p is None:
            continue
        if _young(p, now, plan["live_since"], grace=0.0):
            kept += 1  # a live run may have just re-used it
            continue
        bb += _size(p)
        nb += 1
        if not dry_run:
            p.unlink(missing_ok=True)
    freed += bb
    print(f"{verb} {nb} blob(s) no other run references: {_fmt_bytes(bb)}"
          + (f" ({plan['shared_blobs']} shared with other runs kept)" if plan["shared_blobs"] else ""), file=out)
    if kept:
        print(f"kept {kept} recent blob(s) that a live run may be using; `flightlog gc` removes them later", file=out)
    for cid, parent in plan["resumed"]:
        print(f"note: run {cid} resumed from {parent}; its record before the resume point is gone with {parent}",
              file=out)
    print(f"{'would free' if dry_run else 'freed'} {_fmt_bytes(freed)} ({freed} bytes)", file=out)
    return freed


# -- gc ----------------------------------------------------------------------------------

def _prune_plan(con, keep_last: int | None, older_than: float | None) -> tuple[dict, list[str]]:
    """run_id -> checkpoint rows (iteration, position, content_hash, bytes) to drop; and notes on what replay loses."""
    if keep_last is None and older_than is None:
        return {}, []
    keep_n = keep_last if keep_last is not None else 0
    cond = "r.status NOT IN ('running')"
    binds: list = []
    if older_than is not None:
        cond += " AND r.started_at < now() - to_microseconds(CAST(? * 86400e6 AS BIGINT))"
        binds.append(older_than)
    rows = con.execute(f"""
        SELECT c.run_id, c.iteration, c.position, c.content_hash, c.bytes,
               row_number() OVER (PARTITION BY c.run_id ORDER BY c.iteration DESC, c.time DESC) AS back,
               count(*) OVER (PARTITION BY c.run_id) AS total
        FROM checkpoints c JOIN runs r USING (run_id)
        WHERE c.status = 'ok' AND {cond}
        ORDER BY c.run_id, c.iteration""", binds).fetchall()
    # a resumed run continues from its parent's newest checkpoint: never prune that one
    needed = {(r[0], r[1]) for r in con.execute("""
        SELECT c.run_id, max(c.iteration) FROM checkpoints c
        WHERE c.status = 'ok' AND c.run_id IN (SELECT parent_run_id FROM runs WHERE kind = 'resume')
        GROUP BY 1""").fetchall()}
    drop: dict[str, list[tuple]] = {}
    kept_first: dict[str, int | None] = {}
    for rid, it, pos, h, nbytes, back, total in rows:
        if back <= keep_n or (rid, it) in needed:
            if back <= keep_n:
                kept_first[rid] = it if kept_first.get(rid) is None else min(kept_first[rid], it)
            continue
        drop.setdefault(rid, []).append((it, pos, h, nbytes))
    notes = []
    for rid, items in drop.items():
        its = sorted({i[0] for i in items})
        first = kept_first.get(rid)
        if first is None:
            notes.append(f"run {rid}: all {len(its)} checkpoint(s) pruned; a replay re-executes the run from its "
                         "start (no skipping, no parallel segments)")
        else:
            notes.append(f"run {rid}: checkpoints of iterations {its[0]}..{its[-1]} pruned; replaying epochs 0..{first} "
                         f"now re-executes from the run's start, epochs after {first} still start from a checkpoint")
    return drop, notes


def gc(store: str | None, keep_last: int | None = None, older_than: float | None = None,
       dry_run: bool = False, out=None) -> int:
    """Prune checkpoints by retention, then remove unreferenced blobs and leftovers; returns bytes freed."""
    out = out or sys.stdout
    from flightlog import _config
    from flightlog.query import db

    if keep_last is not None and keep_last < 0:
        raise QueryError(f"--keep-last must be 0 or more, got {keep_last}")
    if older_than is not None and not older_than >= 0:
        raise QueryError(f"--older-than must be a number of days >= 0, got {older_than}")
    root = _config.store_home(store)
    _local_only(root, "gc")
    if not os.path.isdir(root):
        raise FlightlogError(f"no flightlog store at {root} (set FLIGHTLOG_HOME or pass --store)")
    now = time.time()
    verb = "would remove" if dry_run else "removed"
    freed = 0
    con = db.connect(store)
    try:
        drop, notes = _prune_plan(con, keep_last, older_than)
        since = _live_since(con)
        known_replays = {r[0] for r in con.execute("SELECT DISTINCT replay_id FROM replays").fetchall()}
    finally:
        con.close()
    pruned_rows = 0
    for rid, items in drop.items():
        its = pa.array(sorted({i[0] for i in items}), pa.int64())
        d = _store.part_dir(root, "checkpoints", rid)
        for f in _store.visible_files(d):
            if dry_run:
                continue
            n, _ = _rewrite(f, "checkpoints", lambda t: pc.and_(pc.is_in(t.column("iteration"), its),
                                                                 pc.equal(t.column("status"), "ok")))
            pruned_rows += n
        if dry_run:
            pruned_rows += len(items)
    if drop:
        print(f"{verb} {pruned_rows} checkpoint(s) of {len(drop)} run(s) by retention", file=out)
        for n in notes:
            print("  " + n, file=out)
    # blobs no run references (after the pruning above)
    con = db.connect(store)
    try:
        refs = blob_refs(root, con, {rid: {i[0] for i in items} for rid, items in drop.items()})
    finally:
        con.close()
    used: set[str] = set().union(*refs.values()) if refs else set()
    pruned = {i[2] for items in drop.values() for i in items}  # known finished-run blobs: no grace period
    nb = bb = young = 0
    for d, p in _all_blobs(root).items():
        if d in used:
            continue
        if _young(p, now, since, grace=0.0 if d in pruned else GRACE_S):
            young += 1
            continue
        bb += _size(p)
        nb += 1
        if not dry_run:
            p.unlink(missing_ok=True)
    freed += bb
    print(f"{verb} {nb} unreferenced blob(s): {_fmt_bytes(bb)}"
          + (f" (kept {young} younger than {GRACE_S / 3600:g} h or newer than a live run)" if young else ""), file=out)
    # leftovers: temp files of interrupted writes, scratch folders of replays with no record
    nt = bt = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [x for x in dirnames if x not in ("spool",)]
        for n in filenames:
            if n.startswith(".") and n.endswith(".tmp"):
                p = Path(dirpath) / n
                if not _young(p, now):
                    nt += 1
                    bt += _size(p)
                    if not dry_run:
                        p.unlink(missing_ok=True)
    sroot = Path(root) / "scratch"
    try:
        scratch = [p for p in sroot.iterdir() if p.is_dir() and not p.is_symlink()]
    except OSError:
        scratch = []
    for p in scratch:
        if p.name not in known_replays and not _young(p, now):
            nt += 1
            bt += _size(p)
            if not dry_run:
                shutil.rmtree(p, ignore_errors=True)
    freed += bt
    print(f"{verb} {nt} leftover temp file(s)/folder(s): {_fmt_bytes(bt)}", file=out)
    print(f"{'would free' if dry_run else 'freed'} {_fmt_bytes(freed)} ({freed} bytes)", file=out)
    return freed
