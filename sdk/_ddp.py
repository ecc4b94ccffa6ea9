"""Several processes, one run: the ranks of a torchrun/DDP job record into one run id.

* the run id: rank 0 makes one and broadcasts it when ``torch.distributed`` is
  initialised (Lightning and the Transformers Trainer initialise it before the
  integrations start the run); otherwise it is derived from what every rank of
  the job sees alike (``TORCHELASTIC_RUN_ID``, ``MASTER_ADDR``/``MASTER_PORT``,
  ``WORLD_SIZE``, the restart count). It is put in ``FLIGHTLOG_RUN_ID``, which
  ``new_run_id`` returns.
* every metrics row carries the process's ``rank`` (env ``RANK``);
* checkpoints are taken by rank 0 only: under DDP every rank holds the same
  weights, optimizer and scheduler state after each step (gradients are
  all-reduced), so rank 0's copy is the state of all. RNG states can differ by
  rank, so the integrations gather every rank's into rank 0's checkpoint
  (``integrations._common.RankRNG``); resume and replay (``replay/_ranks.py``:
  a segment runs as its ranks) give each rank its own.
"""
from __future__ import annotations

import os
import sys

ENV_RUN_ID = "FLIGHTLOG_RUN_ID"


def rank_info() -> tuple[int | None, int, int | None]:
    """``(rank, world_size, local_rank)`` from the launcher's environment (rank None: one process)."""
    def num(name):
        raw = os.environ.get(name)
        try:
            v = int(raw) if raw not in (None, "") else None
        except ValueError:
            return None
        return v if v is None or v >= 0 else None  # a negative rank or size is no launcher's

    world = num("WORLD_SIZE") or 1
    return num("RANK"), world, num("LOCAL_RANK")


def job_run_id() -> str:
    """A run id every rank of this job computes alike, from the launcher's environment."""
    import hashlib
    import time

    job_ids = ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "SLURM_STEP_ID", "OMPI_MCA_orte_ess_jobid", "PMIX_NAMESPACE")
    parts = [os.environ.get(k, "") for k in job_ids + ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE",
                                                       "TORCHELASTIC_RESTART_COUNT", "GROUP_WORLD_SIZE")]
    if not any(os.environ.get(k) for k in job_ids) and os.environ.get("LOCAL_WORLD_SIZE") == os.environ.get("WORLD_SIZE"):
        # no launcher job id, one machine: the ranks are children of one launcher process; its pid and start
        # time tell this job from an earlier one on the same port
        parts.append(_launcher())
    h = hashlib.sha256("|".join(parts).encode()).hexdigest()[:6]
    return time.strftime("%Y%m%d", time.gmtime()) + "-ddp-" + h


def _launcher() -> str:
    ppid = os.getppid()
    try:
        with open(f"/proc/{ppid}/stat") as fh:
            started = fh.read().rsplit(")", 1)[1].split()[19]  # field 22: start time in clock ticks
    except (OSError, IndexError):
        started = ""
    return f"{ppid}:{started}"


def _broadcast_id() -> str | None:
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    from flightlog import _run

    box = [None]
    if dist.get_rank() == 0:
        box[0] = os.environ.get(ENV_RUN_ID) or _run.new_run_id()
    dist.broadcast_object_list(box, src=0)
    return box[0]


def prepare_env() -> str | None:
    """Make this rank's next run use the job's shared run id; returns it (None: one process)."""
    rank, world, _ = rank_info()
    if world <= 1:
        return None
    rid = _broadcast_id()
    if rid is None:
        rid = os.environ.get(ENV_RUN_ID) or job_run_id()
    os.environ[ENV_RUN_ID] = rid
    return rid
