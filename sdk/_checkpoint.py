"""``fl.checkpointing``: what a checkpoint holds, when to take one, and restoring it.

On the training thread a checkpoint is only a consistent in-memory copy
(tensor clones, state-dict copies, RNG states, loop position). A background
thread serialises, hashes and writes it as a content-addressed blob (temp file
+ rename, identical blobs stored once) and then queues its row in the
``checkpoints`` table, so the table only ever lists complete checkpoints.

Period: every outer iteration when that is affordable; otherwise the period
adapts so that (copy + write time) stays under ``overhead`` (default 2%) of the
loop time, the FLOR rule. ``every=N`` fixes it.
"""
from __future__ import annotations

import contextlib
import copy
import io
import math
import queue
import random
import sys
import threading
import time
from typing import Any, Callable, Iterator

import numpy as np

from flightlog import _run, _warn
from flightlog.collector import blobs as _blobs

DEFAULT_OVERHEAD = 0.02
FORMAT = 1


# -- copying state on the training thread ---------------------------------------------

def _torch():
    return sys.modules.get("torch")


def _map_tree(obj: Any, leaf: Callable[[Any], Any]) -> Any:
    """``leaf`` applied to every non-container of a state tree, the containers rebuilt around the results.

    Containers: dicts (of their own type), lists, tuples and namedtuples (their own type); anything
    else, tuple subclasses such as ``torch.Size`` included, is a leaf. The one walk of the copy
    (:func:`_clone_tree`), serialise (:func:`_portable`) and restore (:func:`_restore_tree`) steps.
    """
    if isinstance(obj, dict):
        if type(obj) is dict:
            return {k: _map_tree(v, leaf) for k, v in obj.items()}
        return type(obj)((k, _map_tree(v, leaf)) for k, v in obj.items())
    if isinstance(obj, list):
        return [_map_tree(v, leaf) for v in obj]
    if type(obj) is tuple:
        return tuple(_map_tree(v, leaf) for v in obj)
    if isinstance(obj, tuple) and hasattr(type(obj), "_make"):  # a namedtuple
        return type(obj)._make(_map_tree(v, leaf) for v in obj)
    return leaf(obj)


def _clone_leaf(obj: Any) -> Any:
    torch = _torch()
    if torch is not None and isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, np.ndarray):
        return obj.copy()
    return copy.deepcopy(obj)


def _clone_tree(obj: Any) -> Any:
    """Deep copy of a state dict: tensors cloned (detached, on their device), containers rebuilt."""
    return _map_tree(obj, _clone_leaf)


def _kind(obj: Any) -> str:
    if hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict"):
        return "state_dict"
    torch = _torch()
    if torch is not None and isinstance(obj, torch.Tensor):
        return "tensor"
    if isinstance(obj, np.ndarray):
        return "ndarray"
    if isinstance(obj, np.random.Generator):
        return "np_generator"
    if isinstance(obj, random.Random):
        return "py_random"
    return "pickle"


def copy_object(obj: Any) -> tuple[str, Any]:
    """A consistent copy of one registered object, cheap for tensors."""
    kind = _kind(obj)
    if kind == "state_dict":
        return kind, _clone_tree(obj.state_dict())
    if kind == "ndarray":
        return kind, obj.copy()
    if kind == "tensor":
        return kind, obj.detach().clone()
    if kind == "np_generator":
        return kind, copy.deepcopy(obj.bit_generator.state)
    if kind == "py_random":
        return kind, obj.getstate()
    import cloudpickle

    return kind, cloudpickle.dumps(obj)  # anything else: its pickle is the copy


def restore_object(obj: Any, kind: str, state: Any) -> Any:
    """Load ``state`` into ``obj`` in place where possible; returns the (new) object."""
    if kind == "state_dict":
        obj.load_state_dict(state)
        return obj
    if kind == "ndarray":
        if isinstance(obj, np.ndarray) and obj.shape == state.shape and obj.flags.writeable:
            obj[...] = state
            return obj
        return state
    if kind == "tensor":
        # in place: the script's (and the optimizer's) references stay valid
        torch = _torch()
        with torch.no_grad():
            if obj.shape == state.shape and obj.dtype == state.dtype:
                obj.copy_(state.to(obj.device))
            else:
                obj.data = state.to(obj.device)
        return obj
    if kind == "np_generator":
        obj.bit_generator.state = state
        return obj
    if kind == "py_random":
        obj.setstate(state)
        return obj
    import cloudpickle

    new = cloudpickle.loads(state)
    try:  # keep the user's reference valid when the type allows it
        if hasattr(obj, "__dict__") and type(obj) is type(new):
            obj.__dict__.clear()
            obj.__dict__.update(new.__dict__)
            return obj
    except Exception:
        pass
    if isinstance(obj, dict) and isinstance(new, dict):
        obj.clear()
        obj.update(new)
        return obj
    if isinstance(obj, list) and isinstance(new, list):
        obj[:] = new
        return obj
    return new


def rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state()}
    torch = _torch()
    if torch is not None:
        st["torch"] = torch.get_rng_state().clone()
        try:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                st["cuda"] = [s.clone() for s in torch.cuda.get_rng_state_all()]
        except Exception:
            pass
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch = _torch()
    if "torch" in st:
        if torch is None:
            import torch  # noqa: F811 - the checkpoint came from a torch run
        torch.set_rng_state(st["torch"])
    if "cuda" in st and torch is not None:
        try:
            torch.cuda.set_rng_state_all(st["cuda"])
        except Exception as e:
            _warn.problem("cuda_rng", f"could not restore CUDA RNG state: {e!r}")


# -- serialising -----------------------------------------------------------------------

class _Tensor:
    """A tensor in a checkpoint: dtype, shape, device and its raw bytes (an out-of-band buffer)."""

    __slots__ = ("dtype", "shape", "device", "data")

    def __init__(self, dtype: str, shape: tuple, device: str, data) -> None:
        self.dtype, self.shape, self.device, self.data = dtype, shape, device, data

    def __reduce__(self):
        return (_Tensor, (self.dtype, self.shape, self.device, self.data))


def _portable_leaf(obj: Any) -> Any:
    torch = _torch()
    if torch is not None and isinstance(obj, torch.Tensor):
        t = obj.detach()
        dev = str(t.device)
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else np.zeros(0, np.uint8)
        return _Tensor(str(t.dtype).split(".")[-1], tuple(t.shape), dev, raw)
    return obj


def _portable(obj: Any) -> Any:
    """Tensors become raw-byte numpy views (no copy), so pickle protocol 5 ships them out of band."""
    return _map_tree(obj, _portable_leaf)


def _restore_tree(obj: Any) -> Any:
    """The inverse of :func:`_portable`: tensors rebuilt (on their device when it exists), arrays writeable."""
    return _map_tree(obj, _restore_leaf)


def _restore_leaf(obj: Any) -> Any:
    if isinstance(obj, _Tensor):
        import torch

        dtype = getattr(torch, obj.dtype)
        t = torch.from_numpy(np.array(obj.data, dtype=np.uint8, copy=True))
        t = t.view(dtype).reshape(obj.shape) if t.numel() else torch.empty(obj.shape, dtype=dtype)
        if obj.device != "cpu":
            try:
                t = t.to(obj.device)
            except Exception:
                pass  # no such device here: keep it on the CPU
        return t
    if isinstance(obj, np.ndarray):
        return obj if obj.flags.writeable else obj.copy()
    return obj


_MAGIC = b"FLC2"


def serialize_parts(payload: dict) -> list:
    """The checkpoint as a list of buffers: a header, the pickle, then each array's raw bytes.

    Arrays never get copied into one big bytes object: the parts are hashed and
    written as they are (pickle protocol 5, out-of-band buffers).
    """
    import struct

    import cloudpickle

    bufs: list = []
    body = cloudpickle.dumps(_portable(payload), protocol=5, buffer_callback=bufs.append)
    raws = [b.raw() for b in bufs]
    head = struct.pack(f"<4sIQ{len(raws)}Q", _MAGIC, len(raws), len(body), *[r.nbytes for r in raws])
    return [head, body, *raws]


def serialize(payload: dict) -> bytes:
    return b"".join(bytes(p) for p in serialize_parts(payload))


def deserialize(data: bytes) -> dict:
    if data[:4] == _MAGIC:
        import struct

        import cloudpickle

        n, blen = struct.unpack_from("<IQ", data, 4)
        sizes = struct.unpack_from(f"<{n}Q", data, 16)
        off = 16 + 8 * n
        mv = memoryview(data)
        body = mv[off:off + blen]
        off += blen
        bufs = []
        for size in sizes:
            bufs.append(mv[off:off + size])
            off += size
        return _restore_tree(cloudpickle.loads(body, buffers=bufs))
    if data[:4] == b"FLCP":
        import cloudpickle

        return cloudpickle.loads(data[4:])
    import torch

    return torch.load(io.BytesIO(data), weights_only=False)


def digest(data) -> str:
    """The content hash checkpoints are stored under (the blob store's)."""
    return _blobs.blob_digest(data)


def digest_parts(parts: list) -> str:
    """The digest of the concatenated parts, without concatenating them."""
    import xxhash

    h = xxhash.xxh3_128()
    for p in parts:
        h.update(p)
    return h.hexdigest()


# -- the checkpointer ----------------------------------------------------------------------

class Checkpointer:
    """Registered objects, the period policy and the background writer of one run."""

    def __init__(self, run, objects: dict[str, Any], every: int | None, overhead: float | None) -> None:
        self.run = run
        self.objects = dict(objects)
        self.every = every
        self.overhead = DEFAULT_OVERHEAD if overhead is None else float(overhead)
        self.cost_ms: float | None = None  # estimated cost of one checkpoint (copy + write)
        self.since_ms = 0.0  # loop time since the last checkpoint
        self.taken = 0
        self._q: queue.Queue = queue.Queue(maxsize=3)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.last_write_ms: float | None = None
        self.warned: set = set()  # loop variables already named in a "not captured" warning

    # policy
    def due(self, index: int, loop_ms: float, last: bool) -> bool:
        self.since_ms += loop_ms
        if self.every is not None:
            return (index + 1) % self.every == 0 or last
        if self.cost_ms is None or last:
            return True
        return self.since_ms * self.overhead >= self.cost_ms

    def on_boundary(self, run, loop_name: str, index: int, loop_s: float, position: str,
                    scopes: list | None = None) -> None:
        """Called once per outer iteration: after its first inner loop, or at its end."""
        try:
            frame_total = run.loops[0].total if run.loops else None
            last = frame_total is not None and index == frame_total - 1
            if not self.due(index, loop_s * 1000.0, last):
                return
            self.take(loop_name, index, self.since_ms, position, scopes)
            self.since_ms = 0.0
        except Exception as e:
            _warn.problem("checkpoint_failed", f"checkpoint after {loop_name} {index} failed: {e!r}")

    def snapshot(self, loop_name: str, index: int, position: str = "iteration_end",
                 scopes: list | None = None) -> tuple[dict, list[str]]:
        objs, skipped = {}, []
        for name, obj in self.objects.items():
            try:
                objs[name] = copy_object(obj)
            except Exception as e:
                skipped.append(name)
                _warn.problem("checkpoint_unpicklable",
                              f"cannot checkpoint {name!r} ({type(obj).__name__}): {e!r}; left out")
        carried, summary = {}, None
        if scopes:
            try:
                from flightlog import _carried

                carried, summary = _carried.capture(scopes, self.objects)
                _carried.warn_uncaptured(summary, self.warned)
            except Exception as e:
                summary = {"vars": [], "uncaptured": {"*": f"capture failed: {e!r}"[:200]}}
                _warn.problem("capture_failed", f"loop variables not captured: {e!r}")
        payload = {
            "format": FORMAT,
            "carried": carried,
            "captured": summary,
            "run_id": self.run.run_id,
            "loop": loop_name,
            "iteration": index,
            "objects": objs,
            "rng": rng_state(),
            "steps": dict(self.run.steps),
            "position": position,
            "skipped": skipped,
        }
        return payload, skipped

    def take(self, loop_name: str, index: int, loop_ms: float, position: str = "iteration_end",
             scopes: list | None = None) -> None:
        t0 = time.perf_counter()
        payload, skipped = self.snapshot(loop_name, index, position, scopes)
        copy_ms = (time.perf_counter() - t0) * 1000.0
        self._ensure_thread()
        item = (payload, loop_name, index, copy_ms, loop_ms, skipped, position)
        try:
            if self.every is not None:
                # A fixed period is a promise: wait for the writer rather than skip.
                self._q.put(item, timeout=600)
            else:
                self._q.put_nowait(item)
        except queue.Full:
            # The writer is behind: take fewer checkpoints rather than stall training.
            _warn.problem("checkpoint_skipped", "checkpoint writer is behind; skipped one checkpoint")
            return
        if self.cost_ms is None:
            self.cost_ms = copy_ms

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._work, name="flightlog-checkpoint", daemon=True)
            self._thread.start()

    def _work(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                self._q.task_done()
                return
            try:
                self._write(*item)
            except Exception as e:
                _warn.problem("checkpoint_failed", f"checkpoint write failed: {e!r}")
            finally:
                self._q.task_done()

    def _write(self, payload, loop_name, index, copy_ms, loop_ms, skipped, position) -> None:
        t0 = time.perf_counter()
        c0 = time.thread_time()
        parts = serialize_parts(payload)
        h = digest_parts(parts)
        path, _new = _blobs.put_blob(self.run.store, h, parts, likely_new=True)
        nbytes = sum(memoryview(p).nbytes for p in parts)
        write_ms = (time.perf_counter() - t0) * 1000.0
        self.last_write_ms = write_ms
        # The policy charges what the write costs the process: this thread's CPU time, not
        # its wall time (which includes waiting for the GIL while training runs).
        cost = copy_ms + (time.thread_time() - c0) * 1000.0
        self.cost_ms = cost if self.cost_ms is None else 0.7 * self.cost_ms + 0.3 * cost
        self.taken += 1
        self.run.rec.emit("checkpoints", {
            "run_id": self.run.run_id,
            "loop": loop_name,
            "iteration": index,
            "position": position,
            "path": f"blobs/{h[:2]}/{h}",
            "bytes": nbytes,
            "content_hash": h,
            "copy_ms": copy_ms,
            "write_ms": write_ms,
            "loop_ms": loop_ms,
            "time": _run._now(),
            "status": "ok" if not skipped else "partial",
            "error": ("left out: " + ", ".join(skipped)) if skipped else None,
            "captured": _json_summary(payload.get("captured")),
            "rank": _rank(),
        })
        self.run.rec.request_flush()  # make the index row durable soon after the blob

    def close(self, timeout: float = 120.0) -> None:
        """Wait for queued checkpoints to be written (at the end of the with-block / run)."""
        t = self._thread
        if t is None or not t.is_alive():
            return
        try:
            self._q.put(None, timeout=timeout)
        except queue.Full:
            return
        t.join(timeout)


def _rank() -> int | None:
    from flightlog import _ddp

    rank, world, _local = _ddp.rank_info()
    return rank if world > 1 else None


def _json_summary(summary: dict | None) -> str | None:
    if summary is None:
        return None
    import json

    return json.dumps(summary, separators=(",", ":"), default=str)


@contextlib.contextmanager
def checkpointing(*, every: int | None = None, overhead: float | None = None, **objects: Any) -> Iterator[Checkpointer | None]:
    """Register what each checkpoint holds (models, optimizers, schedulers, arrays, anything picklable).

    Checkpoints are taken at the end of iterations of the outermost ``fl.loop``
    inside the block. ``every=N`` fixes the period; ``overhead=0.05`` changes the
    adaptive bound (default 2% of loop time).
    """
    r = _run.ACTIVE or _run._auto_start()
    mgr = None
    if r is not None:
        try:
            if every is not None and (not isinstance(every, int) or every < 1):
                _warn.problem("bad_argument", f"checkpointing(every={every!r}) must be a positive int; adapting")
                every = None
            if overhead is not None and (not isinstance(overhead, (int, float)) or not 0 < overhead < 1
                                         or math.isnan(overhead)):
                _warn.problem("bad_argument", f"checkpointing(overhead={overhead!r}) must be in (0, 1); using 2%")
                overhead = None
            mgr = r.mode.checkpointing(r, objects, every, overhead)
        except Exception as e:
            _warn.problem("checkpoint_setup", f"checkpointing setup failed: {e!r}")
    try:
        yield mgr
    finally:
        if r is not None and isinstance(mgr, Checkpointer):
            try:
                mgr.close()
            except Exception:
                pass
            if r.checkpointer is mgr:
                r.checkpointer = None


def new_checkpointer(run, objects: dict, every, overhead) -> Checkpointer:
    """Record and resume modes: a checkpointer that writes, closed when the run ends."""
    mgr = Checkpointer(run, objects, every, overhead)
    run.checkpointer = mgr
    run.finish_hooks.append(lambda _r, m=mgr: m.close())
    return mgr


def load(store: str, content_hash: str, what: str = "checkpoint") -> dict:
    """The one checkpoint load path (resume and replay): read, verify the digest, deserialise."""
    from flightlog._errors import StoreError

    try:
        data = _blobs.read_blob(store, content_hash)
    except OSError as e:
        raise StoreError(f"{what} {content_hash} cannot be read: {e}") from None
    if digest(data) != content_hash:
        raise StoreError(f"{what} {content_hash} is corrupt (hash mismatch)")
    return deserialize(data)


def restore(run, payload: dict, objects: dict[str, Any], scopes: dict[str, Any] | None = None) -> list[str]:
    """Restore a checkpoint: registered objects, RNG states, step counters and loop-carried variables.

    ``scopes`` maps ``outer``/``inner`` to the frames iterating the loops now.
    Returns the captured variables that could not be written back.
    """
    apply_payload(run, payload, objects)
    carried = payload.get("carried")
    if not carried:
        return []
    from flightlog import _carried

    return _carried.restore(carried, scopes or {}, objects)


def apply_payload(run, payload: dict, objects: dict[str, Any]) -> None:
    """Restore registered objects, RNG states and step counters from a checkpoint payload."""
    for name, (kind, state) in payload["objects"].items():
        obj = objects.get(name)
        if obj is None:
            _warn.problem("restore_missing", f"checkpoint holds {name!r} but it is not registered now")
            continue
        new = restore_object(obj, kind, state)
        if new is not obj:
            _warn.problem("restore_rebound", f"{name!r} could not be restored in place; "
                                             "register mutable objects (state_dict, arrays) for exact resume")
    set_rng_state(payload["rng"])
    run.steps.clear()
    run.steps.update(payload.get("steps", {}))
