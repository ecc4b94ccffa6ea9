"""Train a small CNN on scikit-learn's digits (shipped offline) and record it with flightlog.

    python examples/digits.py [--epochs N]

Every batch loss and every epoch's validation accuracy are logged; model,
optimizer and LR scheduler are checkpointed at each epoch end (when cheap
enough), so the run can be resumed after a crash and replayed with new log
statements later (see examples/demo.sh).
"""
import argparse
import random

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

import flightlog as fl


class Net(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.drop = nn.Dropout(0.25)
        self.fc = nn.Linear(2 * width * 4 * 4, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(self.drop(torch.flatten(x, 1)))


def load_data(seed: int = 0):
    d = load_digits()
    X = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(d.target, dtype=torch.long)
    perm = np.random.RandomState(seed).permutation(len(y))
    test, train = perm[:300], perm[300:]
    return X[train], y[train], X[test], y[test]


def accuracy(net, X, y) -> float:
    net.eval()
    with torch.no_grad():
        acc = (net(X).argmax(1) == y).float().mean().item()
    net.train()
    return acc


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--width", type=int, default=16)
    cli = parser.parse_args()

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    lr = fl.arg("lr", 0.05)
    epochs = fl.arg("epochs", cli.epochs)
    batch_size = fl.arg("batch_size", 32)
    width = fl.arg("width", cli.width)

    Xtr, ytr, Xte, yte = load_data()
    loader = DataLoader(TensorDataset(Xtr, ytr), batch_size=batch_size, shuffle=True)
    net = Net(width)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)

    with fl.checkpointing(model=net, optimizer=opt, scheduler=sched):
        for epoch in fl.loop("epoch", range(epochs)):
            for x, y in fl.loop("batch", loader):
                opt.zero_grad()
                loss = F.cross_entropy(net(x), y)
                loss.backward()
                opt.step()
                fl.log("loss", loss)
            sched.step()
            fl.log("val_acc", accuracy(net, Xte, yte))


if __name__ == "__main__":
    main()
