"""System metrics: CPU, memory and GPU samples as ``sys/...`` metrics, taken by the flush thread.

Sampling rides on the recorder's ``on_flush`` hook (the flush thread runs it after
every flush, about once a second) and does real work only every ``interval``
seconds (10 by default): a few reads of ``/proc`` and, when the script already
imported torch and initialised CUDA, the allocator's counters (never creating a
CUDA context of its own). Every failure is swallowed after one warning: a
sampler must never disturb the run it watches.

Names (one value per sample, steps count samples):

* ``sys/cpu_pct``       this process's CPU time over the interval, 100 = one core busy
* ``sys/host_cpu_pct``  the whole machine's CPU use (Linux), 100 = every core busy
* ``sys/rss_mb``        resident memory of this process
* ``sys/gpu<i>/mem_allocated_mb``, ``sys/gpu<i>/mem_reserved_mb``  torch's allocator on device i
* ``sys/gpu<i>/util_pct``, ``sys/gpu<i>/mem_used_pct``  device-wide, when NVML is installed
"""
from __future__ import annotations

import os
import sys
import time

from flightlog import _config, _warn

DEFAULT_INTERVAL = 10.0
PREFIX = "sys/"


def enabled(flag: bool | None) -> bool:
    """``fl.init(system_metrics=)`` if given, else ``FLIGHTLOG_SYSTEM_METRICS`` (default on)."""
    if flag is not None:
        return bool(flag)
    return os.environ.get(_config.ENV_SYSTEM_METRICS, "1").strip().lower() not in ("0", "false", "no", "off")


def attach(run, flag: bool | None = None) -> "Sampler | None":
    """Start sampling for ``run`` (on its flush thread); None when turned off."""
    if not enabled(flag):
        return None
    interval = _config.resolve(None, _config.ENV_SYSTEM_METRICS_INTERVAL, DEFAULT_INTERVAL, float)
    if not interval == interval or interval <= 0:  # NaN or non-positive: the default
        interval = DEFAULT_INTERVAL
    s = Sampler(run, max(0.05, interval))
    run.rec.on_flush.append(s)
    return s


def _read(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return None


def _host_cpu() -> tuple[float, float] | None:
    """(busy, total) jiffies of the whole machine from /proc/stat; None elsewhere."""
    text = _read("/proc/stat")
    if not text or not text.startswith("cpu "):
        return None
    f = [float(x) for x in text.split("\n", 1)[0].split()[1:]]
    idle = f[3] + (f[4] if len(f) > 4 else 0.0)  # idle + iowait
    total = sum(f[:8])  # guest time is already inside user/nice
    return total - idle, total


def _rss_mb() -> float | None:
    text = _read("/proc/self/statm")
    if text:
        try:
            return int(text.split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except (ValueError, IndexError, OSError):
            pass
    try:
        import psutil  # optional

        return psutil.Process().memory_info().rss / 2**20
    except Exception:
        return None


class Sampler:
    """Called after every flush; samples when ``interval`` seconds have passed since the last sample."""

    def __init__(self, run, interval: float) -> None:
        self.run = run
        self.interval = interval
        self.pid = os.getpid()
        self.samples = 0
        self._nvml = None  # False: not available
        self._mark()

    def _mark(self) -> None:
        self.t_wall = time.monotonic()
        t = os.times()
        self.t_cpu = t.user + t.system
        self.t_host = _host_cpu()

    def __call__(self) -> None:
        try:
            run = self.run
            if run.finished or os.getpid() != self.pid:  # ending, or a forked child: not our process
                return
            if time.monotonic() - self.t_wall < self.interval:
                return
            self.sample()
        except Exception as e:
            _warn.problem("sysmetrics_error", f"system metrics sampling failed: {e!r}")

    def values(self) -> dict[str, float]:
        """One sample: every value that could be read now (and the baseline for the next one)."""
        out: dict[str, float] = {}
        now = time.monotonic()
        t = os.times()
        cpu = t.user + t.system
        dt = now - self.t_wall
        if dt > 0:
            out["cpu_pct"] = round(100.0 * (cpu - self.t_cpu) / dt, 2)
        host = _host_cpu()
        if host is not None and self.t_host is not None and host[1] > self.t_host[1]:
            out["host_cpu_pct"] = round(100.0 * (host[0] - self.t_host[0]) / (host[1] - self.t_host[1]), 2)
        self.t_wall, self.t_cpu, self.t_host = now, cpu, host
        rss = _rss_mb()
        if rss is not None:
            out["rss_mb"] = round(rss, 2)
        out.update(self._gpu())
        return out

    def _gpu(self) -> dict[str, float]:
        torch = sys.modules.get("torch")  # only when the script imported it: never import torch here
        cuda = getattr(torch, "cuda", None)
        if cuda is None:
            return {}
        try:
            if not (cuda.is_available() and cuda.is_initialized()):
                return {}  # no GPU, or the script never used it: do not create a CUDA context
            out: dict[str, float] = {}
            cur = cuda.current_device()
            for i in range(cuda.device_count()):
                reserved = cuda.memory_reserved(i)
                if i != cur and not reserved:
                    continue  # a device this process does not use
                out[f"gpu{i}/mem_allocated_mb"] = round(cuda.memory_allocated(i) / 2**20, 2)
                out[f"gpu{i}/mem_reserved_mb"] = round(reserved / 2**20, 2)
                out.update(self._nvml_values(i))
            return out
        except Exception as e:
            _warn.problem("sysmetrics_error", f"GPU metrics unavailable: {e!r}")
            return {}

    def _nvml_values(self, i: int) -> dict[str, float]:
        if self._nvml is False:
            return {}
        try:
            if self._nvml is None:
                import pynvml  # optional (nvidia-ml-py)

                pynvml.nvmlInit()
                self._nvml = pynvml
            nv = self._nvml
            # torch's device i is NVML's index i unless CUDA_VISIBLE_DEVICES reorders them
            vis = os.environ.get("CUDA_VISIBLE_DEVICES")
            idx = i
            if vis:
                ids = [x.strip() for x in vis.split(",") if x.strip()]
                if i < len(ids) and ids[i].isdigit():
                    idx = int(ids[i])
                elif i < len(ids):
                    return {}  # UUIDs: not mapped here
            h = nv.nvmlDeviceGetHandleByIndex(idx)
            util = nv.nvmlDeviceGetUtilizationRates(h)
            mem = nv.nvmlDeviceGetMemoryInfo(h)
            return {f"gpu{i}/util_pct": float(util.gpu),
                    f"gpu{i}/mem_used_pct": round(100.0 * mem.used / mem.total, 2) if mem.total else 0.0}
        except Exception:
            self._nvml = False
            return {}

    def sample(self) -> int:
        """Take one sample now and append it to the run's metric buffer; returns the values written."""
        vals = self.values()
        run = self.run
        steps = run.steps
        now = time.time()
        ctx = run.ctx
        b = run.buf
        for k, v in vals.items():
            name = PREFIX + k
            step = steps.get(name, 0)
            steps[name] = step + 1
            b.append((name, float(v), step, now, ctx))
        self.samples += 1
        return len(vals)
