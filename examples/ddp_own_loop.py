"""ADMM in your own DistributedDataParallel loop: the three added lines are marked (1), (2), (3).

    torchrun --nproc-per-node 2 examples/ddp_own_loop.py [--limit 6000] [--epochs 2]
    python examples/ddp_own_loop.py                      # the same loop in one process

The recipe, whatever your loop looks like:

* build the ADMM state *after* wrapping the model in DDP (DDP copies rank 0's weights to every rank when it
  is built), on the plain model (``ddp.module``), so Z = project(W) is computed from the same weights on
  every rank;
* add ``admm.penalty()`` to the loss of every step: its gradient is equal on every rank, and DDP's averaging
  leaves it unchanged;
* call ``admm.step()`` on every rank at the same step: W is equal on every rank after each optimizer step
  (the all-reduced gradient is the same everywhere), so Z, U and rho stay equal without being sent. The
  check at the end (``assert_same``) gathers a checksum of every rank's masks to show it;
* ``admm.finalize()`` on every rank gives equal masks; attach them to the model and a fresh optimizer;
* save and print on rank 0 only.

The data here go through torch's ``DistributedSampler`` (seeded, ``set_epoch`` every epoch), as with any
``Dataset``; ``admmcompress run`` itself splits each global batch instead, so N processes see the batches of
one (see admmcompress.train.distributed).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from admmcompress import ADMM, Plan, Unstructured, measure
from admmcompress.data import load_dataset
from admmcompress.models import LeNet300100
from admmcompress.train.distributed import Distributed, evaluate


def train_epochs(ddp: nn.Module, loader: DataLoader, opt: torch.optim.Optimizer, epochs: int,
                 admm: ADMM | None = None, first_epoch: int = 0) -> None:
    for epoch in range(first_epoch, first_epoch + epochs):
        loader.sampler.set_epoch(epoch)  # a new seeded order each epoch, the same on every rank
        for x, y in loader:
            loss = nn.functional.cross_entropy(ddp(x), y)
            if admm is not None:
                loss = loss + admm.penalty()  # (2) the penalty, on every rank
            opt.zero_grad()
            loss.backward()
            opt.step()
        if admm is not None:
            admm.step()  # (3) Z-, U-update once per epoch, on every rank


def main(limit: int = 6000, epochs: int = 2, seed: int = 0) -> dict[str, float]:
    ctx = Distributed.from_env()  # torchrun's process group (gloo on the CPU), or one process
    torch.manual_seed(seed)
    train, test = load_dataset("mnist", "train", limit=limit), load_dataset("mnist", "test", limit=2000)
    sampler = DistributedSampler(TensorDataset(train.x, train.y), num_replicas=ctx.world_size, rank=ctx.rank,
                                 shuffle=True, seed=seed)
    loader = DataLoader(sampler.dataset, batch_size=64 // ctx.world_size, sampler=sampler)  # global batch 64
    model = LeNet300100()
    ddp = nn.parallel.DistributedDataParallel(model) if ctx.active else model
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    train_epochs(ddp, loader, opt, epochs)  # ordinary dense training
    dense = evaluate(model, test, 1000, ctx)  # each test sample counted once over the ranks

    plan = Plan({"fc1": Unstructured(compression=20), "fc2": Unstructured(compression=10),
                 "fc3": Unstructured(compression=4)})
    admm = ADMM(model, plan, rho=1e-3)  # (1) ADMM state from the (synchronized) trained weights
    train_epochs(ddp, loader, opt, epochs, admm, first_epoch=epochs)
    masks = admm.finalize()  # hard prune from W: equal masks on every rank
    ctx.assert_same(masks.state_dict(), "masks after ADMM")
    retrain_opt = torch.optim.Adam(model.parameters(), 1e-3)  # fresh optimizer: no stale momentum
    masks.attach(model, retrain_opt)
    train_epochs(ddp, loader, retrain_opt, epochs, first_epoch=2 * epochs)
    stats = measure(model, ["fc1", "fc2", "fc3"])
    result = {"dense_accuracy": dense, "pruned_accuracy": evaluate(model, test, 1000, ctx),
              "compression": stats.overall_compression, "world_size": ctx.world_size}
    if ctx.is_main:  # one writer
        print(f"{ctx.world_size} process(es): dense {dense:.2f}% -> pruned {result['pruned_accuracy']:.2f}% "
              f"at {stats.overall_compression:.1f}x")
    ctx.close()
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, default=6000)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    main(args.limit, args.epochs)
