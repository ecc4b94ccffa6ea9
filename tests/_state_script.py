"""A small deterministic training script whose state lives outside fl.checkpointing, for the replay tests.

The batch loop sits in a function the epoch loop calls (the common PyTorch layout);
plain values are carried between epochs (``lr /= 2``, ``best = max(best, acc)``, an
early-stopping counter); the scheduler is not registered; ``running`` is filled in
the batch loop and read after it; a registered tensor is updated in place; the best
model is saved with torch.save; training stops early with ``break``.
"""

STATE = r'''
import itertools, os, random, sys
import numpy as np, torch, torch.nn as nn, torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset
import flightlog as fl

random.seed(0); np.random.seed(0); torch.manual_seed(0)
torch.set_num_threads(1)
d = load_digits()
X = torch.tensor(d.data[:360] / 16.0, dtype=torch.float32)
y = torch.tensor(d.target[:360])
Xv = torch.tensor(d.data[360:540] / 16.0, dtype=torch.float32)
yv = torch.tensor(d.target[360:540])
loader = DataLoader(TensorDataset(X, y), batch_size=60, shuffle=True)
net = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 10))
opt = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.5)
sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)   # not registered
ema = torch.zeros(10)                                                  # registered tensor, updated in place
ticks = itertools.count()                                              # advanced in the batch loop, captured nowhere
STOP_AT = int(os.environ.get("STOP_AT", "4"))


def train(loader):
    running, n = 0.0, 0
    for xb, yb in fl.loop("batch", loader):
        opt.zero_grad()
        loss = F.cross_entropy(net(xb), yb)
        loss.backward()
        opt.step()
        running += loss.item()
        n += 1
        next(ticks)
        fl.log("loss", loss)
        # IN_BATCH
    # AFTER_LOOP
    return running / n


lr = 0.2
best, bad = 0.0, 0
with fl.checkpointing(model=net, ema=ema, every=1):
    for epoch in fl.loop("epoch", range(6)):
        avg = train(loader)
        sched.step()
        lr /= 2
        for g in opt.param_groups:
            g["momentum"] = min(0.9, 0.5 + lr)
        with torch.no_grad():
            acc = (net(Xv).argmax(1) == yv).float().mean().item()
            ema.mul_(0.5).add_(net[3].bias)
        if acc > best:
            best, bad = acc, 0
            torch.save(net.state_dict(), "best.pt")
        else:
            bad += 1
        fl.log("acc", acc)
        # EPOCH
        if epoch >= STOP_AT:
            break
'''

# new statements, by place
EPOCH = "\n".join([
    'fl.log("avg", avg)',                      # returned from the function that holds the skipped loop
    'fl.log("lr_plain", lr)',                  # loop-carried plain value
    'fl.log("best", best)',                    # running max
    'fl.log("bad", bad)',                      # early-stopping counter
    'fl.log("sched_lr", sched.get_last_lr()[0])',  # unregistered scheduler
    'fl.log("ema", ema.sum())',                # registered tensor
    'fl.log("momentum", opt.param_groups[0]["momentum"])',  # unregistered optimizer
])
AFTER_LOOP = 'fl.log("running", running)'  # accumulator of the skipped loop, in the function's frame
IN_BATCH = 'fl.log("w_norm", net[0].weight.norm())'  # batch loop inside a function
TICKS = 'fl.log("ticks", next(ticks) * 1.0)'  # state that no checkpoint holds: verification must catch it


def state_script(epoch: str = "", after_loop: str = "", in_batch: str = "", extra: dict | None = None) -> str:
    s = STATE
    if epoch:
        s = s.replace("        # EPOCH", "\n".join("        " + line for line in epoch.splitlines()))
    if after_loop:
        s = s.replace("    # AFTER_LOOP", "    " + after_loop)
    if in_batch:
        s = s.replace("        # IN_BATCH", "        " + in_batch)
    for a, b in (extra or {}).items():
        s = s.replace(a, b)
    return s
