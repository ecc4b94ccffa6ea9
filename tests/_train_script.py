"""A small deterministic training script used by the record/replay tests (digits, shuffle, dropout, StepLR)."""

TRAIN = r'''
import os, random, sys
import numpy as np, torch, torch.nn as nn, torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset
import flightlog as fl

random.seed(0); np.random.seed(0); torch.manual_seed(0)
lr = fl.arg("lr", float(sys.argv[1]) if len(sys.argv) > 1 else 0.01)
d = load_digits()
X = torch.tensor(d.images[:500] / 16.0, dtype=torch.float32).unsqueeze(1)
y = torch.tensor(d.target[:500])
loader = DataLoader(TensorDataset(X, y), batch_size=50, shuffle=True)
net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Dropout(0.3), nn.Linear(144, 10))
opt = torch.optim.Adam(net.parameters(), lr=lr)
sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
with fl.checkpointing(model=net, optimizer=opt, scheduler=sched, every=EVERY):
    for epoch in fl.loop("epoch", range(5)):
        for xb, yb in fl.loop("batch", loader):
            opt.zero_grad()
            loss = F.cross_entropy(net(xb), yb)
            loss.backward()
            opt.step()
            fl.log("loss", loss)
            # BATCH
        sched.step()
        fl.log("lr", sched.get_last_lr()[0])
        # EPOCH
'''

GRAD = 'fl.log("grad_norm", torch.sqrt(sum((p.grad ** 2).sum() for p in net.parameters())))'
WNORM = 'fl.log("weight_norm", torch.sqrt(sum((p ** 2).sum() for p in net.parameters())))'


def script(every: int = 1, batch: str = "", epoch: str = "", extra: dict | None = None) -> str:
    s = TRAIN.replace("EVERY", str(every))
    s = s.replace("            # BATCH", "            " + batch if batch else "            # BATCH")
    s = s.replace("        # EPOCH", "        " + epoch if epoch else "        # EPOCH")
    for a, b in (extra or {}).items():
        s = s.replace(a, b)
    return s
