"""The benchmark training script: a CNN on scikit-learn's digits, plain or recorded with flightlog.

    python bench/train_digits.py --mode plain|flightlog [--epochs 20] [--width 32] [--threads 1]

Both modes train the same model on the same data in the same order. ``flightlog`` mode wraps the
loops in fl.loop, checkpoints model+optimizer (adaptive period, default 2% bound) and logs the loss
of every batch and the validation accuracy of every epoch. Prints one JSON line with timings.
Used by bench/record_overhead.py and bench/replay_speed.py (which adds new log statements to a copy).
"""
import argparse
import json
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

parser = argparse.ArgumentParser()
parser.add_argument("--mode", choices=("plain", "flightlog"), default="flightlog")
parser.add_argument("--epochs", type=int, default=20)
parser.add_argument("--width", type=int, default=32)
parser.add_argument("--threads", type=int, default=1)
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--size", type=int, default=8, help="upsample the 8x8 digits to SIZE x SIZE (more compute per step)")
cli = parser.parse_args()
torch.set_num_threads(cli.threads)
t_start = time.perf_counter()
c_start = time.process_time()

if cli.mode == "flightlog":
    import flightlog as fl
else:
    class _NoFl:  # the same call sites, doing nothing
        @staticmethod
        def arg(name, default):
            return default

        @staticmethod
        def loop(name, it):
            return it

        @staticmethod
        def log(name, value):
            return value

        class checkpointing:
            def __init__(self, **kw):
                pass

            def __enter__(self):
                return self

            def __exit__(self, *a):
                return False

    fl = _NoFl()


class Net(nn.Module):
    def __init__(self, width, size=8):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.drop = nn.Dropout(0.25)
        self.fc1 = nn.Linear(2 * width * (size // 2) ** 2, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = self.drop(torch.flatten(x, 1))
        return self.fc2(F.relu(self.fc1(x)))


random.seed(0)
np.random.seed(0)
torch.manual_seed(0)
lr = fl.arg("lr", 0.02)
d = load_digits()
X = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
if cli.size != 8:
    X = F.interpolate(X, size=(cli.size, cli.size), mode="bilinear", align_corners=False)
y = torch.tensor(d.target, dtype=torch.long)
perm = np.random.RandomState(0).permutation(len(y))
Xte, yte, Xtr, ytr = X[perm[:300]], y[perm[:300]], X[perm[300:]], y[perm[300:]]
loader = DataLoader(TensorDataset(Xtr, ytr), batch_size=cli.batch_size, shuffle=True)
net = Net(cli.width, cli.size)
opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)


def accuracy():
    net.eval()
    with torch.no_grad():
        a = (net(Xte).argmax(1) == yte).float().mean().item()
    net.train()
    return a


t_loop = None
t_loop_unix = None
with fl.checkpointing(model=net, optimizer=opt):
    for epoch in fl.loop("epoch", range(cli.epochs)):
        if t_loop is None:
            t_loop = time.perf_counter()
            t_loop_unix = time.time()
        for xb, yb in fl.loop("batch", loader):
            opt.zero_grad()
            loss = F.cross_entropy(net(xb), yb)
            loss.backward()
            opt.step()
            fl.log("loss", loss)
        fl.log("val_acc", accuracy())

t_train = time.perf_counter()
if cli.mode == "flightlog":
    fl.finish()
out = {"loop_start_unix": t_loop_unix, "mode": cli.mode, "wall_s": time.perf_counter() - t_start, "cpu_s": time.process_time() - c_start,
       "loop_s": t_train - (t_loop or t_train), "startup_s": (t_loop or t_train) - t_start,
       "finish_s": time.perf_counter() - t_train}
print(json.dumps(out))
sys.stdout.flush()
