"""Record overhead of the framework integrations, next to each framework's own logger.

    .venv/bin/python bench/integrations_overhead.py [--repeats 5] [--epochs 5]

Lightning: a digits MLP (1,797 images, batch 32, 20 epochs) fitted with no logger,
with Lightning's ``CSVLogger`` and with ``FlightlogCallback`` (metrics at every step,
epoch checkpoints with the adaptive period). Transformers: a 2-layer BERT (hidden 64)
on synthetic token sequences with ``report_to=[]`` (the Trainer's own log history
only) and with ``FlightlogCallback`` (``fl-nockpt``: the same without checkpoints, to
tell the two costs apart). Each configuration runs ``--repeats`` times,
interleaved, in this one process; the medians of the ``fit``/``train`` wall times
are compared, and flightlog's overhead is also printed against each framework's own
logger (the peer).

The peers: Lightning's ``CSVLogger`` always; TensorBoard (Lightning's
``TensorBoardLogger``, the Trainer's ``report_to=["tensorboard"]``) where it is
installed, which is the benchmark environment (TensorBoard is never a dependency of
flightlog):

    bash bench/_peers_setup.sh
    bench/.venv/bin/python bench/integrations_overhead.py --repeats 5 --epochs 20
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings

os.environ.setdefault("FLIGHTLOG_PROGRESS", "0")
os.environ.setdefault("FLIGHTLOG_QUIET", "1")
os.environ.setdefault("FLIGHTLOG_SYSTEM_METRICS", "0")
warnings.filterwarnings("ignore")


def lightning_fit(kind: str, epochs: int, tmp: str) -> float:
    import lightning.pytorch as pl
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from lightning.pytorch.loggers import CSVLogger
    from sklearn.datasets import load_digits
    from torch.utils.data import DataLoader, TensorDataset

    from flightlog.integrations.lightning import FlightlogCallback

    class M(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.save_hyperparameters()
            self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))

        def training_step(self, b, i):
            loss = F.cross_entropy(self.net(b[0]), b[1])
            self.log("train_loss", loss, on_step=True, on_epoch=True)
            return loss

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), 1e-3)

    pl.seed_everything(0, verbose=False)
    d = load_digits()
    dl = DataLoader(TensorDataset(torch.tensor(d.data / 16.0, dtype=torch.float32), torch.tensor(d.target)),
                    batch_size=32, shuffle=True)
    logger, cbs = False, []
    if kind == "csv":
        logger = CSVLogger(tmp, name="csv")
    elif kind == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        logger = TensorBoardLogger(tmp, name="tb")
    elif kind == "flightlog":
        cbs = [FlightlogCallback(store=os.path.join(tmp, "store"))]
    t = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=logger, callbacks=cbs,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   log_every_n_steps=1)
    t0, c0 = time.perf_counter(), time.process_time()
    t.fit(M(), dl)
    return time.perf_counter() - t0, time.process_time() - c0


def transformers_train(kind: str, epochs: int, tmp: str) -> float:
    import torch
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback
    from transformers.utils import logging as hf_logging

    from flightlog.integrations.transformers import FlightlogCallback

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(8, 100, (512, 16), generator=g)
    y = (x == 9).any(1).long()
    data = [{"input_ids": x[i], "attention_mask": torch.ones(16, dtype=torch.long), "labels": y[i]}
            for i in range(len(y))]
    cfg = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=128, max_position_embeddings=32, num_labels=2)
    args = TrainingArguments(output_dir=tmp, num_train_epochs=epochs, per_device_train_batch_size=32,
                             logging_steps=1, save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
                             report_to=["tensorboard"] if kind == "tensorboard" else [])
    cbs = [FlightlogCallback(store=os.path.join(tmp, "store"), checkpoints=kind != "fl-nockpt")] \
        if kind in ("flightlog", "fl-nockpt") else []
    tr = Trainer(model=BertForSequenceClassification(cfg), args=args, train_dataset=data, callbacks=cbs)
    tr.remove_callback(PrinterCallback)  # no log dicts on stdout
    t0, c0 = time.perf_counter(), time.process_time()
    tr.train()
    return time.perf_counter() - t0, time.process_time() - c0


def bench(name: str, fn, kinds: list[str], repeats: int, epochs: int) -> None:
    """Wall and CPU time (the process's, flightlog's threads included) of each configuration, interleaved.

    CPU time is the steadier measure on a shared machine: it does not count time spent waiting for a core.
    """
    from flightlog import _run

    walls: dict[str, list[float]] = {k: [] for k in kinds}
    cpus: dict[str, list[float]] = {k: [] for k in kinds}
    for k in kinds:  # warm-up: imports and first-call costs of every configuration
        fn(k, 1, tempfile.mkdtemp())
        _run._ENDED_ONCE = False
    for _ in range(repeats):
        for k in kinds:
            w, c = fn(k, epochs, tempfile.mkdtemp())
            walls[k].append(w)
            cpus[k].append(c)
            _run._ENDED_ONCE = False
    print(f"\n{name}: median of {repeats} runs, {epochs} epochs, torch threads {_threads()}")
    for what, times in (("wall", walls), ("CPU", cpus)):
        base = statistics.median(times[kinds[0]])
        print(f"  {what:<5}{'configuration':<14} {'median s':>9} {'vs ' + kinds[0]:>10}   all runs (s)")
        for k in kinds:
            m = statistics.median(times[k])
            print(f"       {k:<14} {m:9.3f} {100 * (m - base) / base:+9.1f}%   " + " ".join(f"{t:.2f}" for t in times[k]))
        fl_m = statistics.median(times["flightlog"])
        for peer in [k for k in kinds[1:-1] if not k.startswith("fl-")]:
            m = statistics.median(times[peer])
            print(f"       {what}: flightlog vs {peer}: {100 * (fl_m - m) / m:+.1f}% (target: <= +2%)")


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--only", choices=("lightning", "transformers"))
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadier timings)")
    a = ap.parse_args()
    import importlib.util

    import torch

    torch.set_num_threads(a.threads)

    tb = importlib.util.find_spec("tensorboard") is not None
    if not tb:
        print("TensorBoard is not installed here: run in the benchmark environment for that peer "
              "(bash bench/_peers_setup.sh; bench/.venv/bin/python bench/integrations_overhead.py)")
    if a.only in (None, "lightning"):
        bench("Lightning (digits MLP)", lightning_fit, ["none", "csv"] + (["tensorboard"] if tb else []) + ["flightlog"],
              a.repeats, a.epochs)
    if a.only in (None, "transformers"):
        bench("Transformers (tiny BERT)", transformers_train,
              ["none"] + (["tensorboard"] if tb else []) + ["fl-nockpt", "flightlog"], a.repeats, a.epochs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
