"""PyTorch Lightning + flightlog: digits classifier (runs on CPU in seconds).

    python examples/lightning_example.py            # record
    flightlog show latest                            # what was recorded
    flightlog resume latest -- python examples/lightning_example.py   # continue a killed run

Hindsight logging: add e.g. ``fl.log("val_err", 1 - acc)`` to ``validation_step`` and

    flightlog replay examples/lightning_example.py --run latest      # epoch level: batches skipped

(a new statement in ``training_step`` replays at batch level instead).

Several processes (DDP, gloo on CPU): one run, a ``rank`` on every row; resume and replay
(each segment as 2 rank processes) work the same way:

    DDP_DEVICES=2 torchrun --standalone --nproc_per_node=2 examples/lightning_example.py
    DDP_DEVICES=2 flightlog replay examples/lightning_example.py --run latest

Environment: KILL_AT_EPOCH=N kills the process (SIGKILL) when epoch N starts,
after the previous checkpoint is durable -- a crash to resume from.
"""
import os
import signal
import sys

import lightning.pytorch as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

import flightlog as fl
from flightlog.integrations.lightning import FlightlogCallback


class Digits(pl.LightningModule):
    def __init__(self, lr: float = 0.01, hidden: int = 32):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Dropout(0.2),
                                 nn.Linear(hidden, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.8)]


class KillAt(pl.Callback):
    """Test aid: SIGKILL at the start of an epoch, once flightlog's checkpoints are on disk."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            r = fl._run.ACTIVE
            ck = r.checkpointer
            if ck is not None:
                ck._q.join()
            r.rec.flush()
            if trainer.world_size > 1:
                trainer.strategy.barrier()  # every rank has flushed before any dies
            os.kill(os.getpid(), signal.SIGKILL)


def data(n: int = 600):
    d = load_digits()
    x = torch.tensor(d.data[:n] / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target[:n])
    train = DataLoader(TensorDataset(x[:500], y[:500]), batch_size=50, shuffle=True)
    val = DataLoader(TensorDataset(x[500:], y[500:]), batch_size=50)
    return train, val


def main(epochs: int = 4):
    pl.seed_everything(0, workers=True)
    train, val = data()
    every = int(os.environ["CKPT_EVERY"]) if os.environ.get("CKPT_EVERY") else None  # default: adaptive
    callbacks = [FlightlogCallback(every=every)]
    if os.environ.get("KILL_AT_EPOCH"):
        callbacks.append(KillAt(int(os.environ["KILL_AT_EPOCH"])))
    ddp = int(os.environ.get("DDP_DEVICES", "1"))  # e.g. 2 under torchrun --nproc_per_node=2 (gloo on CPU)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=ddp, deterministic=True, logger=False,
                         strategy="ddp" if ddp > 1 else "auto",
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         log_every_n_steps=1, callbacks=callbacks)
    model = Digits()
    trainer.fit(model, train, val)
    out = os.environ.get("WEIGHTS_OUT")
    if out and trainer.global_rank == 0:
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, out)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 4)
