"""bench/train_digits.py's training, instrumented with FlorDB instead of flightlog.

Not run by hand: bench/_flordb.py copies it as ``train.py`` into a throwaway git repository and runs

    bench/.venv/bin/python train.py --kwargs epochs=20 width=32 threads=1 batch_size=32 size=8

there (FlorDB switches that repository to its own branch and auto-commits; it must never run in a
repository we care about, so this script refuses to start unless FLOR_BENCH_SANDBOX names the
current directory). Same model, data, split, seeds, batch order and hyperparameters as
train_digits.py. Hyperparameters are ``flor.arg``s, not argparse options: FlorDB parses the
script's command line itself, and its replay re-runs the script with only its own flags, getting
the recorded values back from ``flor.arg``. Prints one JSON line with timings (to the real stdout,
after ``flor.commit()``, so FlorDB's output capture does not record it as a second run).
"""
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

_sandbox = os.environ.get("FLOR_BENCH_SANDBOX", "")
if not _sandbox or os.path.realpath(_sandbox) != os.path.realpath(os.getcwd()):
    sys.exit("flor_digits.py: refusing to run: FlorDB rewrites the git branch of the current "
             "directory; run it through bench/_flordb.py, which makes a throwaway repository")

t_start = time.perf_counter()
c_start = time.process_time()
import flordb as flor  # noqa: E402  (after the guard: importing flordb already touches the repo)

epochs = flor.arg("epochs", 20)
width = flor.arg("width", 32)
threads = flor.arg("threads", 1)
batch_size = flor.arg("batch_size", 32)
size = flor.arg("size", 8)
torch.set_num_threads(threads)


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
lr = flor.arg("lr", 0.02)
d = load_digits()
X = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
if size != 8:
    X = F.interpolate(X, size=(size, size), mode="bilinear", align_corners=False)
y = torch.tensor(d.target, dtype=torch.long)
perm = np.random.RandomState(0).permutation(len(y))
Xte, yte, Xtr, ytr = X[perm[:300]], y[perm[:300]], X[perm[300:]], y[perm[300:]]
loader = DataLoader(TensorDataset(Xtr, ytr), batch_size=batch_size, shuffle=True)
net = Net(width, size)
opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)


def accuracy():
    net.eval()
    with torch.no_grad():
        a = (net(Xte).argmax(1) == yte).float().mean().item()
    net.train()
    return a


# FlorDB logs JSON values; a tensor would be stored as its str() ("tensor(2.30, grad_fn=...)"),
# so the loss goes in as a Python float, as FlorDB's own examples do.
t_loop = None
with flor.checkpointing(model=net, optimizer=opt):
    for epoch in flor.loop("epoch", range(epochs)):
        if t_loop is None:
            t_loop = time.perf_counter()
        for xb, yb in flor.loop("batch", loader):
            opt.zero_grad()
            loss = F.cross_entropy(net(xb), yb)
            loss.backward()
            opt.step()
            flor.log("loss", loss.item())
        flor.log("val_acc", accuracy())

t_train = time.perf_counter()
flor.commit()
out = {"mode": "flordb", "wall_s": time.perf_counter() - t_start, "cpu_s": time.process_time() - c_start,
       "loop_s": t_train - (t_loop or t_train), "startup_s": (t_loop or t_train) - t_start,
       "finish_s": time.perf_counter() - t_train}
sys.__stdout__.write(json.dumps(out) + "\n")
sys.__stdout__.flush()
