"""ADMM pruning inside your own training loop: the three added lines are marked.

    python examples/own_training_loop.py [--limit 60000]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from admmcompress import ADMM, Plan, Unstructured, measure
from admmcompress.data import BatchLoader, load_dataset
from admmcompress.models import LeNet300100
from admmcompress.train.loop import evaluate


def main(limit: int = 6000, epochs: int = 3) -> dict[str, float]:
    torch.manual_seed(0)
    train, test = load_dataset("mnist", "train", limit=limit), load_dataset("mnist", "test", limit=2000)
    model = LeNet300100()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    loader = BatchLoader(train, 64, seed=0)
    for _ in range(epochs):  # ordinary dense training
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    dense = evaluate(model, test)

    plan = Plan({"fc1": Unstructured(compression=20), "fc2": Unstructured(compression=10),
                 "fc3": Unstructured(compression=4)})
    admm = ADMM(model, plan, rho=1e-3)  # (1) ADMM state from the trained weights
    for _ in range(epochs):
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y) + admm.penalty()  # (2) the penalty
            opt.zero_grad()
            loss.backward()
            opt.step()
        admm.step()  # (3) Z-, U-update once per epoch
    masks = admm.finalize()  # hard prune from W
    retrain_opt = torch.optim.Adam(model.parameters(), 1e-3)  # fresh optimizer: no stale momentum
    masks.attach(model, retrain_opt)  # pruned weights stay exactly zero from here on
    for _ in range(epochs):
        for x, y in loader:
            retrain_opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            retrain_opt.step()
    stats = measure(model, ["fc1", "fc2", "fc3"])
    result = {"dense_accuracy": dense, "pruned_accuracy": evaluate(model, test),
              "compression": stats.overall_compression}
    print(f"dense {dense:.2f}% -> pruned {result['pruned_accuracy']:.2f}% at {stats.overall_compression:.1f}x")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, default=6000)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    main(args.limit, args.epochs)
