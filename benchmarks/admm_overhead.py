"""Overhead of the ADMM penalty: time per training epoch with and without it, one process, interleaved.

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 python benchmarks/admm_overhead.py

Each round trains one full MNIST epoch of LeNet-5 plainly and one with ``loss + admm.penalty()``
followed by the epoch's ADMM update (Z-step projection + U-step), alternating which goes first.
Reports the median epoch time of each and their ratio (target: <= 1.10x).
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch

from admmcompress import ADMM, Plan, Unstructured
from admmcompress.data import BatchLoader, load_dataset
from admmcompress.models import LeNet5
from admmcompress.train.loop import train_epoch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--limit", type=int, default=None, help="train on the first N images only")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = load_dataset("mnist", "train", limit=args.limit)
    base = LeNet5()
    plan = Plan({"conv1": Unstructured(sparsity=0.8), "conv2": Unstructured(sparsity=0.92),
                 "fc1": Unstructured(sparsity=0.991), "fc2": Unstructured(sparsity=0.93)})
    plain_model, admm_model = copy.deepcopy(base), copy.deepcopy(base)
    admm = ADMM(admm_model, plan)
    contenders = {
        "plain": (plain_model, torch.optim.Adam(plain_model.parameters(), 1e-3), None, None),
        "admm": (admm_model, torch.optim.Adam(admm_model.parameters(), 1e-3), admm.penalty, admm.step),
    }
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for r in range(args.rounds):
        order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
        for name in order:
            model, opt, penalty, update = contenders[name]
            loader = BatchLoader(data, 64, seed=r)
            start = time.perf_counter()
            train_epoch(model, loader, opt, lambda _: 1e-3, 0, penalty=penalty, progress=False)
            if update is not None:
                update()
            times[name].append(time.perf_counter() - start)
    plain, with_admm = statistics.median(times["plain"]), statistics.median(times["admm"])
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {args.threads}")
    print(f"images per epoch: {len(data)}, rounds: {args.rounds}")
    for name, values in times.items():
        every = ", ".join(f"{v:.2f}" for v in values)
        print(f"{name:>6}: median {statistics.median(values):.2f} s/epoch  (all: {every})")
    print(f"ratio admm/plain: {with_admm / plain:.3f}x (target <= 1.10x)")
    print("rerun: MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 python benchmarks/admm_overhead.py "
          f"--rounds {args.rounds} --threads {args.threads}" + (f" --limit {args.limit}" if args.limit else ""))


if __name__ == "__main__":
    main()
