"""Transformers ``Trainer`` checkpoint folders: flightlog's own checkpoints written as one, references to
the ones the Trainer saves, and choosing the folder a resume or replay starts from.

Nothing here imports Transformers (torch only), so the store-side logic is testable on its own.
"""
from __future__ import annotations

import json
import os
import tempfile

from flightlog import _checkpoint, _warn
from flightlog.integrations import _common

REF = "trainer_checkpoint"  # the object of a checkpoint that references a folder the Trainer saved
_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")


class TrainerFolder:
    """A checkpoint folder the Trainer saved, as a checkpoint object: its path, file sizes and content digests.

    The digests are taken when the reference is recorded (the files were just
    written, so they are read from the page cache); resume and replay verify them
    and refuse the folder when a file is missing or changed.
    """

    def __init__(self, folder: str, global_step: int) -> None:
        self.folder, self.global_step = folder, global_step

    def state_dict(self) -> dict:
        m = _common.folder_manifest(self.folder)
        m["global_step"] = self.global_step
        return m

    def load_state_dict(self, sd: dict) -> None:  # the Trainer loads the folder itself
        pass


def complete_folder(folder: str, global_step: int) -> bool:
    """Whether a Trainer checkpoint folder holds the full training state of ``global_step``."""
    try:
        names = set(os.listdir(folder))
        with open(os.path.join(folder, "trainer_state.json")) as fh:
            step = json.load(fh).get("global_step")
    except (OSError, ValueError):
        return False
    return (step == global_step and bool(names & {"optimizer.pt", "optimizer.bin"}) and "scheduler.pt" in names
            and any(n.startswith("rng_state") and n.endswith(".pth") for n in names) and bool(names & set(_WEIGHTS)))


def write_trainer_checkpoint(payload: dict, folder: str) -> str:
    """A flightlog checkpoint payload as a folder ``Trainer.train(resume_from_checkpoint=)`` loads."""
    import torch

    objs = payload["objects"]
    os.makedirs(folder, exist_ok=True)
    torch.save(objs["model"][1], os.path.join(folder, "pytorch_model.bin"))
    if "optimizer" in objs:
        torch.save(objs["optimizer"][1], os.path.join(folder, "optimizer.pt"))
    if "scheduler" in objs:
        torch.save(objs["scheduler"][1], os.path.join(folder, "scheduler.pt"))
    def trainer_rng(rng: dict) -> dict:
        st = {"python": rng["python"], "numpy": rng["numpy"], "cpu": rng["torch"]}
        if "cuda" in rng:
            st["cuda"] = rng["cuda"]
        return st

    torch.save(trainer_rng(payload["rng"]), os.path.join(folder, "rng_state.pth"))
    # a multi-process run: the Trainer of rank r loads rng_state_<r>.pth (and only that one)
    ranks = objs.get(_common.RANKS, (None, {}))[1] or {}
    for r, rng in enumerate(ranks.get("end") or []):
        if rng is not None:
            torch.save(trainer_rng(rng), os.path.join(folder, f"rng_state_{r}.pth"))
    with open(os.path.join(folder, "trainer_state.json"), "w") as fh:
        fh.write(objs["trainer_state"][1]["json"])
    return folder


def checkpoint_folder(store: str, content_hash: str, tmp_parent: str | None) -> "tuple[str | None, dict, str | None, bool]":
    """``(folder, payload, why not usable, temporary)`` for one flightlog checkpoint.

    A reference gives the Trainer's own folder once every file's digest matches;
    flightlog's own checkpoint is written out as a Trainer folder (temporary).
    """
    payload = _checkpoint.load(store, content_hash)
    objs = payload.get("objects", {})
    if REF in objs:
        ref = objs[REF][1]
        why = _common.check_manifest(ref)
        return (None if why else ref["folder"]), payload, why, False
    if "model" in objs and "trainer_state" in objs:
        folder = write_trainer_checkpoint(payload, tempfile.mkdtemp(prefix="flightlog-ckpt-", dir=tmp_parent))
        return folder, payload, None, True
    return None, payload, "not a Trainer checkpoint (it holds no model or TrainerState)", False


def start_from(store: str, candidates: list[tuple[int, str]], tmp_parent: str | None, what: str
                ) -> "tuple[int, str | None, dict | None, bool]":
    """The newest usable checkpoint among ``candidates`` (newest first): ``(iteration, folder, payload, temporary)``.

    A checkpoint whose referenced folder changed, or whose blob is unreadable, is
    refused with a warning and the next older one is tried; ``(-1, None, None,
    False)`` when none is usable.
    """
    from flightlog._errors import FlightlogError

    for it, h in candidates:
        try:
            folder, payload, why, tmp = checkpoint_folder(store, h, tmp_parent)
        except (FlightlogError, OSError, ValueError, KeyError) as e:
            folder, payload, why, tmp = None, None, str(e), False
        if folder is not None:
            return it, folder, payload, tmp
        _warn.problem("checkpoint_unusable", f"{what}: the checkpoint of epoch {it} is not used: {why}; "
                                             "trying an earlier one")
    return -1, None, None, False
